"""The records of a parity check: :class:`OutputParity` per compared output and input set, and the
:class:`ParityReport` over all of them, with its verdict.

A report passes only when at least one output was compared, at least one has a non-zero finite
value somewhere, every output passed and there is no structural problem (:func:`report_of` adds
the "nothing compared" problems). ``decided`` is False when it failed only because nothing could
be judged (no output, all zeros or constant, no finite value, or an allowed error reaching the
output's range), which is not a difference. JSON forms write non-finite floats as the strings
``'inf'``, ``'-inf'``, ``'nan'``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from normfold.check.errstats import ErrorStats, worst_per_output
from normfold.check.parity_rule import Tolerance

logger = logging.getLogger("normfold.check.parity")  # the comparison's own logger, as before the split

__all__ = ["OutputParity", "ParityReport", "report_of"]


@dataclass(frozen=True)
class OutputParity:
    """Comparison of one output tensor on one input set.

    ``max_abs_error``/``max_rel_error``/``mean_abs_error``/``p99_abs_error`` are the candidate's
    distance from the original (relative to ``max_abs_reference``, the largest finite magnitude of
    the original's output); ``max_abs_error_at`` is the index of the largest. ``noise`` is the
    model's noise (module docstring: the original's own distance from
    the exact float64 reference, or a perturbed run's if larger) and ``exact_error`` the
    candidate's (both ``nan`` without an exact reference); the pass criterion is ``exact_error``
    (else ``max_abs_error``) ``<= allowed_error``. When the shapes differ nothing can be compared
    and the errors are ``inf``. ``problem`` explains a structural failure.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    tolerance: Tolerance
    passed: bool
    problem: str | None
    max_abs_reference: float = math.nan
    inputs: str = "given"  # the input set this comparison ran on
    noise: float = math.nan
    exact_error: float = math.nan
    allowed_error: float = math.nan
    max_abs_error_at: tuple[int, ...] = ()  # the element of the largest difference from the original
    p99_abs_error: float = math.nan  # 99th percentile of the differences from the original
    slice_failure: str | None = None  # the worst slice that fails the rule (normfold.check.slices)
    decided: bool = True  # False: the check could not tell a change from rounding (problem says why)
    stats: ErrorStats | None = None  # vs the float64 run (else the original): normfold.check.errstats

    def failure(self) -> str | None:
        """One-line reason this output failed, naming it and the offending numbers; None if passed."""
        if self.passed:
            return None
        parts: list[str] = []
        if self.problem:
            parts.append(self.problem)
        if not self.problem and self.slice_failure:
            parts.append(self.slice_failure)
        elif not self.problem:
            measured, against = (
                (self.max_abs_error, "the original")
                if math.isnan(self.exact_error)
                else (self.exact_error, "the float64 reference")
            )
            own = "" if math.isnan(self.noise) else f"; the model's own noise {self.noise:.1e}"
            parts.append(
                f"error vs {against} {measured:.1e} > allowed {self.allowed_error:.1e} (floor: rtol "
                f"{self.tolerance.rtol:.0e} x max|ref| {self.max_abs_reference:.1e} + atol "
                f"{self.tolerance.atol:.0e}{own})"
            )
        return f"{self.name} on {self.inputs} inputs: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": self.inputs,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "mean_abs_error": _json_float(self.mean_abs_error),
            "max_abs_error_at": list(self.max_abs_error_at),
            "p99_abs_error": _json_float(self.p99_abs_error),
            "max_abs_reference": _json_float(self.max_abs_reference),
            "noise": _json_float(self.noise),
            "exact_error": _json_float(self.exact_error),
            "allowed_error": _json_float(self.allowed_error),
            "tolerance": {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol},
            "passed": self.passed,
            "problem": self.problem,
            "slice_failure": self.slice_failure,
            "stats": self.stats.to_dict() if self.stats is not None else None,
        }


@dataclass(frozen=True)
class ParityReport:
    """One :class:`OutputParity` per compared tensor and input set, plus structural problems.

    A report that compared nothing (no output, or only all-zero outputs) is a failure. ``notes``
    say how the comparison was made when it differs from the rule's default (no exact reference,
    an input set dropped).
    """

    outputs: tuple[OutputParity, ...]
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    #: False when the report failed only because nothing could be judged (no output, all zeros or
    #: constant, no finite value, or an allowed error reaching the output's range): not a difference
    decided: bool = True

    def verdict(self, what: str = "the folded model") -> str:
        """One line for an error message: that ``what`` differs, or that nothing could be judged."""
        if self.passed:
            return f"{what} matches the original"
        first = self.failures()[0]
        if not self.decided:
            return f"{what}: parity with the original model could not be judged: {first}"
        return f"{what} differs from the original model: {first}"

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and not self.problems and all(o.passed for o in self.outputs)

    @property
    def worst(self) -> OutputParity | None:
        """The output with the largest ``max_rel_error`` (the first one on ties); None if none."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: _nan_as_inf(o.max_rel_error))

    @property
    def max_rel_error(self) -> float:
        """Largest ``max_rel_error`` over the outputs; ``inf`` when no output was compared."""
        if not self.outputs:
            return math.inf
        return max(_nan_as_inf(o.max_rel_error) for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        """Largest ``max_abs_error`` over the outputs; ``inf`` when no output was compared."""
        if not self.outputs:
            return math.inf
        return max(_nan_as_inf(o.max_abs_error) for o in self.outputs)

    def failures(self) -> list[str]:
        """One line per reason the report failed: structural problems first, then failed outputs."""
        lines = list(self.problems)
        lines.extend(line for o in self.outputs if (line := o.failure()) is not None)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (non-finite floats become the strings 'inf', '-inf', 'nan')."""
        worst = self.worst
        return {
            "passed": self.passed,
            "decided": self.decided,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "worst": worst.name if worst is not None else None,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "failures": self.failures(),
            "error_stats": worst_per_output(self.outputs),  # per output, its closest call
            "outputs": [o.to_dict() for o in self.outputs],
        }


def report_of(
    outputs: list[OutputParity], problems: list[str], notes: tuple[str, ...] = (), *, decided: bool = True
) -> ParityReport:
    """A report over comparisons (of one or several input sets), adding the "nothing compared"
    problems; ``decided=False``: the caller found that nothing could be judged (``problems`` say why)."""
    problems = list(problems)
    if not outputs:
        problems.append("no outputs were compared: the reference returned no tensors")
        decided = False
    elif all(not (o.max_abs_reference > 0) for o in outputs):
        problems.append(
            "nothing was compared: every output of the original is all zeros or has no finite value "
            "on every input set; give inputs that exercise the model (inputs=, value_range=)"
        )
        decided = False
    failed = [o for o in outputs if not o.passed]
    decided = decided and not (failed and not problems and all(not o.decided for o in failed))
    report = ParityReport(outputs=tuple(outputs), problems=tuple(problems), notes=notes, decided=decided)
    logger.debug("compare: %d output(s), passed=%s", len(outputs), report.passed)
    return report


def _nan_as_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
