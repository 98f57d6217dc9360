"""One optimizer step of the CIF-HKD recipe: cifhkd.train.train_update (copy of the batch
to the device, forward, backward, clipping, AdamW), as the trainer runs it.

    pytest benchmarks/bench_train_step.py --benchmark-json=step.json
    python benchmarks/summarize.py step.json
    python benchmarks/bench_train_step.py --threads 1 --steps 20 [--compile [BACKEND]]

- CPU: the demo's model (recipe/cifhkd/conf/demo.yaml: ModelConfig() with ACD weight 0.1, the 298-piece
  vocabulary, a 384-wide teacher) on a batch like the demo's (13 utterances of 1.35-1.5 s,
  3-9 tokens), float32, with 1 and 2 threads.
- CUDA (when present): the AISHELL-1 preset (model.aishell1_config(): 48.9 M parameters,
  4233 characters, a 768-wide teacher) on 32 utterances of 640-800 fbank frames with
  16-24 tokens, bf16 autocast, fused AdamW, pinned memory. Besides the wall time, five
  profiled steps give the GPU kernel time per step and the synchronisations per step
  (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls, and the
  cudaMemcpy(Async) calls, every copy being host-device; extra_info of the JSON).

The timed step ends with torch.cuda.synchronize() on CUDA.
"""

import argparse
import statistics
import time
from pathlib import Path

import pytest
import torch

from cifhkd import batch as batch_lib
from cifhkd import model as model_lib
from cifhkd import train as train_hkd

ROOT = Path(__file__).resolve().parents[1]

DEMO_VOCAB = 298  # WordPieces of the demo corpus (docs/hkd-recipe.md)
PRESETS = {
    # name: (batch size, frames (min, max), tokens (min, max), vocabulary, teacher width)
    "demo": (13, (135, 150), (3, 9), DEMO_VOCAB, 384),
    "aishell1": (32, (640, 800), (16, 24), 4233, 768),
}


def make_batch(preset: str, seed: int = 0) -> batch_lib.Batch:
    """A random batch prepared on the host, as batch.collate makes one."""
    size, (f0, f1), (t0, t1), vocab, teacher_dim = PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    feat_lens = torch.randint(f0, f1 + 1, (size,), generator=g)
    token_lens = torch.randint(t0, t1 + 1, (size,), generator=g)
    feat_lens[0], token_lens[0] = f1, t1
    feats = torch.randn(size, f1, 80, generator=g)
    tokens = torch.randint(3, vocab, (size, t1), generator=g)
    teacher = torch.randn(size, t1 + 1, teacher_dim, generator=g)
    return batch_lib.prepare_batch(batch_lib.Batch(feats, feat_lens, tokens, token_lens, teacher, token_lens + 1))


def setup(preset: str, device: torch.device, compile_backend=None):
    """-> step(): one training update of the preset on `device` (the trainer's code)."""
    if preset == "demo":
        args = train_hkd.parse_args(["--config", str(ROOT / "recipe" / "cifhkd" / "conf" / "demo.yaml")])
        config = train_hkd.model_config(args, DEMO_VOCAB)
    else:
        args = train_hkd.parse_args([])
        config = model_lib.aishell1_config()
    torch.manual_seed(0)
    model = model_lib.CifHkdModel(config).to(device).train()
    optimizer = train_hkd.make_optimizer(model, args, device)
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    batch = make_batch(preset)
    if compile_backend is not None:
        batch = batch_lib.prepare_batch(batch, token_multiple=8)
    if device.type == "cuda":
        batch = batch.pin_memory()
    scale = 1.0 / int((batch.token_lens + 1).sum())

    def step():
        train_hkd.train_update(model, forward, model, optimizer, [batch], args, device, scale=scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_CALLS = ("cudaMemcpy", "cudaMemcpyAsync")


def profile_cuda(step, steps: int = 5) -> dict:
    """Kernel time and synchronising calls per step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    calls = {e.key: e.count for e in prof.key_averages() if e.key in SYNC_CALLS + COPY_CALLS}
    return {
        "gpu_kernel_ms_per_step": kernel_us / 1e3 / steps,
        # the final torch.cuda.synchronize of each timed step is not the trainer's
        "syncs_per_step": sum(calls.get(k, 0) for k in SYNC_CALLS) / steps - 1,
        "memcpy_calls_per_step": sum(calls.get(k, 0) for k in COPY_CALLS) / steps,
        "calls": calls,
    }


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=lambda t: f"{t}-threads")
def test_train_step_cpu_demo(benchmark, threads):
    step = setup("demo", torch.device("cpu"))
    benchmark.group = f"train step cpu demo, {threads} thread(s)"
    benchmark.extra_info.update(
        impl="train_update", device="cpu", threads=threads, preset="demo", batch=PRESETS["demo"][0]
    )
    benchmark.pedantic(step, warmup_rounds=2, rounds=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_cuda_aishell1(benchmark):
    step = setup("aishell1", torch.device("cuda"))
    benchmark.group = "train step cuda aishell1 bf16"
    benchmark.extra_info.update(
        impl="train_update",
        device="cuda",
        preset="aishell1",
        batch=PRESETS["aishell1"][0],
        gpu=torch.cuda.get_device_name(),
    )
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)
    benchmark.extra_info.update(profile_cuda(step))


def main(argv=None):
    parser = argparse.ArgumentParser(description="time cifhkd.train.train_update (median of --steps)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: demo on the CPU, aishell1 on CUDA"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = args.preset or ("aishell1" if device.type == "cuda" else "demo")
    step = setup(preset, device, args.compile)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(
        f"{preset} on {device} ({torch.get_num_threads()} threads, compile {args.compile}): median "
        f"{1e3 * statistics.median(times):.1f} ms, mean {1e3 * statistics.mean(times):.1f} ms, min "
        f"{1e3 * min(times):.1f} ms over {args.steps} steps; warmup {warmup_s:.1f} s"
    )
    if device.type == "cuda":
        print(profile_cuda(step))


if __name__ == "__main__":
    main()
