"""The CIF-HKD training step of the AISHELL-1 preset on the GPU, for benchmarks/gpu_check.sh.

    python benchmarks/gpu_step.py [--steps 20]

Times benchmarks/bench_train_step.py's CUDA step, the trainer's own update
(cifhkd.train.train_update on a prepared, pinned batch: 32 utterances of 640-800 frames,
48.9 M parameters, bf16 autocast, fused AdamW): the median wall time of --steps steps
(each ending with a synchronisation), then five profiled steps for the GPU kernel time
and the synchronisations per step.

A GPU image without the recipe's data dependencies (cifhkd.train imports numpy,
soundfile and, for YAML configs, PyYAML) cannot import the trainer; the step is then
the same update written out from cifhkd.model alone (prepare_batch, forward under bf16
autocast, backward of the loss times 1 / (target tokens), clipping, fused AdamW), and
the output says which one ran.
"""

import argparse
import statistics
import time

import torch


def model_only_step():
    """The update of cifhkd.train.train_update, from cifhkd.model alone (see above)."""
    from cifhkd import batch as batch_lib
    from cifhkd import model as model_lib

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = model_lib.CifHkdModel(model_lib.aishell1_config()).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # bench_train_step.make_batch's aishell1 preset
    size, f0, f1, t0, t1, vocab, teacher_dim = 32, 640, 800, 16, 24, 4233, 768
    g = torch.Generator().manual_seed(0)
    feat_lens = torch.randint(f0, f1 + 1, (size,), generator=g)
    token_lens = torch.randint(t0, t1 + 1, (size,), generator=g)
    feat_lens[0], token_lens[0] = f1, t1
    batch = batch_lib.prepare_batch(
        batch_lib.Batch(
            torch.randn(size, f1, 80, generator=g),
            feat_lens,
            torch.randint(3, vocab, (size, t1), generator=g),
            token_lens,
            torch.randn(size, t1 + 1, teacher_dim, generator=g),
            token_lens + 1,
        )
    ).pin_memory()
    scale = 1.0 / int((batch.token_lens + 1).sum())

    def step():
        opt.zero_grad(set_to_none=True)
        b = batch.to(dev, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(b)
        (loss * scale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # --clip-grad-norm's default
        opt.step()
        torch.cuda.synchronize()

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    try:
        from bench_train_step import profile_cuda, setup

        step, which = setup("aishell1", torch.device("cuda")), "cifhkd.train.train_update"
    except ImportError as exc:
        print(f"gpu_step: the trainer does not import here ({exc}); timing the update from cifhkd.model alone")
        step, which, profile_cuda = model_only_step(), "model-only update (cifhkd.model)", None
    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if profile_cuda is not None:
        prof = profile_cuda(step)
        detail = (
            f"GPU kernel time {prof['gpu_kernel_ms_per_step']:.1f} ms/step; syncs/step "
            f"{prof['syncs_per_step']:.0f}, memcpy calls/step {prof['memcpy_calls_per_step']:.0f}"
        )
    else:
        from gpu_bench import kernel_ms

        detail = f"GPU kernel time {kernel_ms(step)[0]:.1f} ms/step"
    print(
        f"training step, AISHELL-1 preset, {which}, {torch.cuda.get_device_name()}: "
        f"median {1e3 * statistics.median(times):.1f} ms (min {1e3 * min(times):.1f}) over "
        f"{args.steps} steps; {detail}"
    )


if __name__ == "__main__":
    main()
