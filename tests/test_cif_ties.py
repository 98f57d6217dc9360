"""The CIF gradient at ties: where a prefix sum lands exactly on a token
boundary, or a zero-weight frame sits on one, the op returns the right-hand derivative (the
side on which the ``>=`` fire decisions stay as taken; docs/cif-semantics.md, "Gradients").

The checks are one-sided finite differences of the op's own forward (exact in float64: the
loss is piecewise linear in the weights and the step is a power of two far below the
distance to the next kink), so they do not depend on the backward they check; the float64
reference follows the same rule and is checked the same way; with target-length scaling the
prefix sums move both ways, and the op and the reference are compared with each other and
with a two-sided difference where no prefix sum is on a boundary."""

import pytest
import torch

import cifops
from cifops.reference import cif_reference

STEP = 2.0**-24

TIE_CASES = [
    [0.5, 0.5, 0.6, 0.7, 0.3],  # P = 1.0 exactly after frame 1
    [0.0, 0.6, 0.6, 0.6, 0.3],  # a leading zero-weight frame at P = 0
    [0.25, 0.75, 0.25, 0.75, 0.5],  # every other prefix sum on a boundary
    [0.5, 0.5, 0.0, 0.0, 0.5, 0.5],  # zero-weight frames sitting on boundary 1
    [1.0, 1.0, 0.5, 1.5, 0.25],  # whole-token frames, multi-fire landing on 3.0
    [0.0, 0.0, 0.75, 0.25, 2.0, 0.0],  # zeros at both ends, a multi-fire frame
]


def loss_of(fn, weights, hidden, alphas, **kwargs):
    out = fn(hidden, alphas[None], **kwargs)
    n = out.embeds.shape[1]
    return (out.embeds[0] * weights[:n]).sum()


def right_difference(hidden, alphas, weights, **kwargs):
    base = loss_of(cifops.cif, weights, hidden, alphas, **kwargs)
    grads = []
    for j in range(alphas.numel()):
        step = torch.zeros_like(alphas)
        step[j] = STEP
        grads.append((loss_of(cifops.cif, weights, hidden, alphas + step, **kwargs) - base) / STEP)
    return torch.stack(grads)


def grad_of(fn, hidden, alphas, weights, **kwargs):
    a = alphas.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    g_a, g_h = torch.autograd.grad(loss_of(fn, weights, h, a, **kwargs), (a, h))
    return g_a, g_h


@pytest.mark.parametrize("case", range(len(TIE_CASES)))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=4),
        dict(tail_threshold=0.05),
        dict(tail_threshold=0.05, tail_mode="keep"),
        dict(threshold=0.5, max_tokens=9),
    ],
    ids=["complete", "tail-normalize", "tail-keep", "threshold-0.5"],
)
def test_alpha_gradient_at_ties_is_the_right_hand_derivative(case, kwargs):
    g = torch.Generator().manual_seed(case)
    alphas = torch.tensor(TIE_CASES[case], dtype=torch.float64)
    hidden = torch.randn(1, alphas.numel(), 3, dtype=torch.float64, generator=g)
    weights = torch.randn(12, 3, dtype=torch.float64, generator=g)
    want = right_difference(hidden, alphas, weights, **kwargs)
    got, _ = grad_of(cifops.cif, hidden, alphas, weights, **kwargs)
    ref, _ = grad_of(cif_reference, hidden, alphas, weights, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the normalised tail curves
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", range(len(TIE_CASES)))
def test_tie_gradients_with_target_scaling_match_the_reference(case):
    """With target_lengths the weights are rescaled by (beta * target + eps) / sum, so a
    step of one weight moves the prefix sums before it left and those after it right; the
    op returns the chain rule through the scaling of the right-hand partial derivatives
    in the prefix sums, as the reference does (both for hidden and alphas)."""
    g = torch.Generator().manual_seed(10 + case)
    alphas = torch.tensor(TIE_CASES[case], dtype=torch.float64)
    hidden = torch.randn(1, alphas.numel(), 3, dtype=torch.float64, generator=g)
    weights = torch.randn(12, 3, dtype=torch.float64, generator=g)
    target = torch.tensor([max(1, int(alphas.sum()))])
    kwargs = dict(target_lengths=target, scale_eps=0.0)
    got = grad_of(cifops.cif, hidden, alphas, weights, **kwargs)
    ref = grad_of(cif_reference, hidden, alphas, weights, **kwargs)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_scaled_gradient_away_from_ties_is_the_derivative():
    """Off the boundaries (scale_eps 1e-4 moves every scaled prefix sum off them) the
    scaled gradient is the derivative: a central difference agrees."""
    g = torch.Generator().manual_seed(3)
    alphas = torch.tensor(TIE_CASES[0], dtype=torch.float64)
    hidden = torch.randn(1, alphas.numel(), 3, dtype=torch.float64, generator=g)
    weights = torch.randn(12, 3, dtype=torch.float64, generator=g)
    kwargs = dict(target_lengths=torch.tensor([2]))
    got, _ = grad_of(cifops.cif, hidden, alphas, weights, **kwargs)
    want = []
    for j in range(alphas.numel()):
        step = torch.zeros_like(alphas)
        step[j] = 1e-7
        up = loss_of(cifops.cif, weights, hidden, alphas + step, **kwargs)
        down = loss_of(cifops.cif, weights, hidden, alphas - step, **kwargs)
        want.append((up - down) / 2e-7)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_compat_torch_cif_agrees_with_torch_cif_at_ties():
    """torch_cif's gradient is the right-hand one on these inputs too (it differentiates
    its scatter of right/left weights), so the adapter now agrees with it there."""
    torch_cif = pytest.importorskip("torch_cif")
    from cifops.compat import torch_cif as compat

    g = torch.Generator().manual_seed(7)
    for values in TIE_CASES:
        alphas = torch.tensor([values], dtype=torch.float64)
        hidden = torch.randn(1, alphas.shape[1], 3, dtype=torch.float64, generator=g)
        grads = []
        for fn in (compat.cif_function, torch_cif.cif_function):
            a = alphas.clone().requires_grad_()
            h = hidden.clone().requires_grad_()
            out = fn(h, a, unbound_alpha=True)
            n = int(out["cif_lengths"][0][0])
            probe = torch.arange(1.0, 1 + 3 * n, dtype=torch.float64).view(n, 3)
            loss = (out["cif_out"][0][0, :n] * probe).sum()
            grads.append(torch.autograd.grad(loss, (a, h)))
        for x, y in zip(*grads):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
