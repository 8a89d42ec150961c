"""Parity: compare a candidate's outputs (the folded model, an ONNX file, a ``.pt2``) with the
original model's, by one rule (:class:`ParityRule`) everywhere.

Outputs are flattened (nested tuples, lists, dicts, namedtuples and dataclasses) into named
leaves such as ``output``, ``output[0]``, ``output['logits']`` or ``output.logits``, and every
tensor leaf is compared in float64 (complex128 for complex outputs).

**The rule.** A fold reorders float rounding, so its outputs are never bit-identical; the
question is whether the difference is rounding or a real change. The original model has rounding
error of its own, which can be far above any fixed tolerance (deep nets, large activations,
cancellations). So each output is judged against an *exact* reference, a float64 run of the
original on the same inputs (:mod:`normfold.check.reference` makes it), with ``orig`` the original's
output in its own dtype and ``cand`` the candidate's::

    noise   = max(max|orig - exact|,       the model's own rounding error, and
                  max|pert_k - exact|)     its sensitivity to rounding its parameters
    error   = max|cand - exact|            the candidate's error
    allowed = atol + rtol * max|exact|  +  noise_factor * noise
    pass    = error <= allowed

The first term is the fixed per-dtype floor (:mod:`normfold.check.parity_rule`, or the rule's
``rtol``/``atol``); the second admits rounding of the same order as the model's own
(``noise_factor`` 4: a fold's rounding is of the model's own order, measured at most 1.4x on 54
real models; a real change such as one BN channel shifted by a tenth of its std is far outside it).

``pert_k`` are runs of the original *in its own dtype* (float32 for float16/bfloat16) with every
floating parameter and buffer rounded from ``t * (1 + d)``, ``d`` uniform in ``(-u, u)`` (``u``: the
unit roundoff of that tensor's dtype, one seeded draw per run, ``perturbations`` runs (default 4), a
fixed count made once, where a candidate needs them; :mod:`normfold.check.exact`). A fold rounds its
new parameters once, which is exactly such a perturbation, and each run adds a fresh sample of the
forward's own rounding (in float32 and float64 models); the original's
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

The fixed floor per dtype is :data:`~normfold.check.parity_rule.DEFAULT_TOLERANCES` (its table and
reasons: :mod:`normfold.check.parity_rule`); the records of a comparison are in
:mod:`normfold.check.parity_report`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from normfold.check.errstats import error_stats
from normfold.check.exact import as_plain as _as_plain
from normfold.check.exact import exact_like as _exact_like
from normfold.check.exact import perturbed_noise as _perturbed_noise
from normfold.check.parity_report import OutputParity, ParityReport, report_of
from normfold.check.parity_rule import DEFAULT_TOLERANCES, ParityRule, Tolerance
from normfold.check.slices import judge_slices

logger = logging.getLogger(__name__)

__all__ = [  # the rule and the records keep their import path here
    "DEFAULT_TOLERANCES",
    "OutputParity",
    "ParityReport",
    "ParityRule",
    "Tolerance",
    "compare",
    "compare_outputs",
    "report_of",
]


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
    :func:`normfold.check.reference.check` to compare over every input set of a run.
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
