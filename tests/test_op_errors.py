"""Issue 21, items 5-8 and 12: the ops as a careless or hostile user calls them.

Second-order and forward-mode gradients, meta tensors mixed with real ones, float16
alpha sums, thresholds below scale_eps, huge max_tokens, float8 inputs, torch.func
transforms and numpy scalars: each either works or raises an error that names the
argument (or the op) and says what is accepted.
"""
import pytest
import torch

import cifops
from cifops.reference import cif_reference

from conftest import requires_cuda

META = torch.device("meta")
# the checks live in host code shared by both backends: the CUDA runs check that
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def cif_inputs(dtype=torch.float64, requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 6, 3, generator=g, dtype=dtype).to(device)
    alphas = (torch.rand(2, 6, generator=g, dtype=dtype) + 0.1).to(device)
    return hidden.requires_grad_(requires_grad), alphas.requires_grad_(requires_grad)


def contrastive_inputs(requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(22)
    student = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    return student.requires_grad_(requires_grad), teacher.requires_grad_(requires_grad)


# --- item 7: float16 alphas do not overflow alpha_sum ------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_alpha_sum_is_float32_and_finite(dtype, device):
    T = 70000  # 70000 * 1.0 > 65504, the float16 maximum
    hidden = torch.randn(1, T, 2).to(device, dtype)
    alphas = torch.ones(1, T, dtype=dtype, device=device, requires_grad=True)
    out = cifops.cif(hidden, alphas, max_tokens=2)
    assert out.alpha_sum.dtype == torch.float32
    assert out.alpha_sum.tolist() == [70000.0]
    assert out.embeds.dtype == dtype
    out.alpha_sum.sum().backward()  # float32 gradient flows back into half alphas
    assert alphas.grad.dtype == dtype and (alphas.grad == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_alpha_sum_dtype_of_fake_kernel_matches(dtype):
    hidden, alphas = cif_inputs(dtype=dtype)
    real = cifops.cif(hidden, alphas, max_tokens=3).alpha_sum
    fake = cifops.cif(hidden.to(META), alphas.to(META), max_tokens=3).alpha_sum
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert real.dtype == fake.dtype == expected
    torch.library.opcheck(torch.ops.cifops.cif_forward.default,
                          (hidden, alphas, None, None, 1.0, 1e-4, 0.2, True, 3))


def test_compat_torch_cif_alpha_sum_keeps_torch_cifs_dtype():
    from cifops.compat.torch_cif import cif_function
    hidden, alphas = cif_inputs(dtype=torch.float16)
    assert cif_function(hidden, alphas * 0.5)["alpha_sum"][0].dtype == torch.float16


# --- item 8: scale_eps is checked only when it is used -------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_threshold_below_scale_eps_without_target_lengths(device):
    hidden, alphas = cif_inputs(device=device)
    alphas = alphas * 1e-4
    out = cifops.cif(hidden, alphas, threshold=5e-5)
    ref = cif_reference(hidden.cpu(), alphas.cpu(), threshold=5e-5)
    assert torch.equal(out.token_lengths.cpu(), ref.token_lengths)
    torch.testing.assert_close(out.embeds.cpu(), ref.embeds)
    # with target_lengths the eps is used, and must stay below the threshold
    with pytest.raises(RuntimeError, match=r"cifops\.cif: scale_eps must be in \[0, threshold\) "
                                           r"= \[0, 5e-05\) when target_lengths is given, got "
                                           r"0\.0001"):
        cifops.cif(hidden, alphas, threshold=5e-5,
                   target_lengths=torch.tensor([2, 3], device=device))
    out = cifops.cif(hidden, alphas, threshold=5e-5, scale_eps=1e-6,
                     target_lengths=torch.tensor([2, 3], device=device))
    assert out.token_lengths.tolist() == [2, 3]