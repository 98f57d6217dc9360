"""CIF forward+backward: cifops against the peer implementations.

    pytest benchmarks/bench_cif.py --benchmark-json=cif.json
    python benchmarks/summarize.py cif.json          # ratios as a markdown table

Inputs are fresh random tensors (weights uniform in [0, 0.6), about 0.3 tokens
per frame, the regime where every peer is correct); the timed call runs the
forward, a backward of a fixed random projection of the output, and (on CUDA)
a synchronisation.
"""
import pytest
import torch

from peers import available_peers

PEERS = available_peers()
SIZES = [(16, 300, 256), (32, 600, 512)]
# The FunASR loop takes ~28 s per call at B=32, T=600 on 2 cores: small size only.
SLOW = {("funasr_cif", (32, 600, 512))}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(B, T, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(device).requires_grad_()
    alphas = (torch.rand(B, T, generator=g) * 0.6).to(device).requires_grad_()
    return hidden, alphas


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B%d-T%d-D%d" % s)
@pytest.mark.parametrize("impl", sorted(PEERS))
def test_cif_forward_backward(benchmark, impl, size, device):
    if (impl, size) in SLOW:
        pytest.skip("the FunASR Python loop is too slow at this size (~28 s a call)")
    hidden, alphas = make_inputs(*size, device)
    fn = PEERS[impl]
    with torch.no_grad():
        probe = torch.randn(fn(hidden, alphas).shape[1:], device=device)

    def step():
        out = fn(hidden, alphas)
        loss = (out * probe[: out.shape[1]]).sum()
        hidden.grad = alphas.grad = None
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"cif {device} B={size[0]} T={size[1]} D={size[2]} float32"
    benchmark.extra_info.update(impl=impl, device=device, threads=torch.get_num_threads())
    benchmark(step)
