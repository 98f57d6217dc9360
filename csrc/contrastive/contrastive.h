// cifops fused contrastive (InfoNCE) loss: the contract, the shapes and the
// entry points. Free of torch headers, like every kernel header, so that the kernels
// can be built and tested outside the extension.
//
// ---------------------------------------------------------------------------
// The loss (cifops/_contrastive.py repeats it in contrastive_loss's docstring)
//
//   inputs   student x    [N][D]
//            teacher y    [M][D]
//            targets      [N] int64, optional; None means targets_i = i (then M >= N)
//            temperature  tau > 0
//
//   unit rows     s_i = x_i / max(||x_i||, eps),  t_j = y_j / max(||y_j||, eps)
//                 (eps = 1e-6; with normalize=False, s = x and t = y)
//   logits        z_ij = (s_i . t_j) / tau                            [N][M], never stored
//   row loss      l_i  = lse_j z_ij - z_{i, targets_i}
//                 0 and not counted when targets_i == ignore_index
//   column loss   l'_j = lse_i z_ij - z_jj           (symmetric=True: targets None, N == M)
//   per row       r_i  = l_i,  or (l_i + l'_i) / 2 when symmetric
//   loss          "none": r [N];  "sum": sum_i r_i;  "mean": sum_i r_i / #counted
//
// Gradients. With per-row weights a_i = dLoss/dl_i (0 for ignored rows) and
// per-column weights b_j = dLoss/dl'_j (symmetric only, else 0):
//
//   G_ij    = dLoss/dz_ij = a_i (P_ij - [j == targets_i]) + b_j (Q_ij - [i == j])
//             P_ij = exp(z_ij - lse_i),  Q_ij = exp(z_ij - clse_j)   (row / column softmax)
//   dL/ds_i = (1/tau) sum_j G_ij t_j          dL/dt_j = (1/tau) sum_i G_ij s_i
//   dL/dx_i = (dL/ds_i - s_i (s_i . dL/ds_i)) / ||x_i||   if ||x_i|| >= eps
//           = dL/ds_i / eps                               otherwise (the clamp is constant)
//   dL/dtau = -(1/tau) sum_ij G_ij z_ij
//           = -(1/tau) sum_i [ a_i (E_i - z_{i,targets_i}) + b_i (E'_i - z_ii) ]
//             with E_i = sum_j P_ij z_ij and E'_j = sum_i Q_ij z_ij (expected logits),
//             so the temperature gradient needs no pass over the tiles.
//
// Both directions are the same computation with the roles of the two sides
// swapped: the column statistics of (x, y) are the row statistics of (y, x),
// and dL/dt is the "row gradient" of (y, x) with the two softmax terms swapped.
// The kernels are therefore written once for an A side (rows, [R][D]) and a B
// side (columns, [C][D]):
//
//   row pass   for each row r of A: online over column tiles of B,
//              m_r = running max, l_r = sum_c exp(z_rc - m_r), e_r = sum_c exp(z_rc - m_r) z_rc
//              -> lse_r = m_r + log l_r, E_r = e_r / l_r, z_r,target, argmax_r.
//              Optionally (CPU, scalar loss, not symmetric) it also accumulates
//              acc_r = sum_c exp(z_rc - m_r) b_c, rescaled when m_r grows, and finishes
//              dL/ds_r = (a_r / tau) (acc_r / l_r - b_{target_r}): the student gradient
//              falls out of the forward and the backward only scales it.
//   grad pass  for each row r of A: sum_c G_rc b_c over column tiles of B, the tiles
//              recomputed from the saved log-sum-exps, with
//              G_rc = wr_r (exp(z_rc - lser_r) - [c == tr_r]) + wc_c (exp(z_rc - lsec_c) - [r ==
//              tc_c]). Student gradient: A = s, B = t, (wr, lser, tr) = (a, lse, targets),
//                                (wc, lsec, tc) = (b, clse, identity) when symmetric.
//              Teacher gradient: A = t, B = s, (wr, lser, tr) = (b, clse, identity) when
//                                symmetric, (wc, lsec, tc) = (a, lse, targets).
//   Memory: the unit copies of both sides, O((N + M) D), plus one tile per thread.
//   Nothing is N x M.
// That is the CPU's structure (contrastive_cpu.cpp). The CUDA binding computes the
// same quantities by chunks of rows of A instead: the logit block of a chunk by cuBLAS,
// its statistics and G rows by one kernel, then G . B and G^T . A_chunk by cuBLAS, in a
// fixed workspace (the CUDA entry points at the end of this file).
// ---------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>

#include "common/types.h"  // ScalarKind, ParallelFor, CIFOPS_HD

namespace cifops {

// The norm clamp of the normalisation (as torch.nn.functional.normalize's eps).
constexpr double kContrastiveNormEps = 1e-6;

// Rows of the per-row statistics tensor [kStatRows][N] saved by the forward.
enum ContrastiveStat : int {
  kStatLse = 0,        // lse_i over the teacher rows
  kStatExpect = 1,     // E_i, expected logit under the row softmax
  kStatTarget = 2,     // z_{i, targets_i} (0 for ignored rows, NaN for a bad target on CUDA)
  kStatColLse = 3,     // clse_i over the student rows (symmetric), else 0
  kStatColExpect = 4,  // E'_i (symmetric), else 0
  kStatColTarget = 5,  // z_ii as seen by the column pass (symmetric), else 0
  kStatRows = 6,
};

// One softmax direction of G: its per-index weights, log-sum-exps (acc_t arrays)
// and the index of its positive. `weight == nullptr` means the term is absent.
// `target == nullptr` means the identity (the positive of index i is i). Arrays
// are indexed by the A row for the row term and by the B row for the column term.
struct SoftmaxTerm {
  const void* weight = nullptr;
  const void* lse = nullptr;
  const int64_t* target = nullptr;
};

// Sizes and scalars of one pass. A is [rows][dim] (stored [rows_padded][dim_padded]),
// B is [cols][dim] (stored [cols_padded][dim_padded]); padding is zero.
struct ContrastivePass {
  int64_t rows = 0;              // R
  int64_t cols = 0;              // C
  int64_t dim = 0;               // D
  int64_t dim_padded = 0;        // row stride of the unit copies
  double inv_temperature = 1.0;  // CPU: the value; CUDA reads it from a device pointer
  int64_t ignore_index = -100;
};

// Outputs of the row pass. Any pointer may be null (not wanted), except lse.
template <typename acc_t>
struct RowStats {
  acc_t* lse = nullptr;           // [R]
  acc_t* expect = nullptr;        // [R]
  acc_t* target_logit = nullptr;  // [R]
  int64_t* argmax = nullptr;      // [R]; with only argmax wanted, lse may be null too
};

// The positive column of row r, or -1 when the row is ignored.
CIFOPS_HD int64_t contrastive_target(const int64_t* target, int64_t r, int64_t ignore_index) {
  if (target == nullptr) return r;
  const int64_t t = target[r];
  return t == ignore_index ? -1 : t;
}

// ||x|| of one row without overflow or underflow for any finite input: the sum of
// squares is taken of x / max|x| in double (float32 squares overflow above 1.8e19,
// double ones above 1.3e154).
template <typename T>
CIFOPS_HD double contrastive_row_norm(const T* x, int64_t D) {
  double amax = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = static_cast<double>(x[d]);
    const double a = v < 0 ? -v : v;
    amax = a > amax ? a : amax;
  }
  if (!(amax > 0.0) || amax - amax != 0.0) return amax;  // zero row, or inf/NaN (propagate)
  const double inv = 1.0 / amax;
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = static_cast<double>(x[d]) * inv;
    sum += v * v;
  }
  return amax * sqrt(sum);
}

// 1 / max(||x||, eps), the factor of the unit row (kept in double: the backward
// tells the clamped rows apart by it).
CIFOPS_HD double contrastive_inv_norm(double norm) {
  return 1.0 / (norm < kContrastiveNormEps ? kContrastiveNormEps : norm);
}

// Whether the clamp was active: then the normalisation is a constant scaling and
// its backward has no projection term.
CIFOPS_HD bool contrastive_norm_clamped(double inv_norm) {
  return inv_norm >= 1.0 / kContrastiveNormEps;
}

// ----------------------------------------------------------------------------
// CPU entry points (csrc/contrastive/contrastive_cpu.cpp); `kind` is float32 or
// float64 (the binding converts half inputs to float32).
//
// The CPU kernels tile rows in blocks of kCpuRowBlock and columns in panels of
// contrastive_cpu_panel(kind) so every side is padded to a multiple of both.
constexpr int64_t kCpuRowBlock = 48;
int64_t contrastive_cpu_panel(ScalarKind kind);
int64_t contrastive_cpu_padded_rows(int64_t rows);
int64_t contrastive_cpu_padded_dim(ScalarKind kind, int64_t dim);

// One side (student or teacher) as the side entry points read and write it, filled by
// name (as ContrastiveCpuParams); what a call does not read or write stays null. Host
// pointers for the CPU, device pointers for CUDA.
//   prepare (contrastive_prepare_cpu / _cuda) reads x and writes inv_norm [rows] double
//     (1 / max(||x||, eps), or 1 without normalize) and unit = x * inv_norm (x itself
//     without normalize): on the CPU [rows_padded][dim_padded] with zero padding, and
//     packed where it is not null (the same rows as column panels
//     [rows_padded / panel][dim_padded][panel], the layout the logit kernel streams); on
//     CUDA unit is [rows][dim] and packed is not used.
//   unit backward (contrastive_unit_backward_cuda) reads x, inv_norm, grad_unit and
//     out_scale and writes grad_x (see there).
struct ContrastiveSideParams {
  ScalarKind kind = ScalarKind::kFloat32;  // x's dtype (the CPU: float32 or float64)
  int64_t rows = 0;
  int64_t dim = 0;
  bool normalize = true;
  const void* x = nullptr;     // [rows][dim], contiguous
  double* inv_norm = nullptr;  // [rows]
  void* unit = nullptr;
  void* packed = nullptr;  // CPU only; may be null

  const void* grad_unit = nullptr;  // [rows][dim] acc_t, sum_c G_rc B_c
  const void* out_scale = nullptr;  // one acc_t on the device: 1/tau over G's scale
  bool out_acc = false;             // grad_x in acc_t, else in x's dtype
  void* grad_x = nullptr;           // [rows][dim]
};

void contrastive_prepare_cpu(const ContrastiveSideParams& side, const ParallelFor& parallel_for);

// The arguments of a CPU row or grad pass, filled by name (as FlashAttention's
// Flash_fwd_params); what a pass does not read stays null. The A side (rows) and the B
// side (columns) are as contrastive_prepare_cpu wrote them.
struct ContrastiveCpuParams {
  ScalarKind kind = ScalarKind::kFloat32;  // float32 or float64
  ContrastivePass pass;                    // sizes and scalars
  const void* a_unit = nullptr;            // [Rp][Dp]
  const double* a_inv_norm = nullptr;      // [R]; read with fused_weight and by the grad pass
  bool normalize = true;                   // whether a_unit is x * a_inv_norm
  const void* b_packed = nullptr;          // [Cp / panel][Dp][panel]
  const void* b_unit = nullptr;            // [Cp][Dp]; read with fused_weight and by the grad pass

  // Row pass. The positives (null: the identity) and the statistics to write [R], each
  // null when not wanted; lse may be null only when argmax alone is wanted. Every row's
  // argmax is the first maximal column. With fused_weight [R] non-null it also writes
  // fused_grad [R][D] = sum_r fused_weight_r dl_r/dx_r, through the normalisation of A.
  const int64_t* target = nullptr;
  void* lse = nullptr;
  void* expect = nullptr;
  void* target_logit = nullptr;
  int64_t* argmax = nullptr;
  const void* fused_weight = nullptr;
  void* fused_grad = nullptr;

  // Grad pass: the two softmax terms of G and grad_x [R][D] = dLoss/dx for the A side,
  // through its normalisation.
  SoftmaxTerm row_term;
  SoftmaxTerm col_term;
  void* grad_x = nullptr;
};

// The row pass of A against B (see the header comment).
void contrastive_row_pass_cpu(const ContrastiveCpuParams& params, const ParallelFor& parallel_for);

// The grad pass.
void contrastive_grad_pass_cpu(const ContrastiveCpuParams& params, const ParallelFor& parallel_for);

// ----------------------------------------------------------------------------
// CUDA entry points (csrc/contrastive/contrastive_cuda.cu): device pointers, the
// stream passed through void*, a cudaError_t (as int) returned. The compute type
// acc_t is float for float16/bfloat16/float32 inputs and double for float64. The
// products themselves are cuBLAS calls made by the binding (contrastive_cuda_op.cpp):
// per chunk of rows of A, logits = A_chunk . B^T in acc_t, then
// contrastive_softmax_rows_cuda, then G . B and G^T . A_chunk.

// A side's unit rows and inverse norms (ContrastiveSideParams: x, unit [rows][dim] in the
// input dtype, inv_norm).
int contrastive_prepare_cuda(const ContrastiveSideParams& side, void* stream);

// One chunk of logit rows for the softmax kernel. All statistics and weights are
// acc_t arrays indexed by the absolute row (row0 + r) or by the column.
struct ContrastiveChunk {
  const void* logits = nullptr;  // [rows][cols] acc_t, raw products (not divided by tau)
  int64_t rows = 0, cols = 0, row0 = 0;
  const void* inv_temperature = nullptr;  // one acc_t on the device
  int64_t ignore_index = -100;
  const int64_t* target = nullptr;  // the positives of the rows; null: the identity
  void* lse = nullptr;              // statistics to write, each may be null
  void* expect = nullptr;
  void* target_logit = nullptr;      // 0 for ignored rows, NaN for a target outside [0, cols)
  int64_t* argmax = nullptr;         // the first maximal column
  void* grad = nullptr;              // G [rows][cols] in the input dtype; null: not wanted
  const void* grad_scale = nullptr;  // one acc_t multiplying G (keeps float16 in range); null: 1
  SoftmaxTerm row;                   // a and lse by row (lse null: the one computed here)
  SoftmaxTerm col;                   // b and clse by column; positives the identity
};
int contrastive_softmax_rows_cuda(ScalarKind kind, const ContrastiveChunk& chunk, void* stream);

// The side's grad_x [rows][dim] (x's dtype, or acc_t with out_acc) from grad_unit =
// sum_c G_rc B_c [rows][dim] (acc_t): times *out_scale (1/tau over the G scale), then
// the backward of the normalisation (ContrastiveSideParams).
int contrastive_unit_backward_cuda(const ContrastiveSideParams& side, void* stream);

}  // namespace cifops
