"""Parity check: run a reference model and a candidate (e.g. the folded model) on the same inputs.

:func:`verify` runs both models in eval mode under ``torch.no_grad()`` on the same inputs (each
model gets its own clone, so an in-place op in one cannot leak into the other), flattens their
outputs (nested tuples, lists, dicts, namedtuples and dataclasses) into named leaves such as
``output``, ``output[0]``, ``output['logits']`` or ``output[1]['a'][0]`` (namedtuple and dataclass
fields read ``output.logits``), and compares every tensor leaf in float64 (complex128 for complex
outputs). Each model's per-submodule ``training`` flags are restored afterwards; nothing else about
the models is touched.

Pass criterion, per output tensor, with ``ref`` the reference output and ``cand`` the candidate::

    max|ref - cand|  <=  atol + rtol * max|ref|

where both maxima run over the elements that are finite in both tensors. The tolerance is chosen
by the *reference* output's dtype. In addition, an output fails when shapes or dtypes differ, or
when the non-finite elements differ: every ``nan`` must sit at the same position in both, and
every ``inf`` at the same position with the same sign. A report passes only when at least one
output was compared, every output passed, and there is no structural problem (different
output structure or dict keys, or a non-tensor leaf such as an ``int`` that differs).

``rtol`` is relative to the largest magnitude of the *whole output* rather than to each element:
folding ``y = s * (W x + b) + t`` into ``y = (s W) x + (s b + t)`` reorders the float rounding,
so the error of each element scales with the magnitude of the activations feeding the output,
not with the (possibly near-zero) element itself. A per-element relative bound would fail on
harmless cancellations; a bound relative to ``max|ref|`` does not. This matches the
``rtol``/``atol`` = 1e-5 fp32 defaults of tools such as polygraphy, applied to the output scale.

Default tolerances (:data:`DEFAULT_TOLERANCES`, the one place they are defined):

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
must match exactly (tolerance 0/0) unless ``tolerances`` names their dtype; the ``rtol``/``atol``
arguments of :func:`verify` override floating and complex tolerances only. Integer outputs are
compared through float64, so differences beyond 2**53 in magnitude may go unseen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from normfold.errors import TraceError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOLERANCES",
    "OutputParity",
    "ParityReport",
    "Tolerance",
    "compare",
    "random_inputs",
    "run_model",
    "verify",
]


@dataclass(frozen=True)
class Tolerance:
    """Allowed error of one output: ``max|ref - cand| <= atol + rtol * max|ref|``.

    ``rtol`` is relative to the largest magnitude of the reference output (not per element).
    """

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"Tolerance.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"Tolerance.{name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

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


@dataclass(frozen=True)
class OutputParity:
    """Comparison of one output tensor.

    Errors are computed in float64 over the elements that are finite in both tensors.
    ``max_rel_error`` is ``max_abs_error / max_abs_reference`` (``max_abs_error`` itself when the
    reference is all zeros). When the shapes differ nothing can be compared and the errors are
    ``inf``. ``problem`` explains a structural failure (shape, dtype or non-finite mismatch).
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
    #: max |reference| over finite elements (the scale ``rtol`` applies to); nan when unknown.
    max_abs_reference: float = math.nan

    @property
    def allowed_error(self) -> float:
        """``atol + rtol * max|ref|``: the largest ``max_abs_error`` this output may have."""
        if math.isnan(self.max_abs_reference):
            return math.nan
        return self.tolerance.allowed(self.max_abs_reference)

    def failure(self) -> str | None:
        """One-line reason this output failed, naming it and the offending numbers; None if passed."""
        if self.passed:
            return None
        parts: list[str] = []
        if self.problem:
            parts.append(self.problem)
        allowed = self.allowed_error
        if not math.isnan(allowed) and self.max_abs_error > allowed:
            parts.append(
                f"max abs error {self.max_abs_error:.1e} > allowed {allowed:.1e} "
                f"(rtol {self.tolerance.rtol:.0e} x max|ref| {self.max_abs_reference:.1e} "
                f"+ atol {self.tolerance.atol:.0e})"
            )
        if not parts:  # cannot happen for reports built by verify(); keep the line meaningful
            parts.append(f"failed (max abs error {self.max_abs_error:.1e})")
        return f"{self.name}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "mean_abs_error": _json_float(self.mean_abs_error),
            "max_abs_reference": _json_float(self.max_abs_reference),
            "allowed_error": _json_float(self.allowed_error),
            "tolerance": {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol},
            "passed": self.passed,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class ParityReport:
    """Result of :func:`verify`: one :class:`OutputParity` per compared tensor plus structural problems.

    A report that compared no output at all is a failure.
    """

    outputs: tuple[OutputParity, ...]
    problems: tuple[str, ...] = ()

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
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "worst": worst.name if worst is not None else None,
            "problems": list(self.problems),
            "failures": self.failures(),
            "outputs": [o.to_dict() for o in self.outputs],
        }


Inputs = torch.Tensor | Sequence[torch.Tensor]


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Inputs | None = None,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_dtype: torch.dtype | None = None,
    seed: int = 0,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    ``inputs`` is one tensor (one positional argument) or a sequence of tensors (one argument
    each). Without ``inputs``, ``input_shapes`` (one shape per argument) builds seeded standard
    normal inputs: drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (so the same
    seed gives the same inputs on every device), in ``input_dtype``, then moved to the device of
    the reference's first parameter or buffer (CPU if it has none). ``input_dtype`` defaults to
    the dtype of the reference's first floating parameter, else float32; passed explicitly, it
    also casts user-given floating inputs (integer and bool inputs are never touched).

    ``tolerances`` is merged over :data:`DEFAULT_TOLERANCES` (its entries win); ``rtol`` and
    ``atol`` then override every floating and complex tolerance. Both models run in eval mode
    under ``torch.no_grad()``; each submodule's ``training`` flag is restored afterwards.

    Raises :class:`UsageError` for inconsistent arguments and :class:`TraceError` when either
    model raises during its forward. A parity failure is not an exception: check
    :attr:`ParityReport.passed`.
    """
    for role, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"verify() expects the {role} to be a torch.nn.Module, got {type(model).__name__}"
            )
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise UsageError(f"input_dtype must be a torch.dtype, got {input_dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an int, got {seed!r}")
    table = _resolve_tolerances(tolerances, rtol, atol)
    args = _build_inputs(reference, inputs, input_shapes, input_dtype, seed)
    logger.debug("verify: %d input(s) %s", len(args), _describe_inputs(args))
    ref_out = run_model(reference, args, role="reference")
    cand_out = run_model(candidate, args, role="candidate")
    return _compare(ref_out, cand_out, table)


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor], *, role: str = "model") -> Any:
    """Run ``model`` once in eval mode under ``torch.no_grad()``, restoring its training flags.

    Each input is cloned, so an in-place op inside the model cannot change the caller's tensors.
    Raises :class:`TraceError` (naming ``role`` and the input shapes) when the forward raises.
    """
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(*(t.clone() for t in inputs))
    except Exception as e:
        raise TraceError(
            f"the {role} model ({type(model).__name__}) raised {type(e).__name__} during forward "
            f"on inputs of shape {_describe_inputs(tuple(inputs))}: {e}"
        ) from e
    finally:
        for module, training in flags.items():
            module.training = training


def compare(
    reference_outputs: Any,
    candidate_outputs: Any,
    *,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ParityReport:
    """Compare two output trees (tensors in nested tuples/lists/dicts) as :func:`verify` does.

    Use it to check outputs that came from elsewhere (onnxruntime, a loaded program) against a
    reference computed once with :func:`run_model`.
    """
    return _compare(reference_outputs, candidate_outputs, _resolve_tolerances(tolerances, rtol, atol))


def _compare(ref_out: Any, cand_out: Any, table: _Table) -> ParityReport:
    outputs: list[OutputParity] = []
    problems: list[str] = []
    _compare_tree("output", ref_out, cand_out, table, outputs, problems)
    if not outputs:
        problems.append("no outputs were compared: the reference returned no tensors")
    report = ParityReport(outputs=tuple(outputs), problems=tuple(problems))
    logger.debug("compare: %d output(s), passed=%s", len(outputs), report.passed)
    return report


# --------------------------------------------------------------------------- arguments


class _Table:
    """Tolerance lookup by reference output dtype (see the module docstring for the rules)."""

    def __init__(self, entries: dict[torch.dtype, Tolerance], rtol: float | None, atol: float | None) -> None:
        self._entries = entries
        self._rtol = rtol
        self._atol = atol

    def _override(self, tol: Tolerance) -> Tolerance:
        if self._rtol is None and self._atol is None:
            return tol
        return Tolerance(
            rtol=tol.rtol if self._rtol is None else self._rtol,
            atol=tol.atol if self._atol is None else self._atol,
        )

    def __call__(self, dtype: torch.dtype) -> Tolerance:
        if dtype in self._entries:
            tol = self._entries[dtype]
            return self._override(tol) if (dtype.is_floating_point or dtype.is_complex) else tol
        if dtype.is_complex:
            real = _COMPLEX_AS_REAL.get(dtype, torch.float32)
            return self._override(self._entries.get(real, self._entries[torch.float32]))
        if dtype.is_floating_point:
            return self._override(self._entries[torch.float32])
        return _EXACT


def _resolve_tolerances(
    tolerances: Mapping[torch.dtype, Tolerance] | None, rtol: float | None, atol: float | None
) -> _Table:
    entries = dict(DEFAULT_TOLERANCES)
    if tolerances is not None:
        if not isinstance(tolerances, Mapping):
            raise UsageError(
                f"tolerances must be a mapping of torch.dtype to Tolerance, got {type(tolerances).__name__}"
            )
        for dtype, tol in tolerances.items():
            if not isinstance(dtype, torch.dtype):
                raise UsageError(f"tolerances keys must be torch.dtype, got {dtype!r}")
            if not isinstance(tol, Tolerance):
                raise UsageError(f"tolerances[{dtype}] must be a normfold.Tolerance, got {tol!r}")
            entries[dtype] = tol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{name} must be finite and >= 0, got {value!r}")
    return _Table(
        entries,
        None if rtol is None else float(rtol),
        None if atol is None else float(atol),
    )


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def _default_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _build_inputs(
    reference: nn.Module,
    inputs: Inputs | None,
    input_shapes: Sequence[Sequence[int]] | None,
    input_dtype: torch.dtype | None,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    if inputs is not None and input_shapes is not None:
        raise UsageError("pass either inputs or input_shapes to verify(), not both")
    if inputs is None and input_shapes is None:
        raise UsageError(
            "verify() needs inputs to run the models on: pass `inputs` (a tensor or a sequence of "
            "tensors, one per forward argument) or `input_shapes` (e.g. input_shapes=[(1, 3, 224, 224)]) "
            "to generate seeded random inputs"
        )
    if inputs is not None:
        args = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise UsageError(f"inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
        out: list[torch.Tensor] = []
        for i, t in enumerate(args):
            if not isinstance(t, torch.Tensor):
                raise UsageError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if input_dtype is not None and (t.is_floating_point() or t.is_complex()):
                t = t.to(input_dtype)
            out.append(t)
        return tuple(out)

    first = _first_tensor(reference)
    return random_inputs(
        input_shapes,
        dtype=input_dtype if input_dtype is not None else _default_dtype(reference),
        seed=seed,
        device=first.device if first is not None else None,
    )


def random_inputs(
    input_shapes: Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs, one per shape, drawn on the CPU in float64 so the same seed
    gives the same values on every device, then cast to ``dtype`` and moved to ``device``."""
    shapes = _check_shapes(input_shapes)
    if not (dtype.is_floating_point or dtype.is_complex):
        raise UsageError(
            f"random inputs need a floating input dtype, got {dtype}; pass integer inputs explicitly"
        )
    draw_dtype = torch.complex128 if dtype.is_complex else torch.float64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=draw_dtype).to(device=device or "cpu", dtype=dtype)
        for shape in shapes
    )


def _check_shapes(input_shapes: Any) -> list[tuple[int, ...]]:
    if isinstance(input_shapes, (str, bytes)) or not isinstance(input_shapes, Sequence):
        raise UsageError(f"input_shapes must be a sequence of shapes, got {type(input_shapes).__name__}")
    if input_shapes and all(isinstance(d, int) for d in input_shapes):
        raise UsageError(
            f"input_shapes is a sequence of shapes, one per input: wrap a single shape, e.g. "
            f"input_shapes=[{tuple(input_shapes)}]"
        )
    shapes: list[tuple[int, ...]] = []
    for i, shape in enumerate(input_shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise UsageError(f"input_shapes[{i}] must be a sequence of ints, got {shape!r}")
        dims = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise UsageError(f"input_shapes[{i}] must contain non-negative ints, got {dims!r}")
        shapes.append(dims)
    return shapes


def _describe_inputs(args: tuple[torch.Tensor, ...]) -> str:
    return "[" + ", ".join(f"{tuple(t.shape)} {_dtype_name(t.dtype)}" for t in args) + "]"


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


def _compare_tree(
    name: str,
    ref: Any,
    cand: Any,
    table: _Table,
    outputs: list[OutputParity],
    problems: list[str],
) -> None:
    if isinstance(ref, torch.Tensor) and isinstance(cand, torch.Tensor):
        outputs.append(_compare_tensors(name, ref, cand, table))
        return
    if isinstance(ref, torch.Tensor) or isinstance(cand, torch.Tensor):
        problems.append(f"{name}: reference is {_kind_name(ref)}, candidate is {_kind_name(cand)}")
        return

    ref_children, cand_children = _children(ref), _children(cand)
    if ref_children is None and cand_children is None:
        if not _leaves_equal(ref, cand):
            problems.append(
                f"{name}: non-tensor values differ: "
                f"reference {_short_repr(ref)}, candidate {_short_repr(cand)}"
            )
        return
    if ref_children is None or cand_children is None or ref_children[0] != cand_children[0]:
        problems.append(
            f"{name}: output structure differs: reference is {type(ref).__name__}, "
            f"candidate is {type(cand).__name__}"
        )
        return

    kind, ref_keys = ref_children
    cand_key_set = {k for k, _ in cand_children[1]}
    if kind == "sequence":
        if len(ref_keys) != len(cand_children[1]):
            problems.append(
                f"{name}: reference has {len(ref_keys)} elements, candidate has {len(cand_children[1])}"
            )
    else:
        ref_key_set = {k for k, _ in ref_keys}
        missing = [k for k, _ in ref_keys if k not in cand_key_set]
        extra = [k for k, _ in cand_children[1] if k not in ref_key_set]
        if missing or extra:
            label = "keys" if kind == "mapping" else "fields"
            problems.append(
                f"{name}: {label} differ: missing from candidate {missing!r}, extra in candidate {extra!r}"
            )
    for key, suffix in ref_keys:
        if key in cand_key_set:
            _compare_tree(
                name + suffix, _get(ref, kind, key), _get(cand, kind, key), table, outputs, problems
            )


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


def _as_plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t


def _compare_tensors(name: str, ref: torch.Tensor, cand: torch.Tensor, table: _Table) -> OutputParity:
    tol = table(ref.dtype)
    shape = tuple(ref.shape)
    dtype = _dtype_name(ref.dtype)
    if ref.shape != cand.shape:
        problem = f"shape mismatch: reference {shape} vs candidate {tuple(cand.shape)}"
        logger.debug("%s: %s", name, problem)
        return OutputParity(name, shape, dtype, math.inf, math.inf, math.inf, tol, False, problem)

    problems: list[str] = []
    if ref.dtype != cand.dtype:
        problems.append(f"dtype mismatch: reference {dtype} vs candidate {_dtype_name(cand.dtype)}")

    wide = torch.complex128 if (ref.is_complex() or cand.is_complex()) else torch.float64
    r = _as_plain(ref).to(dtype=wide)
    c = _as_plain(cand).to(device=r.device, dtype=wide)

    r_finite, c_finite = torch.isfinite(r), torch.isfinite(c)
    both_finite = r_finite & c_finite
    # Non-finite elements must be identical: nan against nan, inf against inf of the same sign.
    nonfinite = ~both_finite
    same = (torch.isnan(r) & torch.isnan(c)) | (r == c)
    n_differ = int((nonfinite & ~same).sum())
    if n_differ:
        problems.append(f"non-finite values differ ({n_differ} positions)")

    diff = (r - c).abs()[both_finite]
    ref_abs = r.abs()[r_finite]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    max_ref = float(ref_abs.max()) if ref_abs.numel() else 0.0
    max_rel = max_abs / max_ref if max_ref > 0 else max_abs

    passed = not problems and max_abs <= tol.allowed(max_ref)
    problem = "; ".join(problems) if problems else None
    logger.debug(
        "%s %s %s: max abs %.3e, max rel %.3e, allowed %.3e, passed=%s",
        name, shape, dtype, max_abs, max_rel, tol.allowed(max_ref), passed,
    )  # fmt: skip
    return OutputParity(name, shape, dtype, max_abs, max_rel, mean_abs, tol, passed, problem, max_ref)


def _nan_as_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
