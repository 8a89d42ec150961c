"""Where the parity rule is applied inside one output tensor: to the whole tensor, to each slice
along each of its axes, and whether the check can decide anything at all.

**Per scale band of slices.** The rule of :mod:`normfold.check.parity` (``error <= atol + rtol *
max|exact| + noise_factor * noise``) over a whole tensor lets a large-scale part hide a small-scale
one: class probabilities (std 0.01) that share a tensor with box coordinates (~640) could move by
40x their own rounding and still pass, since ``max|exact|`` and ``noise`` come from the boxes. So
the rule is also applied along every axis ``d`` (of size > 1): the slices ``x.select(d, j)``
(a channel, a sample, a position) are grouped into bands of comparable scale, by their largest
``|exact|`` relative to the tensor's (``band = floor(log2(max|exact| / max|exact[d, j]|) / 4)``:
16x per band; all-zero slices form a band of their own), and each band is judged with its own
maxima::

    for every axis d, band b:   max error[d, b] <= atol + rtol * max|exact[d, b]| + k * max noise[d, b]

Pooling within a band, rather than judging each element alone as polygraphy does, keeps the
noise estimate a maximum over many roundings (one element's own rounding error can be zero by
chance, and a fold's is not); grouping by scale keeps one part from hiding another. The band of
the largest slices is the whole-tensor rule. Maxima run over the elements finite in every tensor
involved.

**Undecidable** (:mod:`normfold.check.parity`). When the noise part of a whole output's allowed error
(``noise_factor * noise``) reaches its largest magnitude, even an output of zeros would pass: the
check decides nothing (an ill-conditioned fp16 model whose one-ulp parameter perturbations flip a
sigmoid: allowed error 4.0 on an output of scale 1.0). Such an output fails with a message that
says so, never passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["SliceVerdict", "atol_needed", "factor_needed", "judge_slices"]


_BAND_BITS = 4.0  # a band spans 16x in scale


@dataclass(frozen=True)
class SliceVerdict:
    """The worst failing band of slices of one output (the largest ``error / allowed``)."""

    axis: int
    indices: tuple[int, ...]  # the band's slices along ``axis`` (the first few, for the message)
    count: int
    error: float
    allowed: float
    max_abs_exact: float
    noise: float

    def describe(self) -> str:
        shown = ", ".join(str(i) for i in self.indices) + (", ..." if self.count > len(self.indices) else "")
        return (
            f"along axis {self.axis}, the {self.count} slice(s) of scale max|ref| {self.max_abs_exact:.1e} "
            f"(index {shown}): error vs the float64 reference {self.error:.1e} > allowed "
            f"{self.allowed:.1e} (their own noise {self.noise:.1e}): a small-scale part of the output moved "
            "more than its own rounding"
        )


def _masked(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return torch.where(where, values, torch.zeros((), dtype=values.dtype))


def _bands(
    error: torch.Tensor, noise: torch.Tensor, magnitude: torch.Tensor, where: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, float, float, float]]:
    """``(axis, members, max error, max noise, max |exact|)`` of every band of slices along every
    axis of size > 1 (module docstring), over the elements where ``where`` holds."""
    error, noise, magnitude = (_masked(t, where) for t in (error, noise, magnitude))
    top = float(magnitude.max()) if magnitude.numel() else 0.0
    if top <= 0:
        return
    for axis in range(error.dim()):
        if error.shape[axis] <= 1:
            continue
        others = [d for d in range(error.dim()) if d != axis]
        err, noi, mag = (t.amax(dim=others) if others else t for t in (error, noise, magnitude))
        octaves = torch.log2(top / mag.clamp_min(1e-300))
        band = torch.where(mag > 0, torch.floor(octaves / _BAND_BITS), torch.full_like(mag, -1))
        for b in torch.unique(band).tolist():
            members = band == b
            picked = (float(t[members].max()) for t in (err, noi, mag))
            yield axis, members, *picked


def judge_slices(
    error: torch.Tensor,
    noise: torch.Tensor,
    magnitude: torch.Tensor,
    where: torch.Tensor,
    rtol: float,
    atol: float,
    noise_factor: float,
) -> SliceVerdict | None:
    """The worst failing band of slices over every axis, or None when every band passes.

    ``error``, ``noise`` and ``magnitude`` are per element (the candidate's and the model's
    distance from the exact output, and ``|exact|``), counted only where ``where`` holds.
    """
    worst: SliceVerdict | None = None
    worst_ratio = 1.0
    for axis, members, e, n, m in _bands(error, noise, magnitude, where):
        allowed = atol + rtol * m + noise_factor * n
        ratio = e / allowed if allowed > 0 else (math.inf if e > 0 else 0.0)
        if ratio > worst_ratio:
            worst_ratio = ratio
            idx = members.nonzero().flatten()
            worst = SliceVerdict(axis, tuple(int(i) for i in idx[:5]), int(idx.numel()), e, allowed, m, n)
    return worst


def _maxima(
    error: torch.Tensor, noise: torch.Tensor, magnitude: torch.Tensor, where: torch.Tensor
) -> list[tuple[float, float, float]]:
    """``(max error, max noise, max |exact|)`` of the whole output, then of every band."""
    whole = tuple(float(_masked(t, where).max()) if t.numel() else 0.0 for t in (error, noise, magnitude))
    return [whole, *((e, n, m) for _, _, e, n, m in _bands(error, noise, magnitude, where))]  # type: ignore[list-item]


def factor_needed(
    error: torch.Tensor,
    noise: torch.Tensor,
    magnitude: torch.Tensor,
    where: torch.Tensor,
    rtol: float,
    atol: float,
) -> float:
    """The smallest ``noise_factor`` with which the whole output and every band of slices pass:
    the largest ``(error - floor) / noise`` (0 where the floor alone admits the error; ``inf``
    where it does not and the noise is 0)."""
    needed = 0.0
    for e, n, m in _maxima(error, noise, magnitude, where):
        over = e - (atol + rtol * m)
        if over > 0:
            needed = max(needed, over / n if n > 0 else math.inf)
    return needed


def atol_needed(error: torch.Tensor, magnitude: torch.Tensor, where: torch.Tensor, rtol: float) -> float:
    """The smallest ``atol`` with which the whole output and every band of slices pass at
    ``rtol`` with no noise allowance: the largest ``error - rtol * max|exact|``, at least 0."""
    zero = torch.zeros_like(error)
    return max(0.0, *(e - rtol * m for e, _, m in _maxima(error, zero, magnitude, where)))
