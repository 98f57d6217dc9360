"""A small CUDA workload for compute-sanitizer (benchmarks/gpu_check.sh): CIF and the
contrastive loss, forward and backward, over edge cases (tails, max_tokens, scaling,
multi-fire, T above the scan's 1024-frame tile, unaligned D, every dtype)."""

import torch

import cifops

torch.manual_seed(0)
DEV = "cuda"
for B, T, D, scale, kw in [
    (3, 17, 5, 1.5, {}),
    (2, 64, 130, 2.5, dict(tail_threshold=0.3)),
    (4, 100, 64, 0.6, dict(max_tokens=20, tail_threshold=0.2, tail_mode="keep")),
    (1, 1, 1, 0.5, {}),
    (2, 33, 7, 0.9, dict(threshold=0.8)),
    (3, 50, 33, 0.6, dict(target_lengths=torch.tensor([5, 9, 1]))),
    (2, 1500, 16, 0.4, dict(tail_threshold=0.5)),
]:
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        h = torch.randn(B, T, D, device=DEV, dtype=dt, requires_grad=True)
        a = (torch.rand(B, T, device=DEV) * scale).requires_grad_()
        L = torch.randint(1, T + 1, (B,), device=DEV)
        k = {kk: (v.to(DEV) if torch.is_tensor(v) else v) for kk, v in kw.items()}
        out = cifops.cif(h, a, L, **k)
        (out.embeds.float().square().sum() + out.alpha_sum.sum()).backward()
for n, m, d, dt in [
    (37, 50, 9, torch.float32),
    (130, 257, 100, torch.bfloat16),
    (65, 130, 17, torch.float16),
    (200, 200, 384, torch.float32),
    (64, 64, 64, torch.float64),
]:
    s = torch.randn(n, d, device=DEV, dtype=dt, requires_grad=True)
    t = torch.randn(m, d, device=DEV, dtype=dt, requires_grad=True)
    y = torch.randint(0, m, (n,), device=DEV)
    y[::5] = -100
    tau = torch.tensor(0.05, device=DEV, requires_grad=True)
    cifops.contrastive_loss(s, t, y, temperature=tau).backward()
    cifops.contrastive_loss(s, t.detach(), y, temperature=0.1).backward()
    if n == m:
        cifops.contrastive_loss(s, t, symmetric=True, reduction="mean").backward()
    cifops.contrastive_accuracy(s, t, y)
for B, Tc, D, dt, n in [
    (1, 16, 512, torch.float32, 16),
    (32, 16, 512, torch.bfloat16, None),
    (5, 3, 130, torch.float64, 2),
    (3, 0, 7, torch.float32, 4),
]:
    state = None
    for chunk in range(3):  # the streaming step, its state carried across chunks
        a = torch.rand(B, Tc, device=DEV) * 1.4
        L = torch.randint(0, Tc + 1, (B,), device=DEV)
        out, state = cifops.cif_stream_step(torch.randn(B, Tc, D, device=DEV, dtype=dt), a, L, state, max_tokens=n)
    cifops.cif_stream_flush(state, tail_threshold=0.2)
torch.cuda.synchronize()
print("sanitize workload done")
