"""Parity: compare a candidate's outputs (the folded model, an ONNX file, a ``.pt2``) with the
original model's, by one rule (:class:`ParityRule`) everywhere.

Outputs are flattened (nested tuples, lists, dicts, namedtuples and dataclasses) into named
leaves such as ``output``, ``output[0]``, ``output['logits']`` or ``output.logits``, and every
tensor leaf is compared in float64 (complex128 for complex outputs).

**The rule.** A fold reorders float rounding, so its outputs are never bit-identical; the
question is whether the difference is rounding or a real change. The original model has rounding
error of its own, which can be far above any fixed tolerance (deep nets, large activations,
cancellations). So each output is judged against an *exact* reference, a float64 run of the
original on the same inputs (:mod:`normfold.reference` makes it), with ``orig`` the original's
output in its own dtype and ``cand`` the candidate's::

    noise   = max(max|orig - exact|,       the model's own rounding error, and
                  max|pert_k - exact|)     its sensitivity to rounding its parameters
    error   = max|cand - exact|            the candidate's error
    allowed = atol + rtol * max|exact|  +  noise_factor * noise
    pass    = error <= allowed

The first term is the fixed per-dtype floor (table below, or ``--rtol``/``--atol``); the second
admits rounding of the same order as the model's own (``noise_factor`` 4: a fold's rounding is of
the model's own order, measured at most 1.4x on 54 real models; a real change such as one BN
channel shifted by a tenth of its std is far outside it).

``pert_k`` are runs of the original *in its own dtype* (float32 for float16/bfloat16) with every
floating parameter and buffer rounded from ``t * (1 + d)``, ``d`` uniform in ``(-u, u)`` (``u``:
the unit roundoff of that tensor's dtype, one seeded draw per run, ``perturbations`` runs (default
4) made up front: no second round; :mod:`normfold.exact`). A fold rounds its new parameters once,
which is exactly such a perturbation, and each run adds a fresh sample of the forward's own
rounding (in float32 and float64 models); the original's
own error alone is one sample, which on a few output elements after a cancellation can be ten
times below its usual size, and near ReLU kinks most perturbations change nothing while a few
change a lot (both seen in the fuzz tests), so a correct fold would fail by chance. Without an
exact reference (a float64 copy did not fit in memory or could not run; :class:`ParityReport`
``notes`` say so), ``exact`` is the original output, ``noise`` is 0 and the floor alone applies.
Maxima run over elements finite in every tensor involved.

An output also fails when shapes or dtypes differ, when the non-finite elements differ (every
``nan`` at the same position, every ``inf`` at the same position with the same sign), or when it
has nothing to compare: zero elements, or no finite value. A report passes only when at least one
output was compared, at least one has a non-zero finite value somewhere (all-zero outputs compare
nothing), every output passed, and there is no structural problem (different output structure or
dict keys, or a non-tensor leaf such as an ``int`` that differs).

``rtol`` is relative to the largest magnitude of the *whole output* rather than to each element:
folding ``y = s * (W x + b) + t`` into ``y = (s W) x + (s b + t)`` reorders the float rounding,
so the error of each element scales with the magnitude of the activations feeding the output,
not with the (possibly near-zero) element itself.

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
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from normfold.errors import UsageError
from normfold.errstats import ErrorStats, error_stats, worst_per_output
from normfold.exact import as_plain as _as_plain
from normfold.exact import exact_like as _exact_like
from normfold.exact import perturbed_noise as _perturbed_noise
from normfold.slices import judge_slices

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOLERANCES",
    "OutputParity",
    "ParityReport",
    "ParityRule",
    "Tolerance",
    "compare",
]


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
    input set (:func:`normfold.reference.parity_sets`), as polygraphy's ``--val-range``.
    ``exact_limit_bytes`` caps the float64 copy of the model the exact reference needs; above it
    the floor alone applies (and the report says so). ``perturbations`` is the number of runs in
    the model's dtype with rounding-sized parameter perturbations that measure its noise, per input
    set (:mod:`normfold.exact`; a fixed count, no second round; 0: its own rounding error alone).
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
    slice_failure: str | None = None  # the worst slice that fails the rule (normfold.slices)
    decided: bool = True  # False: the check could not tell a change from rounding (problem says why)
    stats: ErrorStats | None = None  # vs the float64 run (else the original): normfold.errstats

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


def compare(
    reference_outputs: Any,
    candidate_outputs: Any,
    *,
    exact_outputs: Any = None,
    perturbed_outputs: Sequence[Any] = (),
    rule: ParityRule | None = None,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    inputs: str = "given",
) -> ParityReport:
    """Compare two output trees (tensors in nested tuples/lists/dicts) by the parity rule.

    ``exact_outputs`` is the float64 run of the original on the same inputs (the same tree);
    without it the floor alone applies. ``perturbed_outputs`` are its runs with perturbed
    parameters (module docstring), which widen the model's measured noise.
    ``tolerances``/``rtol``/``atol`` adjust ``rule`` (see :meth:`ParityRule.of`); ``inputs`` names
    the input set in the report. Use
    :func:`normfold.reference.check` to compare over every input set of a run.
    """
    rule = ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol)
    return report_of(
        *compare_outputs(reference_outputs, candidate_outputs, exact_outputs, rule, inputs, perturbed_outputs)
    )


def compare_outputs(
    reference_outputs: Any,
    candidate_outputs: Any,
    exact_outputs: Any,
    rule: ParityRule,
    inputs: str,
    perturbed_outputs: Sequence[Any] = (),
) -> tuple[list[OutputParity], list[str]]:
    """The comparisons and structural problems of one input set (:func:`report_of` judges them)."""
    ctx = _Ctx(rule, inputs, [], [])
    witnesses = () if exact_outputs is None else (exact_outputs, *perturbed_outputs)
    _compare_tree("output", reference_outputs, candidate_outputs, witnesses, ctx)
    return ctx.outputs, ctx.problems


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


@dataclass
class _Ctx:
    rule: ParityRule
    inputs: str
    outputs: list[OutputParity]
    problems: list[str]


# --------------------------------------------------------------------------- output trees


def _children(value: Any) -> tuple[str, list[tuple[Any, str]]] | None:
    """``(kind, [(key, name suffix)])`` for a container output, None for a leaf."""
    if isinstance(value, Mapping):
        return "mapping", [(k, f"[{k!r}]") for k in value]
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # namedtuple
        return "sequence", [(i, f".{f}") for i, f in enumerate(type(value)._fields)]
    if isinstance(value, (tuple, list)):
        return "sequence", [(i, f"[{i}]") for i in range(len(value))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass", [(f.name, f".{f.name}") for f in dataclasses.fields(value)]
    return None


def _get(value: Any, kind: str, key: Any) -> Any:
    return getattr(value, key) if kind == "dataclass" else value[key]


def _kind_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {_short_repr(value)}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare_tree(name: str, ref: Any, cand: Any, exact: tuple[Any, ...], ctx: _Ctx) -> None:
    """``exact``: the float64 reference tree, then the perturbed runs' trees (or empty)."""
    if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor):
        ctx.outputs.append(_compare_tensors(name, ref, cand, exact, ctx))
        return
    if isinstance(ref, torch.Tensor) or isinstance(cand, torch.Tensor):
        ctx.problems.append(f"{name}: reference is {_kind_name(ref)}, candidate is {_kind_name(cand)}")
        return

    ref_children, cand_children = _children(ref), _children(cand)
    if ref_children is None and cand_children is None:
        if not _leaves_equal(ref, cand):
            ctx.problems.append(
                f"{name}: non-tensor values differ: "
                f"reference {_short_repr(ref)}, candidate {_short_repr(cand)}"
            )
        return
    if ref_children is None or cand_children is None or ref_children[0] != cand_children[0]:
        ctx.problems.append(
            f"{name}: output structure differs: reference is {type(ref).__name__}, "
            f"candidate is {type(cand).__name__}"
        )
        return

    kind, ref_keys = ref_children
    cand_key_set = {k for k, _ in cand_children[1]}
    if kind == "sequence":
        if len(ref_keys) != len(cand_children[1]):
            ctx.problems.append(
                f"{name}: reference has {len(ref_keys)} elements, candidate has {len(cand_children[1])}"
            )
    else:
        ref_key_set = {k for k, _ in ref_keys}
        missing = [k for k, _ in ref_keys if k not in cand_key_set]
        extra = [k for k, _ in cand_children[1] if k not in ref_key_set]
        if missing or extra:
            label = "keys" if kind == "mapping" else "fields"
            ctx.problems.append(
                f"{name}: {label} differ: missing from candidate {missing!r}, extra in candidate {extra!r}"
            )
    for key, suffix in ref_keys:
        if key in cand_key_set:
            sub_exact = tuple(_child(w, kind, key) for w in exact)
            _compare_tree(name + suffix, _get(ref, kind, key), _get(cand, kind, key), sub_exact, ctx)


def _child(tree: Any, kind: str, key: Any) -> Any:
    """``tree``'s child at ``key`` when ``tree`` has the same kind of structure, else None."""
    children = _children(tree)
    if children is None or children[0] != kind:
        return None
    try:
        return _get(tree, kind, key)
    except (KeyError, IndexError, AttributeError):
        return None


def _leaves_equal(ref: Any, cand: Any) -> bool:
    if type(ref) is not type(cand):
        return False
    if isinstance(ref, float) and math.isnan(ref) and math.isnan(cand):
        return True
    try:
        return bool(ref == cand)
    except Exception:  # e.g. an object whose == returns an array
        return False


# --------------------------------------------------------------------------- tensor comparison


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compare_tensors(
    name: str, ref: torch.Tensor, cand: torch.Tensor, exact: tuple[Any, ...], ctx: _Ctx
) -> OutputParity:
    tol = ctx.rule.floor(ref.dtype)
    shape = tuple(ref.shape)
    dtype = _dtype_name(ref.dtype)
    if ref.shape != cand.shape:
        problem = f"shape mismatch: reference {shape} vs candidate {tuple(cand.shape)}"
        inf = math.inf
        return OutputParity(name, shape, dtype, inf, inf, inf, tol, False, problem, inputs=ctx.inputs)

    problems: list[str] = []
    if ref.dtype != cand.dtype:
        problems.append(f"dtype mismatch: reference {dtype} vs candidate {_dtype_name(cand.dtype)}")

    wide = torch.complex128 if (ref.is_complex() or cand.is_complex()) else torch.float64
    r = _as_plain(ref).to(dtype=wide)
    c = _as_plain(cand).to(device=r.device, dtype=wide)

    r_finite, c_finite = torch.isfinite(r), torch.isfinite(c)
    both_finite = r_finite & c_finite
    # Non-finite elements must be identical: nan against nan, inf against inf of the same sign.
    same = (torch.isnan(r) & torch.isnan(c)) | (r == c)
    n_differ = int((~both_finite & ~same).sum())
    if n_differ:
        problems.append(f"non-finite values differ ({n_differ} positions)")
    if r.numel() == 0:
        problems.append("empty output (0 elements): nothing to compare")
    elif not bool(r_finite.any()):
        problems.append("the original's output has no finite value: nothing to compare")

    full = torch.where(both_finite, (r - c).abs(), torch.zeros((), dtype=r.real.dtype))
    diff = full[both_finite]
    ref_abs = r.abs()[r_finite]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    # polygraphy-style: where the largest difference is, and the 99th percentile
    at, p99 = (), 0.0
    if diff.numel():
        at = tuple(int(i) for i in torch.unravel_index(full.argmax(), full.shape))
        p99 = float(torch.kthvalue(diff.flatten().cpu(), math.ceil(0.99 * diff.numel())).values)
    max_ref = float(ref_abs.max()) if ref_abs.numel() else 0.0
    max_rel = max_abs / max_ref if max_ref > 0 else max_abs

    noise = exact_error = math.nan
    slice_failure, noise_at = None, None
    decided = not (r.numel() == 0 or not bool(r_finite.any()))
    allowed = tol.allowed(max_ref)
    e = _exact_like(exact[0], r) if exact else None
    if e is not None and (ref.is_floating_point() or ref.is_complex()):
        # the model's own rounding error and the candidate's, both against the float64 run
        where = both_finite & torch.isfinite(e)
        noise_at = _perturbed_noise(exact[1:], e, where, (r - e).abs())
        error_at = (c - e).abs()
        noise = float(noise_at[where].max()) if bool(where.any()) else 0.0
        exact_error = float(error_at[where].max()) if bool(where.any()) else 0.0
        e_finite = torch.isfinite(e)
        e_abs = e.abs()
        max_exact = float(e_abs[e_finite].max()) if bool(e_finite.any()) else 0.0
        allowed = tol.allowed(max_exact) + ctx.rule.noise_factor * noise
        if not problems and max_exact > 0 and ctx.rule.noise_factor * noise >= max_exact:
            decided = False
            problems.append(
                f"cannot decide: the allowed error {allowed:.1e} (the model's own noise {noise:.1e} x "
                f"{ctx.rule.noise_factor:g} + the floor) reaches the output's own scale max|ref| "
                f"{max_exact:.1e}, so even an output of zeros would pass; the original is too "
                "ill-conditioned on these inputs to tell a change from its own rounding: check with real "
                "inputs (inputs=) or in a higher precision"
            )
        worst = judge_slices(error_at, noise_at, e_abs, where, tol.rtol, tol.atol, ctx.rule.noise_factor)
        if not problems and worst is not None and exact_error <= allowed:
            slice_failure = worst.describe()
    exact_used = e is not None and noise_at is not None
    stats = error_stats(c, e if exact_used else r, where if exact_used else both_finite, exact=exact_used,
                        noise=noise_at, rtol=tol.rtol, atol=tol.atol)  # fmt: skip
    measured = max_abs if math.isnan(exact_error) else exact_error
    passed = not problems and slice_failure is None and measured <= allowed
    problem = "; ".join(problems) if problems else None
    logger.debug(
        "%s on %s %s %s: max abs %.3e, vs exact %.3e, noise %.3e, allowed %.3e, passed=%s",
        name, ctx.inputs, shape, dtype, max_abs, exact_error, noise, allowed, passed,
    )  # fmt: skip
    return OutputParity(
        name, shape, dtype, max_abs, max_rel, mean_abs, tol, passed, problem, max_ref,
        inputs=ctx.inputs, noise=noise, exact_error=exact_error, allowed_error=allowed,
        max_abs_error_at=at, p99_abs_error=p99, slice_failure=slice_failure, decided=decided, stats=stats,
    )  # fmt: skip


def _nan_as_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
