"""A measured gate for folds that cancel: the float64 judge decides whether they are exact.

A BatchNorm whose running mean lies many standard deviations from zero computes a difference of
two large numbers: ``z = s * (y - m) + beta`` with ``y ~ m``, ``rho = |m| / sqrt(var + eps)``
stds away. Folded into the layer before (``W' = s W``, ``b' = s (b - m) + beta``) or after
(``b' = b + W t``), the same cancellation happens inside the layer, and the new values ``b'``
and ``W'`` are rounded once more, each by about ``u * rho`` in units of the output's std (``u``:
the dtype's unit roundoff). The original's own error is of that order too, so the fold is usually
within the parity rule's factor of it, but not always: the float32 fold of a ``Linear`` into a BN
with ``running_mean ~ 1e3`` and ``running_var ~ 10`` whose output feeds a batch-statistics norm
can be 5-30x the original's own error. No rule on the statistics alone can tell those apart, so
the parity rule itself decides:

* a hand-written affine map ``y = s x + t`` has no statistics: its ``|t / s|`` (its shift in units
  of its input) is at risk above 256;
* a fold is *at risk* when ``rho > R(dtype)`` (``R``: 16 for float32, 8 for float16, 4 for
  bfloat16, 1e4 for float64: on 60 seeds of the ``Linear -> BN(mean ~1e3, var 10) -> batch-
  statistics BN -> Linear`` model, a threshold of 256 still left 2 folds that fail the rule, 16
  none; the check costs one ``verify`` inside ``fold()``, only for plans with a fold at risk, with
  the noise taken as the original's own error alone in float32/float64,
  ``ParityRule(perturbations=0)``, and with the perturbed runs in float16/bfloat16, where the
  parameter rounding a fold applies is itself the dominant noise; either way with the margin
  below);
* in float16 and bfloat16, a fold whose scale is above 1 is at risk of **overflow**: it moves the
  norm's scale before ops the original ran unscaled (a sum over many positions, a mean that
  cancels), whose intermediate values can then leave the dtype's range where the original's stay
  inside it (diff fuzz seed 424242 #2997: a Linear whose output is averaged, then normalized with
  ``1 / sqrt(var + eps) ~ 22``: the folded Linear overflows float16 before the mean); such folds
  are kept with code ``overflow`` when the result fails;
* when a plan has folds at risk, ``fold()`` judges its result (module and program) against the
  original by :func:`normfold.verify` on the example inputs; if it fails (and the check could
  decide), the folds at risk are kept with code ``cancellation`` and the model is folded again
  without them. A fold at risk that passes stays folded. The check runs on the example inputs
  and on the same inputs one sample larger along the batch axis (:func:`judging_sets`), each
  with ``verify``'s own normal and uniform sets;
* the rule it judges by allows half the usual noise factor (``MARGIN``): a fold at risk's error
  in units of the original's own varies from one draw of inputs to the next, so a fold within
  the full factor on the gate's draws can be beyond it on the next (fuzz seed 934055385 chunk 9);
  a fold the gate refuses is beyond that stricter rule on the inputs it was judged on, which the
  fuzzer checks by forcing it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from normfold.dtypes import LOW_PRECISION
from normfold.engine.capture import Capture
from normfold.engine.plan import Plan
from normfold.errors import TraceError

if TYPE_CHECKING:
    from normfold.check.parity import ParityRule
    from normfold.engine.fold_records import FoldResult

__all__ = ["CODE", "OVERFLOW", "at_risk", "judge", "judging_rule", "judging_sets", "overflow_risk"]

CODE = "cancellation"
OVERFLOW = "overflow"
#: dtypes whose range a fold's scale above 1 can push an intermediate value out of
_NARROW = LOW_PRECISION

#: the largest mean-to-std ratio a fold takes without a measured check, per statistics dtype
_RISK = {torch.float64: 1e4, torch.float32: 16.0, torch.float16: 8.0, torch.bfloat16: 4.0}
#: the same for a hand-written affine map, whose ``|t / s|`` is in units of its input, not of a std
_AFFINE_RISK = 256.0
#: the share of the parity rule's noise factor a fold at risk may use (:func:`judging_rule`)
MARGIN = 0.5


def at_risk(capture: Capture, the_plan: Plan) -> dict[str, float]:
    """Norm name -> ``rho`` (module docstring) of every planned BatchNorm fold at risk."""
    risky: dict[str, float] = {}
    tiny = torch.finfo(torch.float64).tiny
    for fold in the_plan.folds:
        unit = fold.unit
        mean_fqn, var_fqn = unit.stats.get("running_mean"), unit.stats.get("running_var")
        if unit.kind == "batch_norm" and mean_fqn and var_fqn:
            mean, var = capture.value(mean_fqn), capture.value(var_fqn)
            std = var.detach().double().clamp_min(tiny).sqrt()
            rho = float((mean.detach().double().abs() / std).max()) if mean.numel() else 0.0
            limit = _RISK.get(mean.dtype, 16.0)
        elif unit.kind == "affine" and not fold.identity and fold.updates:
            # a hand-written map y = s x + t knows no std: |t / s| is its shift in units of its
            # input, so only a shift far beyond any input scale (a mean of 1e3 under a variance of
            # 1e-11) is measured; (x - 128) / 64 on image bytes is not
            rho = max(float((u.shift.abs() / u.scale.abs().clamp_min(tiny)).max()) for u in fold.updates)
            limit = _AFFINE_RISK
        else:
            continue
        if rho > limit and math.isfinite(rho):
            risky[unit.name] = max(rho, risky.get(unit.name, 0.0))
    return risky


def overflow_risk(capture: Capture, the_plan: Plan) -> dict[str, float]:
    """Norm name -> largest ``|scale|`` of every fold into a float16/bfloat16 layer that scales up."""
    risky: dict[str, float] = {}
    for fold in the_plan.folds:
        for u in fold.updates:
            if capture.value(u.weight).dtype not in _NARROW or not u.scale.numel():
                continue
            largest = float(u.scale.abs().max())
            if largest > 1.0 and math.isfinite(largest):
                risky[fold.unit.name] = max(largest, risky.get(fold.unit.name, 0.0))
    return risky


def judge(
    original: nn.Module,
    result: FoldResult,
    inputs: Sequence[torch.Tensor],
    risky: Mapping[str, float],
    overflow: Mapping[str, float] | None = None,
) -> dict[str, tuple[str, str]]:
    """The folds at risk to keep (norm -> ``(code, reason)``): all of them when the folded result
    fails the parity rule against ``original`` on ``inputs`` (and its input sets); none when it
    passes or the check cannot decide."""
    from normfold.check.reference import verify  # the checker only when a plan has folds at risk

    rule = judging_rule(result)
    failure = None
    for i, judged in enumerate(judging_sets(tuple(inputs))):
        if i and not _runs(original, judged):
            continue  # the original does not run at the other batch size: the example inputs decide
        report = verify(original, result, judged, rule=rule)  # a folded artifact that raises: raised
        if not report.passed and report.decided:
            failure = report.failures()[0] + (f", at batch size {judged[0].shape[0]}" if i else "")
            break
    if failure is None:
        return {}
    kept = {
        name: (
            OVERFLOW,
            f"its scale (up to {scale:.3g}) folded into a {dtype_name(result)} layer moved the outputs "
            "beyond the margin a fold at risk must keep, half the parity rule's noise allowance "
            f"({failure}): values the original computes unscaled leave the dtype's range",
        )
        for name, scale in (overflow or {}).items()
    }
    kept |= {
        name: (
            CODE,
            f"its mean is {rho:.3g} standard deviations (or input units) from zero, so the folded layer "
            "cancels two large numbers and its rounded new values moved the outputs beyond the margin a "
            f"fold at risk must keep, half the parity rule's noise allowance ({failure}); the original "
            "computes the difference in its own op",
        )
        for name, rho in risky.items()
    }
    return kept


def judging_rule(result: FoldResult) -> ParityRule:
    """The rule a fold at risk is judged by, for ``result``'s dtype."""
    from normfold.check.parity import ParityRule

    # In float32/float64, judged against the original's own error alone: a fold at risk is exact
    # when it stays within the rule's factor of the rounding the original itself shows
    # (clarification of item 7); the perturbed runs carry a fresh sample of that rounding each,
    # which in a cancelling model can be 10x the original's own and would admit folds 5-8x beyond
    # it. In float16/bfloat16 the parameter rounding a fold applies is itself the dominant noise
    # (a rounded weight moves values across a ReLU kink: fuzz seed 1001), which only the
    # perturbed runs measure, so the full rule judges.
    # Either way with a margin (MARGIN of the rule's noise factor): the ratio of a fold at risk's
    # error to the original's own varies from one draw of inputs to the next, so a fold judged at
    # the edge of the rule on the gate's draws fails on the next draw by chance (fuzz seed
    # 934055385 chunk 9: 0.6-1.1 of the allowance across draws of U(0, 255) inputs, 0 of 60
    # normal draws beyond it, and the gate's two uniform draws within it).
    narrow = dtype_name(result) in ("float16", "bfloat16")
    rule = ParityRule() if narrow else ParityRule(perturbations=0)
    return dataclasses.replace(rule, noise_factor=rule.noise_factor * MARGIN)


def judging_sets(inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs, then the same inputs one sample larger along the batch axis.

    A fold at risk can be within the rule at one batch size and beyond it at another, on every
    draw: fuzz seed 934055385 chunk 6, a float32 ``Conv3d -> BN(mean ~30 std)`` before a
    batch-statistics norm, 0 of 20 normal draws beyond the rule at batch 4 and 8, 20 of 20 at
    batch 5 (4.8x the original's own error). A second batch size, judged like the first, catches
    such folds; a model that runs at one batch size only is judged on its examples alone. Every
    tensor with the batch axis grows by one row: a floating one by the values of one of its rows
    in a seeded shuffled order, the others (ids, masks) by their first row again."""
    sets = [inputs]
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else None
    if batch is None or not any(t.is_floating_point() for t in inputs):
        return sets
    gen = torch.Generator().manual_seed(0)

    def wider(t: torch.Tensor) -> torch.Tensor:
        if not t.dim() or t.shape[0] != batch:
            return t  # no batch axis
        if not t.is_floating_point():
            return torch.cat([t, t[:1]])  # ids, masks: one more row of valid values
        # one more sample of the examples' own distribution (the values of one example row,
        # shuffled): a normal draw would leave the range of inputs scaled to keep a float16
        # model finite, and a given input set is judged even where the original overflows
        row = t[int(torch.randint(batch, (1,), generator=gen))].reshape(-1)
        extra = row[torch.randperm(row.numel(), generator=gen).to(row.device)].reshape(1, *t.shape[1:])
        return torch.cat([t, extra])

    sets.append(tuple(wider(t) for t in inputs))
    return sets


def _runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``model`` runs on ``inputs`` (a model that fixes its batch size does not)."""
    from normfold.check.model_run import run_model

    try:
        run_model(model, inputs, role="original")
    except TraceError:
        return False
    return True


def dtype_name(result: FoldResult) -> str:
    dtype = next((p.dtype for p in result.model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")
