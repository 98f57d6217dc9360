"""The drop-in adapters (cifops.compat) against the real peer packages as oracles, where the
peers are self-consistent, and the documented places where the adapters deliberately differ
(checked against values worked out by hand from the contract)."""

import warnings

import pytest
import torch

from cifops.compat import funasr as compat_funasr
from cifops.compat import torch_cif as compat_torch_cif

DTYPES = [torch.float64, torch.float32]
TOL = dict(rtol=1e-5, atol=1e-5)  # the peers integrate in float32 even for float64 input


def _import_peer(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


@pytest.fixture(scope="module")
def funasr_cif():
    return _import_peer("funasr.models.paraformer.cif_predictor")


@pytest.fixture(scope="module")
def torch_cif():
    return _import_peer("torch_cif")


def random_batch(seed, dtype, max_alpha=0.9, B=4, T=48, D=6):
    """hidden [B, T, D], alphas [B, T] in [0, max_alpha), valid [B, T] (right padding)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    alphas = (torch.rand(B, T, generator=g, dtype=torch.float64) * max_alpha).to(dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    return hidden, alphas, torch.arange(T) < lengths[:, None]


def linear_functional_grads(fn, *inputs):
    """Gradients wrt inputs of a fixed random linear functional of fn(*inputs)'s outputs."""
    inputs = [x.clone().requires_grad_() for x in inputs]
    g = torch.Generator().manual_seed(123)
    loss = sum((out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() for out in fn(*inputs))
    return torch.autograd.grad(loss, inputs)


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        torch.testing.assert_close(x, y, **(tol or TOL))


# --- FunASR ---------------------------------------------------------------------------------


def funasr_batch(seed, dtype):
    hidden, alphas, valid = random_batch(seed, dtype)
    return hidden, alphas * valid  # FunASR pads with alpha = 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cif", "cif_v1"])
def test_funasr_forward(funasr_cif, name, dtype, seed):
    hidden, alphas = funasr_batch(seed, dtype)
    embeds, fires = getattr(compat_funasr, name)(hidden, alphas, 1.0)
    ref_embeds, ref_fires = getattr(funasr_cif, name)(hidden, alphas, 1.0)
    assert embeds.shape == ref_embeds.shape and embeds.dtype == ref_embeds.dtype
    torch.testing.assert_close(embeds, ref_embeds, **TOL)
    # dtypes differ only for the loop's float64 fires (float32 there; see the docstring)
    torch.testing.assert_close(fires, ref_fires, **TOL, check_dtype=name == "cif_v1")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cif", "cif_v1"])
def test_funasr_gradients(funasr_cif, name, dtype):
    hidden, alphas = funasr_batch(2, dtype)
    got = linear_functional_grads(lambda h, a: getattr(compat_funasr, name)(h, a, 1.0), hidden, alphas)
    want = linear_functional_grads(lambda h, a: getattr(funasr_cif, name)(h, a, 1.0), hidden, alphas)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [1.0, 1.0 - 1e-4, 0.7])  # 1 - 1e-4: FunASR's timestamps
def test_funasr_cif_wo_hidden(funasr_cif, threshold):
    _, alphas = funasr_batch(3, torch.float32)
    alphas = alphas * 0.7  # alpha <= threshold: one fire per frame, where FunASR is consistent
    fires = compat_funasr.cif_wo_hidden(alphas, threshold)
    torch.testing.assert_close(fires, funasr_cif.cif_wo_hidden(alphas, threshold), **TOL)
    got = linear_functional_grads(lambda a: [compat_funasr.cif_wo_hidden(a, threshold)], alphas)
    want = linear_functional_grads(lambda a: [funasr_cif.cif_wo_hidden(a, threshold)], alphas)
    assert_all_close(got, want)


def test_funasr_multi_fire_follows_the_contract(funasr_cif):
    hidden = torch.eye(3, dtype=torch.float64).unsqueeze(0)  # embeds show the frame weights
    alphas = torch.tensor([[0.5, 1.75, 0.25]], dtype=torch.float64)
    embeds, fires = compat_funasr.cif(hidden, alphas, 1.0)
    # P = 0.5, 2.25, 2.5: token 0 = [0, 1) = 0.5 h0 + 0.5 h1, token 1 = [1, 2) = 1.0 h1, both
    # fired by frame 1; round(2.5) = 2 rows. fires = P_t - floor(P_{t-1}).
    assert embeds.tolist() == [[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]]
    assert fires.tolist() == [[0.5, 2.25, 0.5]]
    # FunASR's loop fires once at frame 1 and carries 1.25: token 1 gets a negative weight;
    # cif_v1 merges both tokens into one row of weight 2.
    ref_embeds, ref_fires = funasr_cif.cif(hidden, alphas, 1.0)
    assert ref_embeds.tolist() == [[[0.5, 0.5, 0.0], [0.0, 1.25, -0.25]]]
    assert ref_fires.tolist() == [[0.5, 2.25, 1.5]]
    assert funasr_cif.cif_v1(hidden, alphas, 1.0)[0].tolist() == [[[0.5, 1.5, 0.0], [0.0] * 3]]


def test_funasr_threshold_not_one_follows_the_contract(funasr_cif):
    hidden = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    alphas = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)
    embeds, fires = compat_funasr.cif(hidden, alphas, 0.5)
    # P = 0.25, 0.75, 1.0 and tokens of weight 0.5: [0, 0.5) and [0.5, 1.0). Two tokens,
    # more than FunASR's round(sum alpha) = 1 row, which would drop one.
    assert embeds.tolist() == [[[0.25, 0.25, 0.0], [0.0, 0.25, 0.25]]]
    assert fires.tolist() == [[0.25, 0.75, 0.5]]
    assert funasr_cif.cif(hidden, alphas, 0.5)[0].shape[1] == 1


# --- torch_cif ------------------------------------------------------------------------------

CONFIGS = {  # (cif_function keyword arguments, largest alpha)
    "inference": (dict(), 1.0),
    "inference_beta": (dict(beta=0.75, tail_thres=0.25), 1.0),
    "training": (dict(target_lengths=True), 1.0),
    "training_beta": (dict(beta=0.75, target_lengths=True), 1.0),
    "multi_fire": (dict(unbound_alpha=True, tail_thres=0.3), 2.5),
    "multi_fire_training": (dict(unbound_alpha=True, target_lengths=True), 2.5),
}


def torch_cif_case(config, dtype, seed=0):
    kwargs, max_alpha = CONFIGS[config]
    hidden, alphas, valid = random_batch(seed, dtype, max_alpha)
    kwargs = dict(kwargs, padding_mask=~valid)
    if "target_lengths" in kwargs:
        kwargs["target_lengths"] = torch.randint(
            1, 30, (hidden.shape[0],), generator=torch.Generator().manual_seed(seed)
        )
    return hidden, alphas, kwargs


def masked(result):
    """cif_out and delays, zeroed from cif_lengths on (the peer leaves partial sums there),
    and the other differentiable outputs."""
    lengths = result["cif_lengths"][0]
    rows = torch.arange(result["cif_out"][0].shape[1]) < lengths[:, None]
    return [
        result["cif_out"][0] * rows[..., None],
        result["delays"][0] * rows,
        result["alpha_sum"][0],
        *result["tail_weights"],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_cif_forward(torch_cif, config, dtype):
    hidden, alphas, kwargs = torch_cif_case(config, dtype)
    got = compat_torch_cif.cif_function(hidden, alphas, **kwargs)
    want = torch_cif.cif_function(hidden, alphas, **kwargs)
    assert got.keys() == want.keys()
    assert len(got["tail_weights"]) == len(want["tail_weights"])
    for key in ("cif_lengths", "right_indices", "left_indices"):
        assert torch.equal(got[key][0], want[key][0]), key
    internals = ["scaled_alpha", "cumsum_alpha", "right_weights", "left_weights"]
    assert_all_close([got[key][0] for key in internals], [want[key][0] for key in internals])
    # delays are weighted source positions (up to 48): relative tolerance
    assert_all_close(masked(got), masked(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_cif_gradients(torch_cif, config, dtype):
    hidden, alphas, kwargs = torch_cif_case(config, dtype, seed=1)
    got = linear_functional_grads(lambda h, a: masked(compat_torch_cif.cif_function(h, a, **kwargs)), hidden, alphas)
    want = linear_functional_grads(lambda h, a: masked(torch_cif.cif_function(h, a, **kwargs)), hidden, alphas)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_torch_cif_zero_beyond_lengths(torch_cif):
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    alphas = torch.full((2, 4), 0.5, dtype=torch.float64)
    kwargs = dict(target_lengths=torch.tensor([2, 1]))
    got = compat_torch_cif.cif_function(hidden, alphas, **kwargs)
    # Utterance 1 is scaled to weights 0.250025 that sum to 1 + eps: its token 0 fires at
    # frame 3, whose last 1e-4 is the residual. The adapter's row 1 is zero (contract);
    # torch_cif leaves the residual there, in cif_out and in delays (1-based position 4).
    assert got["cif_out"][0][1, 1].tolist() == [0.0] * 3 and got["delays"][0][1, 1] == 0
    want = torch_cif.cif_function(hidden, alphas, **kwargs)
    torch.testing.assert_close(want["cif_out"][0][1, 1], 1e-4 * hidden[1, 3], rtol=1e-3, atol=0)
    torch.testing.assert_close(want["delays"][0][1, 1].item(), 4e-4, rtol=1e-3, atol=0)


def test_torch_cif_zero_residual_is_no_tail(torch_cif):
    hidden = torch.ones(1, 2, 3)
    alphas = torch.tensor([[0.5, 0.5]])  # sums to exactly one token, residual 0
    got = compat_torch_cif.cif_function(hidden, alphas, tail_thres=0.0)
    assert got["cif_lengths"][0].tolist() == [1]
    assert got["cif_out"][0].tolist() == [[[1.0] * 3]]
    # torch_cif emits the empty residual as a tail token and scales it by beta / 0
    want = torch_cif.cif_function(hidden, alphas, tail_thres=0.0)
    assert want["cif_lengths"][0].tolist() == [2] and want["cif_out"][0][0, 1].isnan().all()


def test_torch_cif_rejects_negative_alpha():
    alphas = torch.tensor([[0.5, -1e-5]])  # torch_cif tolerates down to -eps
    with pytest.raises((ValueError, RuntimeError)):
        compat_torch_cif.cif_function(torch.ones(1, 2, 3), alphas)
