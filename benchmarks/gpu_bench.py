"""GPU timings of cifops against its peers, side by side in one process.

    python benchmarks/gpu_bench.py [--quick] [--only cif|contrastive]

Run by benchmarks/gpu_check.sh on a GPU machine. CUDA events around each call, warm-up
first, the median of several repetitions, fresh random inputs rotated among three sets.
Reports (and writes to $OUT/bench.json, or ./gpu-bench.json):
  * the device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate;
  * CIF forward+backward at the issue's sizes, float32 and bfloat16, against every
    installed peer (torch_cif, FunASR's cif and cif_v1), each timed two ways: wall time
    (CUDA events around the call, host work included) and kernel time (the sum of the
    call's GPU kernels, from torch.profiler); cifops with and without max_tokens
    (without: one device-to-host copy of the token counts per call); peak extra memory;
    the speed-ups over torch_cif and over the fastest peer in both times; the per-kernel
    times of cifops with max_tokens;
  * CIF forward alone at B=64 T=1500 D=512 (with max_tokens) as bytes moved over the
    forward kernel's time, as a fraction of the copy bandwidth;
  * the contrastive loss forward+backward against naive PyTorch and Inf-CL (frozen
    teacher; trainable teacher and symmetric at the larger sizes), peak extra memory, and
    each gradient's relative error against a float64 reference beside naive's own
    error in the same precision (the accuracy rule: at most twice naive's).
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

import cifops

DEV = "cuda"
TAU = 0.02


def med(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernel_ms(fn, reps=5):
    """(GPU kernel time per call in ms, {kernel name: ms per call}) over `reps` profiled
    calls after one warm-up call: the sum of the device-side events (kernels, memsets,
    copies) that torch.profiler records, which excludes the host's time between them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            per_kernel[e.name[:70]] = per_kernel.get(e.name[:70], 0.0) + us / reps / 1e3
    return sum(per_kernel.values()), dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def ceilings(res):
    x = torch.randn(256 * 2**20, device=DEV)  # 1 GiB
    y = torch.empty_like(x)
    t = med(lambda: y.copy_(x), reps=20)
    res["copy_TBps"] = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
    x = y = None  # free the GiB before the next
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t = med(lambda: a @ b, reps=10)
    res["bf16_matmul_TFLOPs"] = 2 * 8192**3 / (t * 1e-3) / 1e12
    print(
        f"ceilings: copy {res['copy_TBps']:.2f} TB/s (read+write), bf16 matmul {res['bf16_matmul_TFLOPs']:.0f} TFLOP/s"
    )
    a = b = None
    torch.cuda.empty_cache()


def cif_peers():
    peers = {"cifops": lambda h, a: cifops.cif(h, a).embeds}
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            from funasr.models.paraformer import cif_predictor as cp

            peers["funasr_cif_v1"] = lambda h, a: cp.cif_v1(h, a, 1.0)[0]
            peers["funasr_cif"] = lambda h, a: cp.cif(h, a, 1.0)[0]
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            print("funasr import failed:", repr(e)[:200], file=sys.__stdout__)
    try:
        from torch_cif import cif_function

        peers["torch_cif"] = lambda h, a: cif_function(h, a, beta=1.0)["cif_out"][0]
    except Exception as e:  # noqa: BLE001
        print("torch_cif import failed:", repr(e)[:200])
    return peers


def cif_inputs(B, T, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(B, T, D, device=DEV, generator=g).to(dtype).requires_grad_()
    a = (torch.rand(B, T, device=DEV, generator=g) * 0.6).requires_grad_()
    return h, a


def bench_cif(res, quick):
    peers = cif_peers()
    print("CIF peers:", sorted(peers))
    rows = []
    sizes = [(32, 200, 256), (32, 600, 512), (64, 1500, 512)]
    for B, T, D in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            sets = [cif_inputs(B, T, D, dtype, s) for s in range(3)]
            with torch.no_grad():
                n_max = max(int(cifops.cif(h, a).embeds.shape[1]) for h, a in sets)
            impls = dict(peers)
            impls["cifops_mt"] = lambda h, a: cifops.cif(h, a, max_tokens=n_max).embeds
            probe = torch.randn(T, D, device=DEV, dtype=dtype)
            r = {"B": B, "T": T, "D": D, "dtype": str(dtype).split(".")[1], "max_tokens": n_max}
            for name, fn in impls.items():
                if name == "funasr_cif" and (T > 200 or quick):
                    continue  # a Python loop over frames: seconds per call
                k = [0]

                def step(fn=fn):
                    h, a = sets[k[0] % 3]
                    k[0] += 1
                    out = fn(h, a)
                    loss = (out * probe[: out.shape[1]]).float().sum()
                    torch.autograd.grad(loss, (h, a))

                try:
                    slow = name == "funasr_cif"
                    r[name] = med(step, reps=3 if slow else 20, warm=1 if slow else 3)
                    r[name + "_kernel"], per_kernel = kernel_ms(step, reps=2 if slow else 5)
                    r[name + "_MiB"] = peak_mib(step)
                    if name == "cifops_mt":
                        r["cifops_mt_kernels"] = {kk: round(v * 1e3, 1) for kk, v in list(per_kernel.items())[:8]}  # us
                except Exception as e:  # noqa: BLE001
                    r[name] = None
                    print(f"  {name} B{B} T{T} D{D} {dtype}: {repr(e)[:160]}")
            for mine in ("cifops", "cifops_mt"):
                for kind, suffix in (("wall", ""), ("kernel", "_kernel")):
                    if r.get(mine + suffix) and r.get("torch_cif" + suffix):
                        r[f"{mine}_x_torch_cif_{kind}"] = r["torch_cif" + suffix] / r[mine + suffix]
                    others = [r[p + suffix] for p in peers if not p.startswith("cifops") and r.get(p + suffix)]
                    if others and r.get(mine + suffix):
                        r[f"{mine}_x_fastest_peer_{kind}"] = min(others) / r[mine + suffix]
            rows.append(r)
            print("CIF fwd+bwd ms", {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in r.items()})
            sets = None
            torch.cuda.empty_cache()
    res["cif_fwd_bwd"] = rows

    # forward alone: bytes over the forward kernel's time at B=64 T=1500 D=512
    for dtype in (torch.float32, torch.bfloat16):
        B, T, D = 64, 1500, 512
        sets = [cif_inputs(B, T, D, dtype, s) for s in range(3)]
        with torch.no_grad():
            N = max(int(cifops.cif(h, a).embeds.shape[1]) for h, a in sets)
            k = [0]

            def fwd_mt():
                h, a = sets[k[0] % 3]
                k[0] += 1
                return cifops.cif(h, a, max_tokens=N)

            def fwd():
                h, a = sets[k[0] % 3]
                k[0] += 1
                return cifops.cif(h, a)

            t_mt = med(fwd_mt, reps=30)
            t = med(fwd, reps=30)
            t_kernels, per_kernel = kernel_ms(fwd_mt)
        t_fwd = sum(v for name, v in per_kernel.items() if "forward_kernel" in name) or t_kernels
        esz = torch.tensor([], dtype=dtype).element_size()
        nbytes = B * T * D * esz + B * N * D * esz + B * T * 4
        bw = nbytes / (t_fwd * 1e-3) / 1e12
        res[f"cif_fwd_{dtype}"] = dict(
            ms_max_tokens=t_mt,
            ms=t,
            kernels_ms=t_kernels,
            forward_kernel_ms=t_fwd,
            N=N,
            TBps=bw,
            frac_of_copy=bw / res["copy_TBps"],
            kernels_us={kk: round(v * 1e3, 1) for kk, v in per_kernel.items()},
        )
        print(
            f"CIF fwd B64 T1500 D512 {dtype}: wall {t_mt:.4f} ms with max_tokens, {t:.4f} ms "
            f"without; kernels {t_kernels:.4f} ms, forward kernel {t_fwd:.4f} ms: {bw:.2f} TB/s "
            f"= {bw / res['copy_TBps']:.0%} of copy"
        )
        sets = None
        torch.cuda.empty_cache()


def c_fused(s, t, **kw):
    s = s.detach().requires_grad_()
    loss = cifops.contrastive_loss(s, t, temperature=TAU, reduction="sum", **kw)
    loss.backward()
    return s.grad


def c_naive(s, t, symmetric=False):
    s = s.detach().requires_grad_()
    logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / TAU
    y = torch.arange(len(s), device=DEV)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.float().T, y, reduction="sum"))
    loss.backward()
    return s.grad


def bench_contrastive(res, quick):
    try:
        from inf_cl import cal_flash_loss
    except Exception as e:  # noqa: BLE001
        cal_flash_loss = None
        print("inf_cl import failed:", repr(e)[:200])

    def c_infcl(s, t):
        s = s.detach().requires_grad_()
        sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
        head = 256 if s.shape[1] % 256 == 0 else 128
        cal_flash_loss(sn, tn, None, 1.0 / TAU, head_dim=head).sum().backward()
        return s.grad

    cases = [
        (2048, 768, torch.bfloat16, "frozen"),
        (8192, 768, torch.bfloat16, "frozen"),
        (32768, 768, torch.bfloat16, "frozen"),
        (8192, 768, torch.bfloat16, "teacher"),
        (32768, 768, torch.bfloat16, "teacher"),
        (8192, 768, torch.bfloat16, "symmetric"),
        (32768, 768, torch.bfloat16, "symmetric"),
        (32768, 384, torch.float32, "frozen"),
    ]
    if quick:
        cases = [c for c in cases if c[0] <= 8192]
    rows = []
    for N, D, dtype, mode in cases:
        g = torch.Generator(device=DEV).manual_seed(N + D)
        s = torch.randn(N, D, device=DEV, generator=g).to(dtype)
        t = (s.float() + 0.5 * torch.randn(N, D, device=DEV, generator=g)).to(dtype)
        r = {"N": N, "D": D, "dtype": str(dtype).split(".")[1], "mode": mode}
        if mode == "frozen":
            impls = {"cifops": lambda s, t: c_fused(s, t), "naive": c_naive}
            if cal_flash_loss is not None:
                impls["infcl"] = c_infcl
        elif mode == "teacher":

            def fused_t(s, t):
                t = t.detach().requires_grad_()
                return c_fused(s, t)

            def naive_t(s, t):
                t = t.detach().requires_grad_()
                return c_naive(s, t)

            impls = {"cifops": fused_t, "naive": naive_t}
        else:
            impls = {
                "cifops": lambda s, t: c_fused(s, t, symmetric=True),
                "naive": lambda s, t: c_naive(s, t, symmetric=True),
            }
        for name, fn in impls.items():
            try:
                r[name] = med(lambda: fn(s, t), reps=10)
                r[name + "_MiB"] = peak_mib(lambda: fn(s, t))
            except Exception as e:  # noqa: BLE001
                r[name] = None
                print(f"  {name} N{N} D{D} {dtype} {mode}: {repr(e)[:160]}")
            torch.cuda.empty_cache()
        if r.get("cifops") and r.get("naive"):
            r["x_naive"] = r["naive"] / r["cifops"]
        if r.get("cifops") and r.get("infcl"):
            r["x_infcl"] = r["infcl"] / r["cifops"]
        if mode == "frozen" or (mode == "symmetric" and N <= 8192):  # accuracy, once per size
            sym = mode == "symmetric"
            ref = c_naive(s.double(), t.double(), symmetric=sym)
            got = c_fused(s, t, symmetric=sym).double()
            nai = c_naive(s, t, symmetric=sym).double()
            r["err_cifops"] = float((got - ref).norm() / ref.norm())
            r["err_naive"] = float((nai - ref).norm() / ref.norm())
            r["accuracy_ok"] = r["err_cifops"] <= 2 * r["err_naive"] + 1e-12
            del ref, got, nai
            torch.cuda.empty_cache()
        rows.append(r)
        print("contrastive fwd+bwd ms", {k2: (round(v, 5) if isinstance(v, float) else v) for k2, v in r.items()})
    res["contrastive"] = rows

    # the chunk workspace bound, at the largest frozen size
    N, D = (8192, 768) if quick else (32768, 768)
    s = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
    t = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
    sweep = {"default (1 GiB budget)": round(med(lambda: c_fused(s, t), reps=10), 4)}
    for mib in (64, 128, 256, 512, 768):
        os.environ["CIFOPS_CONTRASTIVE_CHUNK_MIB"] = str(mib)
        sweep[mib] = round(med(lambda: c_fused(s, t), reps=10), 4)
    os.environ.pop("CIFOPS_CONTRASTIVE_CHUNK_MIB")
    _, per_kernel = kernel_ms(lambda: c_fused(s, t), reps=3)
    res["contrastive_kernels_us"] = {kk: round(v * 1e3, 1) for kk, v in list(per_kernel.items())[:10]}
    print(
        f"contrastive N={N} D={D} bf16 frozen, kernels (us per call; a splitK kernel name "
        f"means cuBLAS split the G.B product):",
        res["contrastive_kernels_us"],
    )
    res["contrastive_chunk_sweep_ms"] = {"N": N, "D": D, **sweep}
    print(f"contrastive chunk MiB sweep N={N} D={D}:", sweep)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--only", choices=("cif", "contrastive"))
    args = ap.parse_args()
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cifops": cifops.build_info(),
    }
    ceilings(res)
    if args.only in (None, "cif"):
        bench_cif(res, args.quick)
    if args.only in (None, "contrastive"):
        bench_contrastive(res, args.quick)
    out = os.path.join(os.environ.get("OUT", "."), "bench.json" if os.environ.get("OUT") else "gpu-bench.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("wrote", out)


if __name__ == "__main__":
    main()
