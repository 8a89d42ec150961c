"""Capture and plan, nothing applied: what ``inspect`` reports and what :func:`normfold.fold` applies.

:func:`analyse` puts the model in eval mode, captures it once (:func:`normfold.engine.capture.capture`),
plans its folds (:func:`normfold.engine.plan.plan`) and decides which of them the eager module can take
(:func:`normfold.engine.apply.eager_plan`); with ``reparameterize`` it also plans the branch merges
(:mod:`normfold.engine.reparam`, :mod:`normfold.engine.reparam_eager`). It returns the decisions as records
(:mod:`normfold.engine.fold_records`): every norm op folded or kept with a code, every norm module the
plan has no op for (per-sample norms, modules never called), every block merged or kept.

Weights are counted as the captured program holds them (:func:`weight_elements`): parameters,
buffers and lifted constants, a tensor stored under two names once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.nn.modules.batchnorm import _NormBase

from normfold.engine.apply import EagerPlan, eager_plan
from normfold.engine.branches import Branch, Merge
from normfold.engine.capture import Capture, CaptureOptions, capture, op_counts, owner
from normfold.engine.costs import program_macs
from normfold.engine.fold_records import Folded, FoldResult, Merged, NotMerged, Skipped
from normfold.engine.plan import Fold, Plan, plan
from normfold.engine.reparam import plan_merges
from normfold.engine.reparam_eager import EagerMerge, eager_merges
from normfold.engine.replan import Drift
from normfold.errors import UsageError
from normfold.prepare import ExampleInputs, as_inputs, check_materialized

__all__ = ["Analysis", "analyse", "folded_record", "plan_merges_into", "weight_elements"]

_SAMPLE_NORMS = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass
class Analysis:
    """Capture + plan + the eager decision: everything ``inspect`` reports, nothing applied."""

    capture: Capture
    plan: Plan
    eager: EagerPlan
    result: FoldResult
    merges: list[Merge] = field(default_factory=list)
    eager_merges: list[EagerMerge] = field(default_factory=list)


def analyse(
    model: nn.Module,
    example_inputs: ExampleInputs,
    options: CaptureOptions | None = None,
    *,
    reparameterize: bool = False,
    keep: Mapping[str, tuple[str, str]] | None = None,
) -> Analysis:
    """Capture ``model`` (put in eval mode) and plan its folds (and with ``reparameterize``, its
    branch merges: :mod:`normfold.engine.reparam`); nothing is changed. ``keep``: norms decided to stay
    (:func:`normfold.engine.plan.plan`)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"fold() expects a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    check_materialized(model)
    was_training = model.training
    model.eval()
    cap = capture(model, inputs, options or CaptureOptions())
    the_plan = plan(cap, keep)
    eager = eager_plan(the_plan, cap, model)
    result = FoldResult(model, params_before=weight_elements(cap.program), ops_before=op_counts(cap.graph))
    result.macs_before = program_macs(cap.program)
    result.folded = [folded_record(f, eager) for f in the_plan.folds if not f.identity]
    result.skipped = [Skipped(k.unit.name, k.unit.module_type or "forward", k.code, k.reason, k.unit.nodes[0])
                      for k in the_plan.kept]  # fmt: skip
    result.skipped += _other_norms(model, cap, the_plan)
    analysis = Analysis(cap, the_plan, eager, result)
    if reparameterize:
        plan_merges_into(analysis, model)
    if was_training:
        result.notes.append(
            "the model was in training mode: it was folded as in eval mode (BatchNorm with its running "
            "statistics); the returned model is in eval mode"
        )
    return analysis


def plan_merges_into(analysis: Analysis, model: nn.Module, drift: Drift | None = None) -> None:
    """Plan the branch merges; a kept norm a merge takes away is reported folded into its conv.
    ``drift``: a later round's (:mod:`normfold.engine.replan`), where the module and the program differ."""
    cap, result = analysis.capture, analysis.result
    merges, unmerged = plan_merges(cap, analysis.plan)
    # every export-only fold is visible to the eager decision: blocks as the module computes them
    # (an op that changes nothing, ``x + 0``, is no fold there either: seen through in both)
    mine = {id(f) for f in analysis.eager.folds}
    export_only = [f for f in analysis.plan.folds if id(f) not in mine and not f.identity]
    eager_folds = [f for f in analysis.plan.folds if id(f) in mine or f.identity]
    eager_view = plan_merges(cap, analysis.plan, eager_folds) if export_only else None
    eager = eager_merges(cap, merges, model, analysis.eager.owned, eager_view=eager_view,
                         export_only=export_only, drift=drift)  # fmt: skip
    analysis.merges, analysis.eager_merges = merges, eager
    taken: dict[str, Folded] = {}
    by_name = {n.name: n for n in cap.graph.nodes}
    for m, e in zip(merges, eager, strict=True):
        into = owner(by_name[m.target.layer])[1]
        where = "both" if e.note is None else "export"
        for unit in [*(b.unit for b in m.branches if b.unit is not None), *m.scales]:
            pattern = "reparam-bn" if unit.kind == "batch_norm" else "reparam-affine"
            taken[unit.nodes[0]] = Folded(unit.name, unit.module_type or "forward", into, "Conv", pattern,
                                          where, unit.nodes[0], note=e.note)  # fmt: skip
        branches = tuple(_branch_label(cap, by_name, b) for b in m.branches)
        result.merged.append(Merged(m.module or "forward", into, branches, where, m.adds[0], e.note))
    merged = {m.adds[0] for m in merges}  # a later round can merge a block an earlier one kept
    listed = {n.node for n in result.not_merged if n.node not in merged}
    result.not_merged = [n for n in result.not_merged if n.node not in merged]
    result.not_merged += [NotMerged(u.module or "forward", u.code, u.reason, u.adds[0])
                          for u in unmerged if u.adds[0] not in listed]  # fmt: skip
    result.folded += list(taken.values())
    result.skipped = [s for s in result.skipped if s.node not in taken]


def _branch_label(cap: Capture, by_name: dict[str, Any], branch: Branch) -> str:
    if not branch.nodes:
        return "identity"
    path = cap.canonical(owner(by_name[branch.nodes[0]])[1])
    return f"{path or 'forward'} ({branch.label()})"


def folded_record(fold: Fold, eager: EagerPlan) -> Folded:
    unit = fold.unit
    modules = [u.weight.rpartition(".")[0] or u.weight for u in fold.updates]  # the weights' module
    types = [u.module_type or u.kind for u in fold.updates]
    note = eager.export_only.get(unit.nodes[0])
    return Folded(
        norm=unit.name,
        norm_type=unit.module_type or "forward",
        into=", ".join(dict.fromkeys(modules)),
        into_type=", ".join(dict.fromkeys(types)),
        pattern=fold.pattern,
        where="export" if note is not None else "both",
        node=unit.nodes[0],
        through=fold.through,
        note=None if note is None else f"folded in the export only: {note}",
    )


def _other_norms(model: nn.Module, cap: Capture, the_plan: Plan) -> list[Skipped]:
    """Norm modules the plan has no op for: per-sample norms, and norms never called."""
    seen_stats = {(u.stats.get("running_mean") or "").rpartition(".")[0]
                  for u in [f.unit for f in the_plan.folds] + [k.unit for k in the_plan.kept]}  # fmt: skip
    called = {cap.canonical(owner(n)[1]) for n in cap.graph.nodes if n.op == "call_function"}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (_NormBase, *_SAMPLE_NORMS)) or name in seen_stats:
            continue
        cls = type(module).__name__
        if isinstance(module, _SAMPLE_NORMS) and name in called:
            out.append(
                Skipped(name, cls, "per_sample_statistics", f"{cls} normalizes with per-sample statistics")
            )
        elif name not in called:
            out.append(Skipped(name, cls, "unused", "never called in forward (not in the captured graph)"))
    return out


def weight_elements(program: ExportedProgram) -> int:
    """Elements of the floating weights ``program`` computes with (parameters, buffers and lifted
    constants; a tensor stored under two names once): what an export of it holds, whatever the
    eager module still carries (a norm kept as the identity, a buffer nothing reads)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*program.state_dict.values(), *program.constants.values()]:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total
