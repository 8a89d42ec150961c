"""Where the parity rule is applied inside one output tensor: to the whole tensor, to each slice
along each of its axes, and whether the check can decide anything at all.

**Per scale band of slices.** The rule of :mod:`normfold.parity` (``error <= atol + rtol *
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

**Undecidable** (:mod:`normfold.parity`). When the noise part of a whole output's allowed error
(``noise_factor * noise``) reaches its largest magnitude, even an output of zeros would pass: the
check decides nothing (an ill-conditioned fp16 model whose one-ulp parameter perturbations flip a
sigmoid: allowed error 4.0 on an output of scale 1.0). Such an output fails with a message that
says so, never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SliceVerdict", "judge_slices"]


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
    error, noise, magnitude = (_masked(t, where) for t in (error, noise, magnitude))
    top = float(magnitude.max()) if magnitude.numel() else 0.0
    if top <= 0:
        return None
    worst: SliceVerdict | None = None
    worst_ratio = 1.0
    for axis in range(error.dim()):
        if error.shape[axis] <= 1:
            continue
        others = [d for d in range(error.dim()) if d != axis]
        err, noi, mag = (t.amax(dim=others) if others else t for t in (error, noise, magnitude))
        octaves = torch.log2(top / mag.clamp_min(1e-300))
        band = torch.where(mag > 0, torch.floor(octaves / _BAND_BITS), torch.full_like(mag, -1))
        for b in torch.unique(band).tolist():
            members = band == b
            e, n, m = float(err[members].max()), float(noi[members].max()), float(mag[members].max())
            allowed = atol + rtol * m + noise_factor * n
            ratio = e / allowed if allowed > 0 else (math.inf if e > 0 else 0.0)
            if ratio > worst_ratio:
                worst_ratio = ratio
                idx = members.nonzero().flatten()
                shown = tuple(int(i) for i in idx[:5])
                worst = SliceVerdict(axis, shown, int(idx.numel()), e, allowed, m, n)
    return worst
