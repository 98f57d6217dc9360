"""A slow, literal float64 reference of the CIF contract (docs/cif-semantics.md).

It follows the definition token by token, with no cleverness: prefix sums as a
sequential float64 loop, every (frame, token) overlap computed from the formula,
fire decisions taken on Python floats. It is differentiable (torch autograd
through the overlaps, the scaling and the tail normalisation, with the fire
decisions held fixed), so tests compare both the values and the gradients of
``cifops.cif`` against it. Use it on small inputs only: it is O(B * T * N).

At a tie (a prefix sum exactly on a token boundary) the gradient is the right-hand
one, as the contract says: frame t belongs to the tokens from the number fired
before it to the number fired by its end (``>=`` firing), and each overlap
``min(P_{t+1}, (k+1) beta) - max(P_t, k beta)`` picks the prefix sum on the side
where it moves when the prefix sums grow (``P_{t+1}`` while below ``(k+1) beta``,
``P_t`` from ``k beta`` on), even where the overlap is zero.
"""

from typing import Optional

import torch
from torch import Tensor

from cifops._cif import CifOutput


def cif_reference(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    threshold: float = 1.0,
    target_lengths: Optional[Tensor] = None,
    scale_eps: float = 1e-4,
    tail_threshold: Optional[float] = None,
    tail_mode: str = "normalize",
    max_tokens: Optional[int] = None,
) -> CifOutput:
    """Same signature and outputs as :func:`cifops.cif`, computed in float64 on the CPU."""
    B, T, D = hidden.shape
    beta = float(threshold)
    h64 = hidden.double()
    a64 = alphas.double()
    rows, counts, fires, sums = [], [], [], []
    for b in range(B):
        L = T if lengths is None else int(lengths[b])
        a = [a64[b, t] for t in range(L)]
        alpha_sum = a64.new_zeros(())
        for x in a:
            alpha_sum = alpha_sum + x
        sums.append(alpha_sum)
        scale = a64.new_ones(())
        if target_lengths is not None:
            target = int(target_lengths[b])
            if float(alpha_sum.detach()) > 0:
                # the contract's division: a tensor numerator, since python_float / tensor
                # is reciprocal(tensor) * float in torch, which rounds differently
                scale = a64.new_tensor(beta * target + scale_eps) / alpha_sum
            elif target == 0:
                scale = a64.new_zeros(())
            else:
                raise ValueError("target_lengths > 0 for weights that sum to zero")
        prefix = [a64.new_zeros(())]
        for x in a:
            prefix.append(prefix[-1] + x * scale)
        p = [float(v.detach()) for v in prefix]
        n = 0
        while (n + 1) * beta <= p[-1]:
            n += 1

        def fired(x):  # tokens fired once the prefix sum reaches x (>= firing)
            count = 0
            while (count + 1) * beta <= x:
                count += 1
            return count

        def weight(t, k):  # overlap of frame t with token k, right-hand at ties
            hi = prefix[t + 1] if p[t + 1] < (k + 1) * beta else prefix[0].new_tensor((k + 1) * beta)
            lo = prefix[t] if p[t] >= k * beta else prefix[0].new_tensor(k * beta)
            return hi - lo

        tokens, token_fires = [], []
        for k in range(n):
            c = h64.new_zeros(D)
            for t in range(L):
                if fired(p[t]) <= k <= fired(p[t + 1]):  # frame t belongs to token k
                    c = c + weight(t, k) * h64[b, t]
                if p[t] < (k + 1) * beta <= p[t + 1]:
                    token_fires.append(t)
            tokens.append(c)
        residual = prefix[-1] - n * beta
        r = float(residual.detach())
        if tail_threshold is not None and L > 0 and r > 0 and r >= tail_threshold:
            c = h64.new_zeros(D)
            for t in range(L):
                if fired(p[t + 1]) >= n:  # the frames from the last fire on
                    c = c + weight(t, n) * h64[b, t]
            if tail_mode == "normalize":
                c = c * (a64.new_tensor(beta) / residual)
            tokens.append(c)
            token_fires.append(L - 1)
        rows.append(tokens)
        fires.append(token_fires)
        counts.append(len(tokens))
    N = max(counts, default=0) if max_tokens is None else max_tokens
    embeds = h64.new_zeros(B, N, D)
    fire_frames = torch.full((B, N), -1, dtype=torch.int64)
    for b in range(B):
        for k, c in enumerate(rows[b][:N]):
            embeds = embeds.index_put((torch.tensor(b), torch.tensor(k)), c)
            fire_frames[b, k] = fires[b][k]
    token_lengths = torch.tensor([min(c, N) for c in counts], dtype=torch.int64)
    alpha_sum = torch.stack(sums) if B else a64.new_zeros(0)
    return CifOutput(embeds, token_lengths, fire_frames, alpha_sum)
