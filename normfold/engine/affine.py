"""Pure tensor math: an eval-mode BatchNorm as a per-channel affine map, folded into weights.

In eval mode a BatchNorm maps each channel ``c`` (axis 1 of its input) by

    y_c = gamma_c * (x_c - mean_c) / sqrt(var_c + eps) + beta_c = s_c * x_c + t_c
    s_c = gamma_c / sqrt(var_c + eps)
    t_c = beta_c - mean_c * s_c

with ``gamma = 1`` and ``beta = 0`` when the norm has ``affine=False``.

If ``x_c`` is output channel ``c`` of a Conv or Linear, ``x_c = W[c] * u + b_c``, so

    y_c = (s_c * W[c]) * u + (s_c * b_c + t_c)     =>   W'[c] = s_c * W[c],  b'_c = s_c * b_c + t_c

(``b = 0`` when the layer has no bias). Conv and Linear weights keep output channels on axis 0.
A ConvTranspose weight is ``(C_in, C_out / groups, *k)``: output channel ``c = g * (C_out / groups) + j``
is produced by the rows of group ``g`` (``W[g * C_in/groups : (g + 1) * C_in/groups]``) at column ``j``,
so the weight is viewed as ``(groups, C_in / groups, C_out / groups, *k)`` and scaled along axis 2.

Everything is computed in float64 and cast back to the parameter's dtype once, so an fp16 or
bf16 model is rounded a single time instead of at every intermediate step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bn_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Return ``(scale, shift)`` in float64 such that ``bn(x) == scale * x + shift`` per channel."""
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    return scale, shift


def fold_affine(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y = scale * layer(x) + shift`` into the layer's ``(weight, bias)``.

    ``weight`` is a Conv/Linear weight (output channels on axis 0) or, with ``transpose=True``,
    a ConvTranspose weight ``(C_in, C_out / groups, *k)``. Returns new tensors in the dtype of
    ``weight``; a missing bias becomes a new one.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    b = torch.zeros_like(shift) if bias is None else bias.detach().to(torch.float64)
    ones = [1] * (w.dim() - 2)
    if transpose:
        c_in, c_out_per_group, *kernel = w.shape
        w = w.reshape(groups, c_in // groups, c_out_per_group, *kernel)  # (G, C_in/G, C_out/G, *k)
        w = w * scale.reshape(groups, 1, c_out_per_group, *ones)
        w = w.reshape(c_in, c_out_per_group, *kernel)
    else:
        w = w * scale.reshape(-1, 1, *ones)  # (C_out, C_in/G, *k) or (out, in)
    new_bias = b * scale + shift
    return w.to(dtype), new_bias.to(dtype)


def scale_output(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, transpose: bool, groups: int
) -> tuple[Tensor, Tensor]:
    """float64 ``(W', b')`` with ``layer'(x) = scale * layer(x) + shift`` per output channel."""
    w, b = fold_affine(
        weight.to(torch.float64), None if bias is None else bias.to(torch.float64),
        scale, shift, transpose=transpose, groups=groups,
    )  # fmt: skip
    return w, b


def scale_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int
) -> tuple[Tensor, Tensor]:
    """float64 ``(W', b')`` with ``layer'(x) = layer(scale * x + shift)`` (the forward fold).

    ``scale``/``shift`` run over the layer's input channels. A Conv weight ``(C_out, C_in/G, *k)``
    (a Linear weight is the case ``G = 1``, no ``k``) sees input channel ``g * C_in/G + i`` in
    group ``g`` only, so ``W'[o, i] = W[o, i] * scale[g*C_in/G + i]`` for ``o`` in group ``g``, and
    the shift becomes ``b'[o] = b[o] + sum_{i,k} W[o, i, k] * shift[g*C_in/G + i]``. That constant
    reaches every output position only when no zero padding is added (the caller checks).
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, *kernel = w.shape
    ones = [1] * len(kernel)
    wg = w.reshape(groups, c_out // groups, c_in_g, *kernel)  # (G, C_out/G, C_in/G, *k)
    s = scale.to(torch.float64).reshape(groups, 1, c_in_g, *ones)
    t = shift.to(torch.float64).reshape(groups, 1, c_in_g)
    b = torch.zeros(c_out, dtype=torch.float64, device=w.device)
    if bias is not None:
        b = bias.detach().to(torch.float64)
    b = b + (wg.reshape(groups, c_out // groups, c_in_g, -1).sum(-1) * t).sum(-1).reshape(c_out)
    return (wg * s).reshape(w.shape), b
