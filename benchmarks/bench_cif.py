"""CIF forward+backward: cifops against the peer implementations.

    pytest benchmarks/bench_cif.py --benchmark-json=cif.json
    python benchmarks/summarize.py cif.json          # ratios as a markdown table

Inputs are fresh random tensors (weights uniform in [0, 0.6), about 0.3 tokens
per frame, the regime where every peer is correct); the timed call runs the
forward, a backward of a fixed random projection of the output, and (on CUDA)
a synchronisation. On CUDA the sizes are the GPU issue's (B=32 T=200 D=256,
B=32 T=600 D=512, B=64 T=1500 D=512) in float32 and bfloat16, with each call's
peak extra memory in extra_info, plus the forward alone (with max_tokens) and the
device-to-device copy bandwidth measured in the same run. benchmarks/gpu_bench.py
times the same cases with CUDA events in one process (benchmarks/gpu_check.sh).
"""

import pytest
import torch

import cifops

from peers import available_peers

PEERS = available_peers()
CPU_SIZES = [(16, 300, 256), (32, 600, 512)]
CUDA_SIZES = [(32, 200, 256), (32, 600, 512), (64, 1500, 512)]
# The FunASR loop takes ~28 s per call at B=32, T=600 on 2 cores: small size only.
SLOW = {("funasr_cif", (32, 600, 512)), ("funasr_cif", (64, 1500, 512))}
CUDA = torch.cuda.is_available()
CASES = [("cpu", size, torch.float32) for size in CPU_SIZES]
if CUDA:
    CASES += [("cuda", size, dtype) for size in CUDA_SIZES for dtype in (torch.float32, torch.bfloat16)]


def make_inputs(B, T, D, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(device, dtype).requires_grad_()
    alphas = (torch.rand(B, T, generator=g) * 0.6).to(device).requires_grad_()
    return hidden, alphas


def _case_id(case):
    device, size, dtype = case
    return "%s-B%d-T%d-D%d-" % ((device,) + size) + str(dtype).split(".")[1]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", sorted(PEERS))
def test_cif_forward_backward(benchmark, impl, case):
    device, size, dtype = case
    if (impl, size) in SLOW:
        pytest.skip("the FunASR Python loop is too slow at this size (~28 s a call)")
    if impl.startswith("funasr") and dtype == torch.bfloat16:
        pytest.skip("FunASR's CIF fails on bfloat16")
    hidden, alphas = make_inputs(*size, device, dtype=dtype)
    fn = PEERS[impl]
    with torch.no_grad():
        probe = torch.randn(fn(hidden, alphas).shape[1:], device=device, dtype=dtype)

    def step():
        out = fn(hidden, alphas)
        loss = (out * probe[: out.shape[1]]).float().sum()
        hidden.grad = alphas.grad = None
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"cif {device} B={size[0]} T={size[1]} D={size[2]} {dtype}"
    benchmark.extra_info.update(impl=impl, device=device, threads=torch.get_num_threads())
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark(step)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cif_forward_bandwidth_cuda(benchmark, dtype):
    """Forward alone at B=64 T=1500 D=512 with max_tokens (no sync), as bytes moved
    (hidden read once, embeddings written once) over time, beside a device-to-device
    copy measured in the same run; both in extra_info."""
    B, T, D = 64, 1500, 512
    hidden, alphas = make_inputs(B, T, D, "cuda", dtype=dtype)
    with torch.no_grad():
        n = int(cifops.cif(hidden, alphas).embeds.shape[1])
    x = torch.randn(64 * 2**20, device="cuda")
    y = torch.empty_like(x)

    def timed(fn, reps=30):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps * 1e-3

    copy_tbps = 2 * x.numel() * 4 / timed(lambda: y.copy_(x)) / 1e12

    def forward():
        with torch.no_grad():
            cifops.cif(hidden, alphas, max_tokens=n)

    seconds = timed(forward)
    nbytes = (B * T * D + B * n * D) * hidden.element_size() + B * T * 4
    benchmark.extra_info.update(
        copy_tbps=copy_tbps,
        forward_tbps=nbytes / seconds / 1e12,
        fraction_of_copy=nbytes / seconds / 1e12 / copy_tbps,
        gpu=torch.cuda.get_device_name(),
    )
    benchmark.group = f"cif cuda forward B=64 T=1500 D=512 {dtype}"

    def step():
        forward()
        torch.cuda.synchronize()

    benchmark(step)
