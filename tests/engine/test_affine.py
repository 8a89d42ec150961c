"""The fold arithmetic alone: folded weights reproduce layer -> BatchNorm in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normfold.engine.affine import bn_affine, fold_affine

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _bn(x: torch.Tensor, mean, var, gamma, beta, eps: float) -> torch.Tensor:
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


@settings(max_examples=60, deadline=None)
@given(
    dims=st.integers(1, 3),
    groups=st.integers(1, 3),
    c_in_per_group=st.integers(1, 3),
    c_out_per_group=st.integers(1, 3),
    transpose=st.booleans(),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_folded_weights_equal_layer_then_bn(
    dims, groups, c_in_per_group, c_out_per_group, transpose, bias, affine, seed
):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = groups * c_in_per_group, groups * c_out_per_group
    k = (2,) * dims
    f64 = torch.float64
    if transpose:
        weight = torch.randn(c_in, c_out_per_group, *k, generator=gen, dtype=f64)
    else:
        weight = torch.randn(c_out, c_in_per_group, *k, generator=gen, dtype=f64)
    b = torch.randn(c_out, generator=gen, dtype=f64) if bias else None
    mean = torch.randn(c_out, generator=gen, dtype=f64) + 0.5
    var = torch.rand(c_out, generator=gen, dtype=f64) * 3 + 0.1
    gamma = torch.rand(c_out, generator=gen, dtype=f64) + 0.5 if affine else None
    beta = torch.randn(c_out, generator=gen, dtype=f64) if affine else None
    x = torch.randn(2, c_in, *(4,) * dims, generator=gen, dtype=f64)

    layer = _CONV_T[dims] if transpose else _CONV[dims]
    expected = _bn(layer(x, weight, b, groups=groups), mean, var, gamma, beta, 1e-3)

    scale, shift = bn_affine(mean, var, gamma, beta, 1e-3)
    w2, b2 = fold_affine(weight, b, scale, shift, transpose=transpose, groups=groups)
    got = layer(x, w2, b2, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_linear_fold_and_dtype_cast_back():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, generator=gen).to(torch.bfloat16)
    mean, var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    scale, shift = bn_affine(mean, var, None, None, 1e-5)
    w2, b2 = fold_affine(weight, None, scale, shift)
    assert w2.dtype == b2.dtype == torch.bfloat16
    # float64 inside, one rounding at the end
    expected = (weight.double() * scale[:, None]).to(torch.bfloat16)
    assert torch.equal(w2, expected)
    torch.testing.assert_close(b2.double(), (-mean.double() * scale).to(torch.bfloat16).double())
