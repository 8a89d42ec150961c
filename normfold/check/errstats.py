"""Error statistics of one compared output, polygraphy-style, and the smallest tolerance that
would pass.

For an output compared on one input set, with ``ref`` the float64 run of the original (the
*exact* reference; the original's output in its own dtype when there is none, ``against`` says
which) and ``cand`` the candidate's output, over the elements finite in every tensor involved::

    abs_i = |cand_i - ref_i|
    rel_i = abs_i / |ref_i|          over the elements with ref_i != 0 (0 there has no scale)

:class:`ErrorStats` holds the mean, median, 99th percentile (the ``ceil(0.99 n)``-th smallest)
and max of both, and the smallest tolerances with which the output would pass:

* ``min_noise_factor``: the smallest ``noise_factor`` of the rule, floor unchanged, that admits the
  whole output and every band of slices (:func:`normfold.check.slices.factor_needed`); 0 when the floor
  alone admits it, ``inf`` when it does not and the measured noise is 0, ``nan`` without an exact
  reference (no noise is measured);
* ``min_atol``: the smallest ``atol`` that admits the output at the rule's ``rtol`` with no noise
  allowance (a fixed tolerance, as polygraphy's ``--atol``): ``max(0, max abs_i - rtol * max|ref|)``
  over the whole output and, against an exact reference, every band of slices.

A report sums each output up over its input sets by :func:`worst_per_output`: the statistics of
the input set on which the output came closest to failing (largest error over allowed error).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from normfold.check.slices import atol_needed, factor_needed

__all__ = ["ErrorStats", "error_stats", "worst_per_output"]


@dataclass(frozen=True)
class ErrorStats:
    """The candidate's error on one output and input set (module docstring)."""

    against: str  # "float64" (the exact reference) or "original" (its own dtype: no exact one)
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_abs: float
    mean_rel: float
    median_rel: float
    p99_rel: float
    max_rel: float
    min_noise_factor: float
    min_atol: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (non-finite floats as the strings 'inf', 'nan')."""
        items = asdict(self).items()
        return {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in items}


def _summary(values: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean, median, 99th percentile and max (all 0 when there is nothing)."""
    if not values.numel():
        return 0.0, 0.0, 0.0, 0.0
    flat = values.flatten().cpu()
    n = flat.numel()

    def kth(q: float) -> float:
        return float(torch.kthvalue(flat, max(1, math.ceil(q * n))).values)

    return float(flat.mean()), kth(0.5), kth(0.99), float(flat.max())


def error_stats(
    cand: torch.Tensor,
    ref: torch.Tensor,
    where: torch.Tensor,
    *,
    exact: bool,
    noise: torch.Tensor | None,
    rtol: float,
    atol: float,
) -> ErrorStats:
    """The statistics of ``|cand - ref|`` where ``where`` holds (``ref``: the exact run when
    ``exact``, else the original's output; ``noise``: the model's per-element noise, or None)."""
    error = (cand - ref).abs()  # real for complex outputs too
    magnitude = ref.abs()
    picked, scale = error[where], magnitude[where]
    rel = picked[scale > 0] / scale[scale > 0]
    top = float(scale.max()) if scale.numel() else 0.0
    abs_stats, rel_stats = _summary(picked), _summary(rel)
    factor, min_atol = math.nan, max(0.0, abs_stats[3] - rtol * top)
    if exact and noise is not None:  # judged per band of slices too (normfold.check.slices)
        factor = factor_needed(error, noise, magnitude, where, rtol, atol)
        min_atol = atol_needed(error, magnitude, where, rtol)
    return ErrorStats("float64" if exact else "original", *abs_stats, *rel_stats, factor, min_atol)


class Judged(Protocol):
    """What :func:`worst_per_output` reads of a compared output (a
    :class:`~normfold.check.parity_report.OutputParity`; named structurally so that this module, which
    the parity records import, imports nothing of theirs)."""

    @property
    def name(self) -> str: ...
    @property
    def inputs(self) -> str: ...
    @property
    def max_abs_error(self) -> float: ...
    @property
    def exact_error(self) -> float: ...
    @property
    def allowed_error(self) -> float: ...
    @property
    def stats(self) -> ErrorStats | None: ...


def worst_per_output(outputs: Iterable[Judged]) -> dict[str, dict[str, Any]]:
    """Per output name, the statistics of the input set on which it came closest to failing
    (the largest ratio of its error to its allowed error), with that set's name."""
    chosen: dict[str, tuple[float, Judged]] = {}
    for o in outputs:
        if o.stats is None:
            continue
        measured = o.max_abs_error if math.isnan(o.exact_error) else o.exact_error
        ratio = measured / o.allowed_error if o.allowed_error > 0 else (math.inf if measured > 0 else 0.0)
        ratio = math.inf if math.isnan(ratio) else ratio
        if o.name not in chosen or ratio > chosen[o.name][0]:
            chosen[o.name] = (ratio, o)
    return {name: {"inputs": o.inputs, **o.stats.to_dict()} for name, (_, o) in chosen.items() if o.stats}
