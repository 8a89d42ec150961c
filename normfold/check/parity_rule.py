"""The parity rule's settings and its fixed floor: :class:`ParityRule` and :class:`Tolerance`.

:class:`ParityRule` is passed whole from every entry point down to every check of a run
(:mod:`normfold.check.parity` states the rule it parameterizes: ``allowed = atol + rtol * max|exact| +
noise_factor * noise``). Its numbers are checked when the rule is made: ``rtol``, ``atol`` and
``noise_factor`` finite and ``>= 0``, ``value_range`` finite with ``low < high``, ``perturbations``
an int in 0..16.

Default floor (:data:`DEFAULT_TOLERANCES`, the one place it is defined):

==============  ========  ========  ==============================================================
dtype           rtol      atol      why
==============  ========  ========  ==============================================================
float64         1e-9      1e-12     ~1e7 ulps (eps 2.2e-16): reordered sums over large fan-in
float32         1e-5      1e-6      ~80 ulps (eps 1.2e-7); polygraphy's fp32 default scale
float16         1e-2      1e-3      ~10 ulps (eps 9.8e-4); fp16 accumulates in fp16/fp32 by backend
bfloat16        4e-2      1e-2      ~5 ulps (eps 7.8e-3); only 8 significant bits
==============  ========  ========  ==============================================================

Other floating dtypes (e.g. float8) fall back to the float32 entry; complex64/complex128/complex32
use the float32/float64/float16 entries unless the mapping names them. Integer and bool outputs
must match exactly (tolerance 0/0) unless ``tolerances`` names their dtype; ``rtol``/``atol``
override floating and complex tolerances only. Integer outputs are compared through float64, so
differences beyond 2**53 in magnitude may go unseen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from normfold.errors import UsageError

__all__ = ["DEFAULT_TOLERANCES", "ParityRule", "Tolerance"]


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Tolerance:
    """The fixed floor of one output's allowed error: ``atol + rtol * max|ref|``.

    ``rtol`` is relative to the largest magnitude of the reference output (not per element).
    """

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            object.__setattr__(self, name, _check_number(f"Tolerance.{name}", value))

    def allowed(self, max_abs_reference: float) -> float:
        """The largest error allowed for an output whose largest reference magnitude is given."""
        return self.atol + self.rtol * max_abs_reference


#: Default tolerance per output dtype; see the module docstring for the reasoning.
DEFAULT_TOLERANCES: Mapping[torch.dtype, Tolerance] = MappingProxyType(
    {
        torch.float64: Tolerance(rtol=1e-9, atol=1e-12),
        torch.float32: Tolerance(rtol=1e-5, atol=1e-6),
        torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
        torch.bfloat16: Tolerance(rtol=4e-2, atol=1e-2),
    }
)

_EXACT = Tolerance(rtol=0.0, atol=0.0)
_COMPLEX_AS_REAL = {
    torch.complex128: torch.float64,
    torch.complex64: torch.float32,
    torch.complex32: torch.float16,
}


@dataclass(frozen=True, eq=False)
class ParityRule:
    """The one parity rule (module docstring), passed down to every check of a run.

    ``tolerances`` is merged over :data:`DEFAULT_TOLERANCES` (its entries win); ``rtol``/``atol``
    then override every floating and complex floor. ``value_range`` is the range of the uniform
    input set (:func:`normfold.check.reference.parity_sets`), as polygraphy's ``--val-range``.
    ``exact_limit_bytes`` caps the float64 copy of the model the exact reference needs; above it
    the floor alone applies (and the report says so). ``perturbations`` is the number of runs in
    the model's dtype with rounding-sized parameter perturbations that measure its noise, per input
    set (:mod:`normfold.check.exact`; a fixed count, made when a candidate needs them; 0: its own rounding
    error alone).
    """

    tolerances: Mapping[torch.dtype, Tolerance] = field(default_factory=lambda: DEFAULT_TOLERANCES)
    rtol: float | None = None
    atol: float | None = None
    noise_factor: float = 4.0
    perturbations: int = 4
    value_range: tuple[float, float] = (0.0, 255.0)
    exact_limit_bytes: int = 4 * 1024**3

    def __post_init__(self) -> None:
        if not isinstance(self.tolerances, Mapping):
            raise UsageError(
                "tolerances must be a mapping of torch.dtype to Tolerance, "
                f"got {type(self.tolerances).__name__}"
            )
        entries = dict(DEFAULT_TOLERANCES)
        for dtype, tol in self.tolerances.items():
            if not isinstance(dtype, torch.dtype):
                raise UsageError(f"tolerances keys must be torch.dtype, got {dtype!r}")
            if not isinstance(tol, Tolerance):
                raise UsageError(f"tolerances[{dtype}] must be a normfold.Tolerance, got {tol!r}")
            entries[dtype] = tol
        object.__setattr__(self, "tolerances", MappingProxyType(entries))
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_number(name, getattr(self, name)))
        object.__setattr__(self, "noise_factor", _check_number("noise_factor", self.noise_factor))
        if (
            isinstance(self.perturbations, bool)
            or not isinstance(self.perturbations, int)
            or not (0 <= self.perturbations <= 16)
        ):
            raise UsageError(f"perturbations must be an int in 0..16, got {self.perturbations!r}")
        low, high = _value_range(self.value_range)
        object.__setattr__(self, "value_range", (low, high))

    @classmethod
    def of(
        cls,
        rule: ParityRule | None = None,
        *,
        tolerances: Mapping[torch.dtype, Tolerance] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
    ) -> ParityRule:
        """``rule`` (default: the default rule) with the convenience keyword arguments applied."""
        rule = rule if rule is not None else cls()
        if not isinstance(rule, ParityRule):
            raise UsageError(f"rule must be a normfold.ParityRule, got {type(rule).__name__}")
        if tolerances is None and rtol is None and atol is None:
            return rule
        merged = {**rule.tolerances, **tolerances} if isinstance(tolerances, Mapping) else tolerances
        return dataclasses.replace(
            rule,
            tolerances=rule.tolerances if merged is None else merged,  # type: ignore[arg-type]
            rtol=rule.rtol if rtol is None else rtol,
            atol=rule.atol if atol is None else atol,
        )

    def floor(self, dtype: torch.dtype) -> Tolerance:
        """The fixed tolerance for an output of ``dtype`` (the table, then the overrides)."""
        if dtype in self.tolerances:
            tol = self.tolerances[dtype]
            return self._override(tol) if (dtype.is_floating_point or dtype.is_complex) else tol
        if dtype.is_complex:
            real = _COMPLEX_AS_REAL.get(dtype, torch.float32)
            return self._override(self.tolerances.get(real, self.tolerances[torch.float32]))
        if dtype.is_floating_point:
            return self._override(self.tolerances[torch.float32])
        return _EXACT

    def _override(self, tol: Tolerance) -> Tolerance:
        if self.rtol is None and self.atol is None:
            return tol
        return Tolerance(
            rtol=tol.rtol if self.rtol is None else self.rtol,
            atol=tol.atol if self.atol is None else self.atol,
        )


def _value_range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"value_range must be two numbers (low, high), got {value!r}") from e
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"value_range must be finite with low < high, got {value!r}")
    return low, high
