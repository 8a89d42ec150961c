"""Layers written by hand rather than as the stock modules: what a fold must see through.

* :class:`SamePad`: timm's :class:`Conv2dSame`, TensorFlow ``SAME`` padding computed from the
  input's shape at run time (not fx-traceable; ``torch.export`` sees concrete sizes).
* :class:`Functional`: modules hold the parameters, ``forward`` makes only functional calls.
* :class:`BNAct`: timm's :class:`BatchNormAct2d`, a BatchNorm2d subclass with dropout and an
  activation in its own forward.
* :class:`CustomBN`: :class:`CustomNorm2d` (not a ``_BatchNorm``) and an inline
  ``gain * (h - mean) / std + bias``, whose statistics :func:`calibrate_custom_norms` measures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import affine_, calibration_batch, channel_stats


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow ``SAME`` padding computed from the input's shape at run time.

    ``forward`` reads ``x.shape[-2:]``, does ``math.ceil``/``max`` arithmetic and branches on the
    result, so ``torch.fx.symbolic_trace`` cannot trace it (a Proxy is not a number);
    ``torch.export`` sees concrete spatial sizes and records just ``pad`` + ``conv2d``. The padding
    can be asymmetric (the extra row/column goes bottom/right).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, **kwargs: object) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SamePad(nn.Module):
    """EfficientNet-TF-style CNN built from :class:`Conv2dSame`; not fx-traceable, exportable.

    Every BatchNorm follows a ``Conv2dSame`` (a Conv2d subclass whose forward uses its own
    ``weight``/``bias``) and folds backwards into it:

    * ``stem -> bn_stem``: 3x3 stride 2, no bias; 32x32 pads (0, 1) per axis (asymmetric).
    * ``depthwise -> bn_depthwise``: 5x5 stride 2, groups=16; 16x16 pads (1, 2).
    * ``project -> bn_project``: 1x1 with bias; no padding, the ``F.pad`` branch is skipped.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.depthwise = Conv2dSame(16, 16, 5, stride=2, groups=16, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(16)
        self.project = Conv2dSame(16, 32, 1, bias=True)
        self.bn_project = nn.BatchNorm2d(32)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn_stem(self.stem(x)))  # 32x32 -> 16x16
        x = self.act(self.bn_depthwise(self.depthwise(x)))  # 16x16 -> 8x8
        x = self.act(self.bn_project(self.project(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Functional(nn.Module):
    """Modules hold the parameters, but ``forward`` only makes functional calls.

    No submodule is ever *called*: convs run as ``F.conv2d(x, self.conv1.weight, ...)``, norms as
    ``F.batch_norm(x, self.bn1.running_mean, ..., False, 0.0, self.bn1.eps)`` (eval statistics
    always, whatever the mode), linears as ``F.linear``. Every pair is foldable backwards:

    * ``conv1 -> bn1`` (conv without bias), ``conv2 -> bn2`` (conv with bias, stride 2).
    * ``fc -> bn_fc``: ``F.linear`` (no bias) -> ``F.batch_norm`` on ``(N, 64)``.

    Because ``training=False`` is hard-coded, train-mode passes cannot measure the statistics;
    the factory measures them with :func:`~normfold.models.calibration.measure_functional_batch_norms`.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 64, bias=False)
        self.bn_fc = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv1, self.bn1
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = F.relu(x)
        conv, bn = self.conv2, self.bn2
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = F.relu(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        fc, bn = self.fc, self.bn_fc
        x = F.linear(x, fc.weight, fc.bias)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.linear(F.relu(x), self.head.weight, self.head.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose forward also applies drop and act.

    ``forward`` re-implements ``_BatchNorm.forward`` with ``F.batch_norm`` (as timm does); in eval
    mode that is ``F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)``
    followed by ``self.drop`` and ``self.act``. It *is* a ``_BatchNorm``, so a fold that replaces
    it with ``nn.Identity`` silently drops the activation: the affine part folds, ``drop`` and
    ``act`` must stay.
    """

    def __init__(self, num_features: int, act: nn.Module | None = None, drop: float = 0.0) -> None:
        super().__init__(num_features)
        self.drop: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act: nn.Module = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in _BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps
        )
        return self.act(self.drop(x))


class BNAct(nn.Module):
    """Small CNN whose norms are all :class:`BatchNormAct2d`; each folds backwards into its conv.

    * ``stem -> bn_stem``: act ReLU.
    * ``depthwise -> bn_depthwise``: act SiLU, with an (eval no-op) ``Dropout(0.1)``.
    * ``project -> bn_project``: act Identity (timm's ``apply_act=False``), then the residual add.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn_stem = BatchNormAct2d(16, act=nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_depthwise = BatchNormAct2d(16, act=nn.SiLU(), drop=0.1)
        self.project = nn.Conv2d(16, 16, 1, bias=True)
        self.bn_project = BatchNormAct2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_stem(self.stem(x))
        x = x + self.bn_project(self.project(self.bn_depthwise(self.depthwise(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class CustomNorm2d(nn.Module):
    """A hand-written eval BatchNorm that is *not* a ``_BatchNorm``: buffers ``mean``/``var``,
    parameters ``gain``/``bias``, attribute ``eps``; ``(x - mean) / sqrt(var + eps) * gain + bias``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.var[:, None, None] + self.eps)
        return (x - self.mean[:, None, None]) / std * self.gain[:, None, None] + self.bias[:, None, None]


class CustomBN(nn.Module):
    """Norms written by hand rather than with ``nn.BatchNorm*``; all three fold backwards.

    * ``conv1 -> bn1``: an ordinary BatchNorm2d (a control, upstream of the custom norms).
    * ``conv2 -> norm2``: :class:`CustomNorm2d`, a module with its own buffer/parameter names.
    * ``conv3 -> inline``: the tutorials' BatchNorm written in ``forward``,
      ``bn_gain * (h - bn_mean) / bn_std + bn_bias``. ``bn_gain``/``bn_bias`` are parameters
      stored as ``(1, C, 1, 1)``; ``bn_mean``/``bn_std`` are ``(C,)`` buffers reshaped in forward.
      ``conv3`` has a bias.

    Neither custom norm is a ``_BatchNorm``, so :func:`calibrate` does not see them; the factory
    sets their gains/biases and measures their statistics (:func:`calibrate_custom_norms`).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.norm2 = CustomNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.bn_gain = nn.Parameter(torch.ones(1, 32, 1, 1))
        self.bn_bias = nn.Parameter(torch.zeros(1, 32, 1, 1))
        self.register_buffer("bn_mean", torch.zeros(32))
        self.register_buffer("bn_std", torch.ones(32))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        h = self.conv3(x)
        mean, std = self.bn_mean.reshape(1, -1, 1, 1), self.bn_std.reshape(1, -1, 1, 1)
        h = self.bn_gain * (h - mean) / std + self.bn_bias
        return self.fc(torch.flatten(self.pool(self.relu(h)), 1))


def calibrate_custom_norms(
    model: CustomBN, input_shape: tuple[int, ...], generator: torch.Generator
) -> None:
    """Affine parameters and measured statistics for :class:`CustomBN`'s hand-written norms.

    Same distributions as :func:`calibrate`; statistics are measured in one eval-mode pass (after
    ``calibrate``, so the upstream ``bn1`` is final) by hooks that set each norm's buffers from its
    input just before it is used.
    """
    customs = [m for m in model.modules() if isinstance(m, CustomNorm2d)]

    def measure_custom(norm: CustomNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        mean, var = channel_stats(args[0])
        norm.mean.copy_(mean)
        norm.var.copy_(var)

    def measure_inline(conv: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        mean, var = channel_stats(out)
        model.bn_mean.copy_(mean)
        model.bn_std.copy_(torch.sqrt(var + 1e-5))

    with torch.no_grad():
        for norm in customs:
            affine_(norm.gain, norm.bias, generator)
        affine_(model.bn_gain, model.bn_bias, generator)
        handles = [norm.register_forward_pre_hook(measure_custom) for norm in customs]
        handles.append(model.conv3.register_forward_hook(measure_inline))
        try:
            model(calibration_batch(input_shape, generator))
        finally:
            for handle in handles:
                handle.remove()
