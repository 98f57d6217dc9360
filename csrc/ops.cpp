// The cifops operator library: every schema is declared here, once. Each op's body is
// written once (csrc/<op>/<op>_host.h, cif_stream_host.h) and registered per backend
// (csrc/<op>/<op>_{cpu,cuda}_op.cpp); autograd and fake (meta) kernels are registered
// from Python (cifops/_cif.py, cifops/_contrastive.py).
//
// The module has no Python functions: importing cifops._C loads this library,
// which registers the ops with the dispatcher, and exposes how it was built.
#include <Python.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "cif/cif.h"                       // kRowReal, kRowInfo, CifStatus, cif_workspace_size
#include "common/host.h"                   // compute_type
#include "contrastive/contrastive_host.h"  // kStatRows, contrastive_fuses_student_grad

#ifndef CIFOPS_TORCH_VERSION
#error "CIFOPS_TORCH_VERSION must be defined by the build (setup.py)"
#endif
#ifndef CIFOPS_CUDA_ARCHS
#define CIFOPS_CUDA_ARCHS ""
#endif
#ifndef CIFOPS_CUDA_VERSION
#define CIFOPS_CUDA_VERSION ""
#endif
#ifdef CIFOPS_WITH_CUDA
static constexpr int kWithCuda = 1;
#else
static constexpr int kWithCuda = 0;
#endif

// How this translation unit was compiled, for cifops.build_info() and
// benchmarks/abort_probe.py: a library whose exceptions cannot reach Python is
// diagnosed by comparing these with torch's own build.
#if defined(__clang__)
static constexpr const char* kCompiler = "clang " __clang_version__;
#elif defined(__GNUC__)
static constexpr const char* kCompiler = "gcc " __VERSION__;
#else
static constexpr const char* kCompiler = "unknown";
#endif
#ifdef _GLIBCXX_USE_CXX11_ABI
static constexpr int kCxx11Abi = _GLIBCXX_USE_CXX11_ABI;
#else
static constexpr int kCxx11Abi = -1;
#endif
#ifdef _OPENMP
static constexpr long kOpenMP = _OPENMP;
#else
static constexpr long kOpenMP = 0;
#endif

TORCH_LIBRARY(cifops, m) {
  // CIF integration (docs/cif-semantics.md). max_tokens = -1: N is the largest
  // token count of the batch (one device-to-host copy on CUDA). scan_real and
  // scan_int are the scan's workspace (csrc/cif/cif_host.h): the backward reads
  // them instead of scanning again.
  m.def(
      "cif_forward(Tensor hidden, Tensor alphas, Tensor? lengths, Tensor? target_lengths, "
      "float threshold, float scale_eps, float? tail_threshold, bool tail_normalize, "
      "int max_tokens) -> (Tensor embeds, Tensor token_lengths, Tensor fire_frames, "
      "Tensor alpha_sum, Tensor scan_real, Tensor scan_int)");
  m.def(
      "cif_backward(Tensor grad_embeds, Tensor? grad_alpha_sum, Tensor hidden, Tensor alphas, "
      "Tensor scan_real, Tensor scan_int, float threshold, float scale_eps, "
      "float? tail_threshold, bool tail_normalize) -> (Tensor grad_hidden, Tensor grad_alphas)");

  // One chunk of streaming CIF (cifops.cif_stream_step): the state (prefix float64 [B],
  // tokens int64 [B], frames int64 [B], partial [B, D] in the compute dtype) goes in,
  // the tokens completed in the chunk and the new state come out. Inference only.
  m.def(
      "cif_stream_step(Tensor hidden, Tensor alphas, Tensor? lengths, Tensor prefix, "
      "Tensor tokens, Tensor frames, Tensor partial, float threshold, int max_tokens) -> "
      "(Tensor embeds, Tensor token_lengths, Tensor fire_frames, Tensor new_prefix, "
      "Tensor new_tokens, Tensor new_frames, Tensor new_partial)");

  // Fused contrastive (InfoNCE) loss (csrc/contrastive/contrastive.h). temperature
  // is a 1-element tensor (CPU, or on the inputs' device). stats [6, N] are the
  // per-row log-sum-exps, expected and positive logits the backward needs;
  // fused_grad is the student gradient of a scalar loss computed in the forward
  // when fuse_student_grad allows it (CPU, not symmetric), else empty.
  m.def(
      "contrastive_forward(Tensor student, Tensor teacher, Tensor? targets, "
      "Tensor temperature, bool normalize, bool symmetric, str reduction, int ignore_index, "
      "bool fuse_student_grad) -> (Tensor loss, Tensor stats, Tensor fused_grad)");
  // Gradients that are not asked for come back as empty tensors.
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? targets, "
      "Tensor temperature, Tensor stats, Tensor fused_grad, bool normalize, bool symmetric, "
      "str reduction, int ignore_index, bool need_student, bool need_teacher, "
      "bool need_temperature) -> (Tensor grad_student, Tensor grad_teacher, "
      "Tensor grad_temperature)");
  m.def(
      "contrastive_accuracy(Tensor student, Tensor teacher, Tensor? targets, bool normalize, "
      "int ignore_index) -> Tensor");
}

// Op metadata for the fake kernels and autograd (cifops/_cif.py, cifops/_contrastive.py),
// so that Python restates none of it:
//   cif_row_real, cif_row_info   per-utterance fields of scan_real / scan_int (CifRowReal,
//                                CifRowInfo in cif.h; layout: cif_host.h)
//   cif_workspace_size(B, T) -> (len(scan_real), len(scan_int))    (cif.h)
//   cif_status, cif_stream_state_error   {name: code} of CifStatus, CifStreamStateError (cif.h)
//   contrastive_stat_rows        rows of contrastive_forward's stats output
//   compute_dtypes               {input dtype name: compute dtype name} (compute_type)
//   contrastive_fuses_student_grad(fuse_student_grad, reduction, symmetric) -> bool:
//                                whether fused_grad is [N, D] (contrastive_host.h)
static PyObject* py_contrastive_fuses_student_grad(PyObject*, PyObject* args) {
  int fuse = 0, symmetric = 0;
  const char* reduction = nullptr;
  if (!PyArg_ParseTuple(args, "psp", &fuse, &reduction, &symmetric)) return nullptr;
  const char* fn = "cifops.contrastive_loss";
  bool fused = false;
  try {
    fused = cifops::contrastive_fuses_student_grad(
        fuse != 0, cifops::parse_reduction(reduction, fn), symmetric != 0);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  return PyBool_FromLong(fused);
}

static PyObject* py_cif_workspace_size(PyObject*, PyObject* args) {
  long long batch = 0, frames = 0;
  if (!PyArg_ParseTuple(args, "LL", &batch, &frames)) return nullptr;
  const cifops::CifWorkspaceSize size = cifops::cif_workspace_size(batch, frames);
  return Py_BuildValue("(LL)", static_cast<long long>(size.real),
                       static_cast<long long>(size.ints));
}

// {name: code} of an enum's values.
static PyObject* int_dict(std::initializer_list<std::pair<const char*, long>> items) {
  PyObject* dict = PyDict_New();
  for (const auto& [name, code] : items) {
    PyObject* value = dict == nullptr ? nullptr : PyLong_FromLong(code);
    if (value == nullptr || PyDict_SetItemString(dict, name, value) < 0) {
      Py_XDECREF(value);
      Py_XDECREF(dict);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return dict;
}

static PyObject* compute_dtypes() {
  const std::pair<at::ScalarType, const char*> names[] = {{at::kHalf, "float16"},
                                                          {at::kBFloat16, "bfloat16"},
                                                          {at::kFloat, "float32"},
                                                          {at::kDouble, "float64"}};
  auto name = [&](at::ScalarType t) {
    for (const auto& [type, type_name] : names)
      if (type == t) return type_name;
    return "unknown";
  };
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& [type, type_name] : names) {
    PyObject* value = PyUnicode_FromString(name(cifops::compute_type(type)));
    if (value == nullptr || PyDict_SetItemString(dict, type_name, value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return dict;
}

static PyMethodDef kMethods[] = {
    {"contrastive_fuses_student_grad", py_contrastive_fuses_student_grad, METH_VARARGS,
     "contrastive_fuses_student_grad(fuse_student_grad, reduction, symmetric) -> bool"},
    {"cif_workspace_size", py_cif_workspace_size, METH_VARARGS,
     "cif_workspace_size(B, T) -> (len(scan_real), len(scan_int))"},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "cifops compiled operator library", -1, kMethods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "torch_version", CIFOPS_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", kWithCuda) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", CIFOPS_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "cuda_version", CIFOPS_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "compiler", kCompiler) < 0 ||
      PyModule_AddIntConstant(m, "cplusplus", static_cast<long>(__cplusplus)) < 0 ||
      PyModule_AddIntConstant(m, "cxx11_abi", kCxx11Abi) < 0 ||
      PyModule_AddIntConstant(m, "openmp", kOpenMP) < 0 ||
      PyModule_AddIntConstant(m, "cif_row_real", cifops::kRowReal) < 0 ||
      PyModule_AddIntConstant(m, "cif_row_info", cifops::kRowInfo) < 0 ||
      PyModule_AddIntConstant(m, "contrastive_stat_rows", cifops::kStatRows) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  using namespace cifops;
  const std::pair<const char*, PyObject*> objects[] = {
      {"compute_dtypes", compute_dtypes()},
      {"cif_status", int_dict({{"ok", kCifOk},
                               {"bad_alpha", kCifBadAlpha},
                               {"bad_length", kCifBadLength},
                               {"bad_target", kCifBadTarget},
                               {"zero_sum_target", kCifZeroSumTarget},
                               {"too_many_tokens", kCifTooManyTokens},
                               {"bad_stream_state", kCifBadStreamState}})},
      {"cif_stream_state_error", int_dict({{"ok", kStateOk},
                                           {"negative_frames", kStateNegativeFrames},
                                           {"negative_tokens", kStateNegativeTokens},
                                           {"bad_prefix", kStateBadPrefix},
                                           {"prefix_no_frames", kStatePrefixNoFrames},
                                           {"tokens_disagree", kStateTokensDisagree}})}};
  bool added = true;
  for (const auto& [name, object] : objects) {
    added = added && object != nullptr && PyModule_AddObjectRef(m, name, object) == 0;
    Py_XDECREF(object);
  }
  if (!added) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
