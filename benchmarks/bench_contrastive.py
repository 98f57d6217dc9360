"""Benchmarks of cifops.contrastive_loss against its peers (pytest-benchmark).

    pytest benchmarks/bench_contrastive.py                       # timings
    pytest benchmarks/bench_contrastive.py --benchmark-disable   # each case once (~1 min)

Cases, at the sizes of the issue in both modes:
  * memory: forward + backward at N = M = 16384, D = 384, float32 on the CPU, student
    and teacher both requiring grad, in a fresh subprocess; the rise of peak RSS
    (resource.getrusage ru_maxrss) over the inputs must stay under 256 MiB. The naive
    loss would need 1 GiB for each N x M matrix.
  * CPU speed: forward + backward at N = M = 4096, D = 384, float32, 2 threads, frozen
    teacher (the HKD setting): the fused op, the naive PyTorch loss (F.normalize +
    matmul + F.cross_entropy), and their median ratio measured in the same run.
  * GPU (skipped without one): the GPU issue's sizes (N = M = 2048 to 32768, D = 768
    bfloat16 and D = 384 float32; frozen teacher, trainable teacher, symmetric): the
    fused op, the naive loss (eager and torch.compile) and Inf-CL (skipped when the
    inf_cl package is not installed), synchronising inside the timed call.
Results and the machine they were measured on: benchmarks/RESULTS.md.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import cifops

TEMPERATURE = 0.02
CPU_THREADS = 2
SPEED_N, SPEED_D = 4096, 384
MEMORY_N, MEMORY_D = 16384, 384
MEMORY_BUDGET_MIB = 256


def fused_step(student, teacher):
    s = student.detach().requires_grad_(True)
    cifops.contrastive_loss(s, teacher, temperature=TEMPERATURE, reduction="sum").backward()
    return s.grad


def naive_step(student, teacher):
    s = student.detach().requires_grad_(True)
    logits = F.normalize(s, dim=1) @ F.normalize(teacher, dim=1).T / TEMPERATURE
    targets = torch.arange(len(s), device=s.device)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    return s.grad


@pytest.fixture(scope="module")
def cpu_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield CPU_THREADS
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cpu_inputs(cpu_threads):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(SPEED_N, SPEED_D, generator=gen), torch.randn(SPEED_N, SPEED_D, generator=gen))


def _info(benchmark, **extra):
    benchmark.extra_info.update(torch=torch.__version__, threads=torch.get_num_threads(), **extra)


# --- CPU speed -------------------------------------------------------------------------


@pytest.mark.benchmark(group="contrastive-cpu-4096x4096x384")
def test_cpu_fused(benchmark, cpu_inputs):
    _info(benchmark, impl="cifops.contrastive_loss")
    benchmark.pedantic(fused_step, args=cpu_inputs, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="contrastive-cpu-4096x4096x384")
def test_cpu_naive(benchmark, cpu_inputs):
    _info(benchmark, impl="naive F.normalize + matmul + F.cross_entropy")
    benchmark.pedantic(naive_step, args=cpu_inputs, rounds=5, warmup_rounds=1)


def _median_seconds(fn, args, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.benchmark(group="contrastive-cpu-ratio")
def test_cpu_fused_vs_naive_same_run(benchmark, cpu_inputs):
    """Interleaved medians of both in one run (the machine is shared: interleaving
    spreads other load over both). Reported, not asserted: the goal is ratio <= 1."""
    fused_step(*cpu_inputs)  # warm up both (thread pools, allocator)
    naive_step(*cpu_inputs)
    fused, naive = [], []
    for _ in range(5):
        fused.append(_median_seconds(fused_step, cpu_inputs, 1))
        naive.append(_median_seconds(naive_step, cpu_inputs, 1))
    ratio = statistics.median(fused) / statistics.median(naive)
    _info(
        benchmark,
        fused_median_s=statistics.median(fused),
        naive_median_s=statistics.median(naive),
        fused_over_naive=ratio,
    )
    print(
        f"\ncontrastive CPU {SPEED_N}x{SPEED_N}x{SPEED_D} float32, {torch.get_num_threads()} "
        f"threads: fused {statistics.median(fused) * 1e3:.0f} ms, naive "
        f"{statistics.median(naive) * 1e3:.0f} ms, fused / naive = {ratio:.2f}"
    )
    # the timed part of this case: one fused step (the ratio above is the result)
    benchmark.pedantic(fused_step, args=cpu_inputs, rounds=1, warmup_rounds=0)


# --- CPU memory ---------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, resource, sys, time
import torch
import cifops
torch.set_num_threads(int(sys.argv[3]))
n, d = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
student = torch.randn(n, d, generator=gen).requires_grad_(True)
teacher = torch.randn(n, d, generator=gen).requires_grad_(True)
# load the kernels and the thread pool before the baseline
small_s, small_t = student[:64].detach().requires_grad_(True), teacher[:64].detach()
cifops.contrastive_loss(small_s, small_t).backward()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
with open("/proc/self/status") as status:
    rss = int(next(l for l in status if l.startswith("VmRSS")).split()[1])
# ru_maxrss survives exec: the baseline must be this process's own peak
assert baseline <= 1.05 * rss, f"ru_maxrss {baseline} KiB was inherited (RSS {rss} KiB)"
start = time.perf_counter()
loss = cifops.contrastive_loss(student, teacher, temperature=0.02, reduction="sum")
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert student.grad is not None and teacher.grad is not None
print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "seconds": seconds,
                  "loss": loss.item()}))
"""


def test_cpu_memory_16384(benchmark, cpu_threads):
    """Peak RSS rise of forward + backward (student and teacher gradients) in a fresh
    process; asserted against the budget."""

    def run():
        # Linux keeps ru_maxrss across exec, and a child spawned straight from this
        # (large) process would start with its peak: a small launcher process spawns
        # the measured one, which then starts from the launcher's few MiB.
        launcher = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                launcher,
                sys.executable,
                "-c",
                _MEMORY_SCRIPT,
                str(MEMORY_N),
                str(MEMORY_D),
                str(CPU_THREADS),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, OMP_NUM_THREADS=str(CPU_THREADS)),
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    rise_mib = (result["peak_kib"] - result["baseline_kib"]) / 1024
    inputs_mib = 2 * MEMORY_N * MEMORY_D * 4 / 2**20
    _info(
        benchmark,
        peak_rss_rise_mib=rise_mib,
        inputs_mib=inputs_mib,
        naive_logits_mib=MEMORY_N * MEMORY_N * 4 / 2**20,
        seconds=result["seconds"],
    )
    print(
        f"\ncontrastive CPU memory {MEMORY_N}x{MEMORY_N}x{MEMORY_D} float32: peak RSS rise "
        f"{rise_mib:.0f} MiB (inputs {inputs_mib:.0f} MiB, one naive N x M matrix "
        f"{MEMORY_N * MEMORY_N * 4 / 2**20:.0f} MiB), forward + backward "
        f"{result['seconds']:.1f} s"
    )
    assert rise_mib <= MEMORY_BUDGET_MIB, f"peak RSS rose by {rise_mib:.0f} MiB"


# --- GPU -----------------------------------------------------------------------------------
# The GPU issue's cases: forward + backward, temperature 0.02, reduction "sum", against
# naive PyTorch (eager and torch.compile) and Inf-CL, each call's peak extra memory in
# extra_info. benchmarks/gpu_bench.py times the same cases with CUDA events in one
# process, with the accuracy check (benchmarks/gpu_check.sh).

GPU = torch.cuda.is_available() and cifops.build_info()["cuda"]
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU and cifops built with CUDA")
GPU_CASES = [
    (2048, 768, "bfloat16", "frozen"),
    (8192, 768, "bfloat16", "frozen"),
    (32768, 768, "bfloat16", "frozen"),
    (8192, 768, "bfloat16", "teacher"),
    (32768, 768, "bfloat16", "teacher"),
    (8192, 768, "bfloat16", "symmetric"),
    (32768, 768, "bfloat16", "symmetric"),
    (32768, 384, "float32", "frozen"),
]


def _gpu_step(impl, mode):
    symmetric = mode == "symmetric"

    def naive(s, t):
        logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / TEMPERATURE
        y = torch.arange(len(s), device=s.device)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.float().T, y, reduction="sum"))
        return loss

    if impl == "cifops":

        def loss_fn(s, t):
            return cifops.contrastive_loss(s, t, temperature=TEMPERATURE, reduction="sum", symmetric=symmetric)
    elif impl == "naive":
        loss_fn = naive
    elif impl == "naive_compiled":
        loss_fn = torch.compile(naive)
    else:
        inf_cl = pytest.importorskip("inf_cl")
        if mode != "frozen":
            pytest.skip("Inf-CL is compared in the frozen-teacher case")

        def loss_fn(s, t):  # Inf-CL takes normalised features and a logit scale
            return inf_cl.cal_inf_loss(F.normalize(s, dim=1), F.normalize(t, dim=1), scale=1.0 / TEMPERATURE).sum()

    def step(student, teacher):
        s = student.detach().requires_grad_(True)
        t = teacher.detach().requires_grad_(mode != "frozen")
        loss_fn(s, t).backward()
        torch.cuda.synchronize()
        return s.grad

    return step


@needs_gpu
@pytest.mark.parametrize("impl", ["cifops", "naive", "naive_compiled", "inf_cl"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "N%d-D%d-%s-%s" % c)
def test_gpu_forward_backward(benchmark, case, impl):
    N, D, dtype, mode = case
    gen = torch.Generator(device="cuda").manual_seed(N)
    student = torch.randn(N, D, device="cuda", generator=gen).to(getattr(torch, dtype))
    teacher = (student.float() + 0.5 * torch.randn(N, D, device="cuda", generator=gen)).to(student.dtype)
    step = _gpu_step(impl, mode)
    step(student, teacher)  # warm-up (and compilation)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(student, teacher)
    _info(
        benchmark,
        impl=impl,
        device=torch.cuda.get_device_name(),
        peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
    )
    benchmark.group = f"contrastive-gpu-N{N}-D{D}-{dtype}-{mode}"
    benchmark.pedantic(step, args=(student, teacher), rounds=10, warmup_rounds=2)
