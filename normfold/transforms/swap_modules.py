"""The modules :func:`normfold.swap_norms` puts in place of a BatchNorm, and the moves of its state.

With ``x`` the input, ``c`` the channel (dim 1), ``p`` a position, ``gamma``/``beta`` the affine
parameters and ``mu``/``var`` the stored statistics:

* :class:`ChannelsLayerNorm`: statistics over the ``C`` channels at each sample and position (as in
  ConvNeXt), ``y[n, c, p] = (x[n, c, p] - m[n, p]) / sqrt(v[n, p] + eps) * gamma_c + beta_c``;
  on ``(N, C)`` inputs it is ``nn.LayerNorm(C)``.
* :class:`FrozenBatchNorm`: the eval-mode BatchNorm function in train and eval mode,
  ``y = (x - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c``, through the very kernel an eval
  BatchNorm calls (``F.batch_norm(training=False)``), so bit-identical to it in every dtype.

The affine parameters move to the replacement as the same ``Parameter`` objects (an optimizer
keeps them, and the ``state_dict`` keys stay); statistics are cloned (buffers are never shared).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.errors import UsageError

__all__ = ["ChannelsLayerNorm", "FrozenBatchNorm", "factory_kwargs", "move_affine", "move_stats"]


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) at every position of an ``(N, C, *)`` input.

    ``y[n, :, p] = layer_norm(x[n, :, p]) * weight + bias``; on ``(N, C)`` inputs it is
    ``nn.LayerNorm(C)``. Parameters are named ``weight``/``bias``, as in BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (self.num_features,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: the eval-mode BatchNorm function in train and eval mode.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel (dim 1),
    through ``F.batch_norm(training=False)``: bit-identical to an eval BatchNorm with the same
    state. ``state_dict`` keys are BatchNorm's (``running_mean``, ``running_var``,
    ``num_batches_tracked``, ``weight``, ``bias``); ``num_batches_tracked`` is kept but unused.
    ``weight``/``bias`` are trainable parameters when ``trainable_affine``, else buffers.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        trainable_affine: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.trainable_affine = trainable_affine
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        for name, init in (("weight", torch.ones), ("bias", torch.zeros)):
            if not affine:
                self.register_parameter(name, None)
            elif trainable_affine:
                self.register_parameter(name, nn.Parameter(init(num_features, **kw)))
            else:
                self.register_buffer(name, init(num_features, **kw))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, *, trainable_affine: bool = False) -> FrozenBatchNorm:
        """A frozen copy of ``bn``'s state (statistics cloned; parameters shared when trainable)."""
        if bn.running_mean is None or bn.running_var is None:
            raise UsageError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
        frozen = cls(bn.num_features, bn.eps, bn.affine, trainable_affine, **factory_kwargs(bn))
        move_stats(bn, frozen)
        if bn.affine and trainable_affine:
            move_affine(bn, frozen)
        elif bn.affine:
            frozen.weight = bn.weight.detach().clone()
            frozen.bias = bn.bias.detach().clone()
        return frozen.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, momentum=0.0, eps=self.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"trainable_affine={self.trainable_affine}"
        )


def factory_kwargs(bn: _BatchNorm) -> dict[str, Any]:
    """``device``/``dtype`` of the BN's tensors, for the replacement's constructor."""
    for t in (bn.weight, bn.running_mean):
        if t is not None:
            return {"device": t.device, "dtype": t.dtype}
    return {}


def move_affine(bn: _BatchNorm, new: nn.Module) -> None:
    """``weight``/``bias`` to ``new`` as the same Parameter objects (an optimizer keeps them)."""
    if not bn.affine:
        return
    for name in ("weight", "bias"):
        value = getattr(bn, name)
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value.detach().clone())
        setattr(new, name, value)


def move_stats(bn: _BatchNorm, new: nn.Module) -> None:
    """Running statistics and batch counter, cloned (buffers are never shared)."""
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(bn, name, None)
        if value is not None:
            setattr(new, name, value.detach().clone())
