"""Realistic BatchNorm state for the zoo: random affine parameters and statistics measured on real
(shifted, scaled) batches, never the ``0``/``1`` defaults under which a broken fold would pass.

Random inputs are ``N(0, 1) * 2 + 0.5`` (:func:`random_input`); affine weights ``U(0.5, 1.5)``,
biases ``N(0, 0.2)``. :func:`calibrate` measures running statistics as the cumulative average of
:data:`CALIBRATION_PASSES` train-mode passes of :data:`CALIBRATION_BATCH` samples;
:func:`measure_functional_batch_norms` measures the statistics of ``F.batch_norm(...,
training=False)`` calls, which no train-mode pass updates, in one eval-mode pass as large as those.
:func:`build_calibrated` constructs and calibrates a model with the global RNG forked and seeded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

M = TypeVar("M", bound=nn.Module)

CALIBRATION_BATCH = 16
CALIBRATION_PASSES = 3


def random_input(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Shifted, scaled Gaussian: pushes BatchNorm statistics well away from 0 / 1."""
    return torch.randn(shape, generator=generator) * 2.0 + 0.5


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def calibrate(model: nn.Module, input_shapes: Sequence[tuple[int, ...]], generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and real statistics, then switch to eval.

    Affine weights become ``U(0.5, 1.5)``, biases ``N(0, 0.2)``. They are set *before* measuring
    the statistics: with the default ``weight=1, bias=0`` a train-mode BN outputs exactly
    zero-mean activations, so a later norm fed only through bias-free convs would measure a
    running mean of ~0. Running statistics are the cumulative average (``momentum=None``) over
    a few train-mode passes on random batches of ``input_shapes`` (batch dimension replaced); the
    momentum is restored afterwards. Norms with ``track_running_stats=False`` keep no statistics.
    """
    bns = _batchnorms(model)
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            if bn.affine:
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.2)
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None
        model.train()
        for _ in range(CALIBRATION_PASSES):
            model(*(random_input((CALIBRATION_BATCH, *shape[1:]), generator) for shape in input_shapes))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def affine_(gain: torch.Tensor, bias: torch.Tensor, generator: torch.Generator) -> None:
    """The affine parameters :func:`calibrate` gives a BatchNorm: ``U(0.5, 1.5)``, ``N(0, 0.2)``."""
    gain.copy_(torch.rand(gain.shape, generator=generator) + 0.5)
    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.2)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and unbiased variance, as a train-mode BatchNorm measures them."""
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dims), x.var(dims)


class _MeasureBatchNorm(TorchFunctionMode):
    """Set the statistics of every eval-mode ``F.batch_norm`` call from the input it receives."""

    _signature = inspect.signature(F.batch_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = self._signature.bind(*args, **kwargs).arguments
            if not call.get("training", False) and call.get("running_mean") is not None:
                mean, var = channel_stats(call["input"])
                call["running_mean"].copy_(mean)
                call["running_var"].copy_(var)
        return func(*args, **kwargs)


def calibration_batch(input_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One eval-mode batch as large as all of :func:`calibrate`'s train-mode batches together."""
    return random_input((CALIBRATION_BATCH * CALIBRATION_PASSES, *input_shape[1:]), generator)


def measure_functional_batch_norms(
    model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator
) -> None:
    """Statistics for norms computed with ``F.batch_norm(..., training=False, ...)`` in any mode.

    Such calls never update their running statistics, so :func:`calibrate`'s train-mode passes
    leave them at ``0``/``1``. One eval-mode pass measures them in call order instead: each call
    gets the batch statistics of its actual input before it runs, so later norms see normalized
    inputs. (``calibrate`` has already set the affine parameters.)
    """
    with torch.no_grad(), _MeasureBatchNorm():
        model(calibration_batch(input_shape, generator))


def build_calibrated(
    input_shapes: Sequence[tuple[int, ...]],
    seed: int,
    make: Callable[[], M],
    post: Callable[[M, tuple[int, ...], torch.Generator], None] | None = None,
) -> M:
    """Construct and calibrate with the global RNG forked and seeded; inputs from a private generator.

    Calibration runs under the forked RNG too: train-mode layers such as Dropout draw from the
    global RNG, which must neither make the result depend on the caller's RNG nor advance it.
    ``post`` (same generator, after :func:`calibrate`, model in eval mode) sets up norms that
    ``calibrate`` cannot: ones that are no ``_BatchNorm`` or never update their statistics; it
    gets the first input's shape.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        generator = torch.Generator().manual_seed(seed)
        calibrate(model, input_shapes, generator)
        if post is not None:
            post(model, input_shapes[0], generator)
    return model
