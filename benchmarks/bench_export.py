"""CIF in ONNX Runtime: the exported cifops op against FunASR's exported CIF.

    pytest benchmarks/bench_export.py --benchmark-only -p no:cacheprovider

One long utterance, B=1, T=1000, D=512 float32 on the CPU (the inputs of bench_cif.py:
weights uniform in [0, 0.6), about 300 tokens, where FunASR's CIF is correct). cifops is
exported with cifops.onnx_export (max_tokens=400, dynamic B and T); FunASR's CIF is
exported the way FunASR exports Paraformer: torch.onnx.export (the TorchScript
exporter, opset 14, dynamic axes) of a module calling its @torch.jit.script functions,
``cif_export`` (the loop over frames, an ONNX Loop) and ``cif_v1_export`` (the cumsum
version FunASR's exporter uses since pull request 1791). Every session gets the same
options: torch's intra-op thread count, one inter-op thread. Eager ``cifops.cif`` on the
same input is timed for reference. Each session's output is checked against eager
cifops before timing.
"""

import contextlib
import io
import warnings

import pytest
import torch

import cifops

from bench_cif import make_inputs

ort = pytest.importorskip("onnxruntime", reason="the ONNX benchmarks need onnxruntime")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

B, T, D = 1, 1000, 512
MAX_TOKENS = 400
IMPLS = ["cifops_onnx", "funasr_cif_export_onnx", "funasr_cif_v1_export_onnx", "cifops_eager"]


class CifopsCif(torch.nn.Module):
    def forward(self, hidden, alphas):
        out = cifops.cif(hidden, alphas, max_tokens=MAX_TOKENS)
        return out.embeds, out.token_lengths


def _funasr_module(name):
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        from funasr.models.paraformer import cif_predictor  # prints noise about torch_complex
    fn = getattr(cif_predictor, name)

    class FunasrCif(torch.nn.Module):
        def forward(self, hidden, alphas):
            return fn(hidden, alphas, 1.0)

    return FunasrCif()


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    hidden, alphas = (x.detach() for x in make_inputs(B, T, D, "cpu"))
    feed = {"hidden": hidden.numpy(), "alphas": alphas.numpy()}
    folder = tmp_path_factory.mktemp("onnx")
    with torch.no_grad():
        ref = cifops.cif(hidden, alphas)
    n = int(ref.token_lengths[0])
    runs = {"cifops_eager": lambda: cifops.cif(hidden, alphas, max_tokens=MAX_TOKENS)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        b, t = torch.export.Dim("B"), torch.export.Dim("T")
        path = str(folder / "cifops.onnx")
        example = (hidden.expand(2, -1, -1), alphas.expand(2, -1))  # a dynamic B must not be 1
        cifops.onnx_export(
            CifopsCif(),
            example,
            path,
            verbose=False,
            input_names=["hidden", "alphas"],
            dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}),
        )
        sessions = {"cifops_onnx": _session(path)}
        for name in ("cif_export", "cif_v1_export"):
            path = str(folder / f"funasr_{name}.onnx")
            torch.onnx.export(
                _funasr_module(name),
                (hidden[:, :50], alphas[:, :50]),
                path,
                dynamo=False,
                opset_version=14,
                input_names=["hidden", "alphas"],
                output_names=["embeds", "fires"],
                dynamic_axes={"hidden": {0: "B", 1: "T"}, "alphas": {0: "B", 1: "T"}},
            )
            sessions[f"funasr_{name}_onnx"] = _session(path)
    for impl, session in sessions.items():
        embeds = torch.from_numpy(session.run(None, feed)[0])[0]
        assert embeds.shape[0] >= n, impl
        torch.testing.assert_close(embeds[:n], ref.embeds[0], rtol=1e-4, atol=1e-4)
        runs[impl] = (lambda s: lambda: s.run(None, feed))(session)
    return runs


@pytest.mark.parametrize("impl", IMPLS)
def test_onnx_runtime_cif(benchmark, runners, impl):
    benchmark.group = f"ONNX Runtime CIF, CPU, B={B} T={T} D={D} float32"
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["onnxruntime"] = ort.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.no_grad():
        benchmark(runners[impl])
