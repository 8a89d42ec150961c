"""``fold``: capture the model once, plan every fold, apply the plan to the module and the export.

1. **Capture** (:mod:`normfold.graph`): ``torch.export`` (non-strict) on the model in eval mode;
   every batch-norm op that runs is in the graph, whether a module, a subclass or functional code
   wrote it.
2. **Plan** (:mod:`normfold.plan`, pure data): backward folds into the layer before a norm
   (through commuting ops, concats and adds), forward folds into the layers after it, and a
   stable code and reason for every norm op that stays.
3. **Apply** (:mod:`normfold.apply`): new parameter values by name (float64 math, cast back once)
   to the user's own module, where the norm can be removed from it, and to the exported program,
   which is what ``.onnx``/``.pt2`` outputs are written from.
4. **Post-condition**: planning the folded program again finds nothing to fold
   (:attr:`FoldResult.replan_folds` is 0).

A model ``torch.export`` cannot capture as a whole is folded in parts (:mod:`normfold.parts`):
the largest submodules that capture, with every module that did not listed in
:attr:`FoldResult.uncaptured`.

:func:`analyse` stops after step 2 (``inspect``): it changes nothing.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.nn.modules.batchnorm import _NormBase

from normfold.apply import EagerPlan, eager_plan
from normfold.costs import program_macs
from normfold.errors import TraceError, UsageError
from normfold.gate import CODE as CANCELLATION
from normfold.gate import at_risk, judge, overflow_risk
from normfold.graph import Capture, CaptureOptions, capture, op_counts, owner
from normfold.parts import Uncaptured, fold_parts
from normfold.plan import Fold, Plan, plan
from normfold.postcheck import check_artifacts_agree, check_replan
from normfold.reparam import Branch, Merge, plan_merges
from normfold.reparam_eager import EagerMerge, eager_merges
from normfold.replan import MAX_ROUNDS, Drift, apply_round

logger = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

_SAMPLE_NORMS = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class Folded:
    """A norm op that was folded away."""

    norm: str  # module path, or "<module or forward>:<op>" for a norm written in forward code
    norm_type: str
    into: str  # the layer module(s) that absorbed it, comma-separated
    into_type: str
    pattern: (
        str  # conv-bn, linear-bn, conv_transpose-bn, bn-conv, bn-linear, concat-bn, add-bn, conv-affine...
    )
    where: str  # "both" (eager module and export) or "export" (export only, with ``note``)
    node: str  # the op's name in the exported graph
    through: tuple[str, ...] = ()  # ops between the layer and the norm
    note: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A norm op (or unused norm module) left in place, with a stable code and a readable reason."""

    norm: str
    norm_type: str
    code: str
    reason: str
    node: str | None = None


@dataclass(frozen=True)
class Merged:
    """A block whose parallel branches became one conv (structural reparameterization)."""

    block: str  # module path owning the sum ("forward": the model's own forward)
    into: str  # module path of the conv that took the sum
    branches: tuple[str, ...]  # "<module path> (conv 3x3)", "<module path> (norm)", "identity"...
    where: str  # "both" (module and export) or "export" (export only, with ``note``)
    node: str  # the sum's add op
    note: str | None = None


@dataclass(frozen=True)
class NotMerged:
    """A sum of branches of one tensor that stays, with a stable code and a readable reason."""

    block: str
    code: str
    reason: str
    node: str


@dataclass
class FoldResult:
    """What :func:`fold` produced: the model, the folded exported program, one record per norm."""

    model: nn.Module
    program: ExportedProgram | None = None
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: elements of the floating weights the captured program computes with (parameters, buffers,
    #: constants: :func:`weight_elements`), before and after; the written file holds the same
    #: plus the exporter's own constants (shapes)
    params_before: int = 0
    params_after: int | None = None  # None until the plan is applied
    #: multiply-accumulates of one run at the example sizes (:func:`normfold.costs.program_macs`)
    macs_before: int | None = None
    macs_after: int | None = None
    replan_folds: int = 0  # folds found when planning the folded program again (0 expected)
    #: modules torch.export could not capture (the model itself first); empty when it could.
    #: Then ``program`` is None and only the captured parts were folded (see normfold.parts).
    uncaptured: list[Uncaptured] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. switched to eval)
    #: ops of the captured graph before and after folding, by the ONNX op they become
    #: (:func:`normfold.graph.op_counts`); empty when the model was not captured whole
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    #: blocks reparameterized into one conv, and sums of branches that stay (``reparameterize=True``)
    merged: list[Merged] = field(default_factory=list)
    not_merged: list[NotMerged] = field(default_factory=list)

    @property
    def export_only(self) -> list[Folded]:
        return [f for f in self.folded if f.where == "export"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "replan_folds": self.replan_folds,
            "uncaptured": [asdict(u) for u in self.uncaptured],
            "notes": list(self.notes),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "merged": [asdict(m) for m in self.merged],
            "not_merged": [asdict(m) for m in self.not_merged],
        }


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
    branch merges: :mod:`normfold.reparam`); nothing is changed. ``keep``: norms decided to stay
    (:func:`normfold.plan.plan`)."""
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
    result.folded = [_folded(f, eager) for f in the_plan.folds if not f.identity]
    result.skipped = [Skipped(k.unit.name, k.unit.module_type or "forward", k.code, k.reason, k.unit.nodes[0])
                      for k in the_plan.kept]  # fmt: skip
    result.skipped += _other_norms(model, cap, the_plan)
    analysis = Analysis(cap, the_plan, eager, result)
    if reparameterize:
        _plan_merges(analysis, model)
    if was_training:
        result.notes.append(
            "the model was in training mode: it was folded as in eval mode (BatchNorm with its running "
            "statistics); the returned model is in eval mode"
        )
    return analysis


def _plan_merges(analysis: Analysis, model: nn.Module, drift: Drift | None = None) -> None:
    """Plan the branch merges; a kept norm a merge takes away is reported folded into its conv.
    ``drift``: a later round's (:mod:`normfold.replan`), where the module and the program differ."""
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


def capture_options(
    inputs: Sequence[torch.Tensor],
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[int, Mapping[int, str]] | None = None,
) -> CaptureOptions:
    """:class:`CaptureOptions` from the API's arguments, checked against the inputs."""
    axes = []
    for index, spec in (dynamic_axes or {}).items():
        for axis, name in spec.items():
            valid = isinstance(index, int) and isinstance(axis, int) and 0 <= index < len(inputs)
            if not (valid and 0 <= axis < inputs[index].dim()):
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise UsageError(
                    f"dynamic axis {name!r}: input {index!r} has no axis {axis!r} (inputs: {shapes})"
                )
            if not (isinstance(name, str) and name.isidentifier()):
                raise UsageError(f"dynamic_axes: the name of input {index} axis {axis} must be an identifier")
            if name in [n for _, _, n in axes] or (name == "batch" and dynamic_batch):
                raise UsageError(f"dynamic axis name {name!r} is used twice (the batch axis is 'batch')")
            axes.append((index, axis, name))
    return CaptureOptions(dynamic_batch=dynamic_batch, axes=tuple(axes))


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights have no values yet: meta tensors or lazy modules. (Not a
    module at all is for :func:`working_copy` to refuse, naming the caller.)"""
    if not isinstance(model, nn.Module):
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise UsageError(
                f"{name} is not initialized yet (a lazy module): run the model once on a real input "
                "before folding it"
            )
        if t.is_meta:
            raise UsageError(
                f"{name} is on the meta device (it has no values to fold): load the weights first, "
                "e.g. model.to_empty(device='cpu') and load_state_dict"
            )


def fold(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    inplace: bool = False,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[int, Mapping[int, str]] | None = None,
    reparameterize: bool = True,
) -> FoldResult:
    """Fold every eval-mode BatchNorm (and hand-written per-channel affine map) that can be folded.

    ``example_inputs`` (a tensor or a tuple of tensors) are what ``torch.export`` runs the model
    on once. The input model is left untouched unless ``inplace=True``; the returned model is in
    eval mode and keeps the user's class and module names (folded norm modules become
    ``nn.Identity``). ``FoldResult.program`` is the folded exported program (dynamic batch axis
    when ``dynamic_batch`` and the batch is at least 2, and the ``dynamic_axes``, given as
    ``{input index: {axis: name}}``), which ONNX/``.pt2`` export writes.

    ``reparameterize``: also merge parallel conv / norm / identity / avg-pool branches of one
    tensor, summed (RepVGG, MobileOne, ACNet blocks), into one conv (:mod:`normfold.reparam`);
    :attr:`FoldResult.merged` lists them and :attr:`FoldResult.not_merged` the sums that stay. On
    by default, as in :func:`normfold.fold_and_export` and ``normfold fold``; ``False`` leaves the
    branches as they are (e.g. to keep training the multi-branch model).
    """
    inputs = as_inputs(example_inputs)
    options = capture_options(inputs, dynamic_batch, dynamic_axes)
    return _fold(model, inputs, options, inplace=inplace, reparameterize=reparameterize, keep={})


def _fold(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    options: CaptureOptions,
    *,
    inplace: bool,
    reparameterize: bool,
    keep: Mapping[str, tuple[str, str]],
    judged: bool = False,
) -> FoldResult:
    """:func:`fold` keeping ``keep``; folds at risk of cancellation are judged by the float64 rule
    (:mod:`normfold.gate`) unless ``judged``, and kept when they fail it; the post-conditions of
    :mod:`normfold.postcheck` hold for what is returned."""
    target = working_copy(model, "fold", inplace=inplace)
    try:
        analysis = analyse(target, inputs, options, reparameterize=reparameterize, keep=keep)
    except TraceError as e:
        return fold_parts(target.eval(), inputs, e, options)
    risky = {} if judged else at_risk(analysis.capture, analysis.plan)
    overflow = {} if judged else overflow_risk(analysis.capture, analysis.plan)
    again = functools.partial(_fold, model, inputs, options, reparameterize=reparameterize, judged=True)
    if risky and inplace:  # judged on a copy first: the caller's model is folded once, as decided
        trial = _fold(model, inputs, options, inplace=False, reparameterize=reparameterize, keep=keep)
        kept = {s.norm: (s.code, s.reason) for s in trial.skipped if s.code == CANCELLATION}
        return again(inplace=True, keep={**keep, **kept})
    result = analysis.result
    drift = Drift()  # where the module and the program come to differ (export-only decisions)
    drift.record(analysis.capture, analysis.plan, analysis.eager, analysis.merges, analysis.eager_merges)
    result.program = apply_round(target, analysis.capture, analysis.plan, analysis.eager, analysis.merges,
                                 analysis.eager_merges, in_place=True)  # fmt: skip
    left = _settle(result, target, drift, reparameterize, merged=bool(analysis.merges), keep=keep)
    if (risky or overflow) and (kept := judge(model, result, inputs, risky, overflow)):
        return again(inplace=False, keep={**keep, **kept})
    check_replan(left)
    suspects = [f"{f.norm} into {f.into} ({f.pattern}, export only)" for f in result.export_only]
    suspects += [f"{m.block} into {m.into} (merge, {m.where})" for m in result.merged]
    check_artifacts_agree(target, result.program, inputs, suspects)
    result.ops_after = op_counts(result.program.graph)
    result.params_after = weight_elements(result.program)
    result.macs_after = program_macs(result.program)
    logger.info("folded %d norm op(s), kept %d", len(result.folded), len(result.skipped))
    return result


def _settle(
    result: FoldResult,
    model: nn.Module,
    drift: Drift,
    reparam: bool,
    *,
    merged: bool,
    keep: Mapping[str, tuple[str, str]],
) -> list[str]:
    """Plan the folded program again; after a round that merged blocks (a merge makes new
    neighbours: :mod:`normfold.replan`), apply what it finds, until a plan finds nothing or after
    ``MAX_ROUNDS`` rounds. :attr:`FoldResult.replan_folds` counts what the last plan found: a
    fold found after a round without merges is a fold the planner missed, reported, not hidden.
    Returns what the last plan found, one line each (empty: the fixpoint)."""
    for round_ in range(MAX_ROUNDS + 1):
        cap = Capture.of(result.program)
        the_plan = plan(cap, keep)
        merges = plan_merges(cap, the_plan)[0] if reparam else []
        result.replan_folds = len(the_plan.folds) + len(merges)
        if not result.replan_folds or not merged or round_ == MAX_ROUNDS:
            break
        again = Analysis(cap, the_plan, drift.eager_plan(the_plan, cap, model), result)
        found = [f for f in the_plan.folds if not f.identity]
        result.folded += [_folded(f, again.eager) for f in found]
        result.skipped = [s for s in result.skipped if s.node not in {f.unit.nodes[0] for f in found}]
        if merges:
            _plan_merges(again, model, drift)
        drift.record(cap, the_plan, again.eager, again.merges, again.eager_merges)
        result.program = apply_round(model, cap, the_plan, again.eager, again.merges, again.eager_merges)
        merged = bool(again.merges)
    if result.replan_folds:
        logger.warning("planning the folded program again finds %d fold(s)", result.replan_folds)
    found = [f"{f.unit.name}: {f.pattern} into {', '.join(u.weight for u in f.updates)}"
             for f in the_plan.folds]  # fmt: skip
    return found + [f"the block at {m.adds[0]} ({m.module or 'forward'}): merge into {m.target.weight}"
                    for m in merges]  # fmt: skip


def reparameterize(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    inplace: bool = False,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[int, Mapping[int, str]] | None = None,
) -> FoldResult:
    """Merge every RepVGG-style block (parallel conv / BatchNorm / identity / avg-pool branches
    of one tensor, summed) into one conv, folding the BatchNorms first: :func:`fold` with
    ``reparameterize=True``. The user's module gets the merged conv under the name of the
    branch with the largest kernel and :class:`~normfold.reparam.MergedBranch` (adds 0) under
    the other branches' names, where every branch is a module of its own; otherwise the block
    is merged in :attr:`FoldResult.program` only (``Merged.where == "export"``, with a note)."""
    return fold(model, example_inputs, inplace=inplace, dynamic_batch=dynamic_batch,
                dynamic_axes=dynamic_axes, reparameterize=True)  # fmt: skip


def _folded(fold: Fold, eager: EagerPlan) -> Folded:
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


def working_copy(model: nn.Module, caller: str, *, inplace: bool) -> nn.Module:
    """The module a transform changes: ``model`` itself with ``inplace=True``, else a deep copy."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"{caller}() expects a torch.nn.Module, got {type(model).__name__}")
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise UsageError(
            f"could not copy {type(model).__name__} (pass inplace=True to change it in place): {e}"
        ) from e


def as_inputs(example_inputs: ExampleInputs | None, caller: str = "fold") -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, or a UsageError naming ``caller``."""
    if example_inputs is None:
        raise UsageError(f"{caller}() needs example_inputs: torch.export runs the model on them once")
    # copies: a forward that changes its input in place must not change the caller's tensors
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs.clone(),)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(t.clone() for t in example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


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
