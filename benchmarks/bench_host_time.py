"""The host time of one CIF forward+backward: what the op costs besides its kernels.

    pytest benchmarks/bench_host_time.py --benchmark-only
    python benchmarks/bench_host_time.py      # the three timings below, medians of runs

On a GPU the small and medium CIF sizes are bound by this time, not by the kernels
(issue 32), and it is the same work on any device: Python and C++ argument checks, the
autograd kernels, the allocation of the outputs. Measured here on tiny CPU tensors
(B=2, T=8, D=4, target_lengths and max_tokens given, so no device sync would happen on
CUDA) with one thread, where the kernels themselves take microseconds:

  cif_step   cifops.cif forward, then backward of embeds and alpha_sum (autograd), with
             the .grad of both inputs set to None before each step (as optimizer.zero_grad)
  ops_only   the same two ops called directly (torch.ops.cifops.cif_forward and
             cif_backward): the C++ checks, allocations and kernels, no autograd
  torch_ref  a forward+backward of two plain torch ops on the same inputs, with the same
             autograd engine round trip: the floor any op pays

cif_step - torch_ref is the op's own host time (what it costs over the engine round
trip that every differentiable op pays); cif_step - ops_only is its Python and autograd
path.
"""

import statistics
import sys
import time

import pytest
import torch

import cifops

B, T, D, N = 2, 8, 4, 4


def make_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g).requires_grad_()
    alphas = (torch.rand(B, T, generator=g) * 0.6).requires_grad_()
    target = torch.tensor([2, 3])
    return hidden, alphas, target


def make_steps():
    hidden, alphas, target = make_inputs()
    grad_embeds = torch.ones(B, N, D)
    grad_sum = torch.ones(B)

    def cif_step():
        hidden.grad = alphas.grad = None
        out = cifops.cif(hidden, alphas, target_lengths=target, max_tokens=N)
        torch.autograd.backward((out.embeds, out.alpha_sum), (grad_embeds, grad_sum))

    h, a = hidden.detach(), alphas.detach()

    def ops_only():
        out = torch.ops.cifops.cif_forward(h, a, None, target, 1.0, 1e-4, None, True, N)
        torch.ops.cifops.cif_backward(grad_embeds, grad_sum, h, a, out[4], out[5], 1.0, 1e-4, None, True)

    def torch_ref():
        hidden.grad = alphas.grad = None
        embeds, alpha_sum = hidden[:, :N] * 2.0, alphas.sum(1)
        torch.autograd.backward((embeds, alpha_sum), (grad_embeds, grad_sum))

    return {"cif_step": cif_step, "ops_only": ops_only, "torch_ref": torch_ref}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["cif_step", "ops_only", "torch_ref"])
def test_host_time(benchmark, one_thread, which):
    step = make_steps()[which]
    benchmark(step)


def measure(repeats=15, calls=400):
    """{name: median microseconds per call over `repeats` runs of `calls` calls}, the
    three steps interleaved run by run. The clock is this thread's CPU time
    (time.thread_time; with one torch thread the op and the autograd engine run on the
    calling thread): on a shared machine, wall time also counts the time other processes
    hold the core."""
    steps = make_steps()
    for f in steps.values():
        for _ in range(200):
            f()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, f in steps.items():
            t0 = time.thread_time()
            for _ in range(calls):
                f()
            times[name].append((time.thread_time() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}, times


def main():
    torch.set_num_threads(1)
    med, times = measure()
    print(
        f"cifops host time per CIF forward+backward, B={B} T={T} D={D} N={N} on the CPU, "
        f"1 thread, thread CPU time, torch {torch.__version__}"
    )
    for name, m in med.items():
        print(f"  {name:<10} {m:8.1f} us  (median; min {min(times[name]):.1f})")
    print(f"  cif_step - torch_ref = {med['cif_step'] - med['torch_ref']:.1f} us (the op's own host time)")
    print(f"  cif_step - ops_only  = {med['cif_step'] - med['ops_only']:.1f} us (its Python and autograd path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
