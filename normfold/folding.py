"""``fold``: capture the model once, plan every fold, apply the plan to the module and the export.

1. **Capture** (:mod:`normfold.engine.capture`): ``torch.export`` (non-strict) on the model in eval mode;
   every batch-norm op that runs is in the graph, whether a module, a subclass or functional code
   wrote it.
2. **Plan** (:mod:`normfold.engine.plan`, pure data): backward folds into the layer before a norm
   (through commuting ops, concats and adds), forward folds into the layers after it, and a
   stable code and reason for every norm op that stays.
3. **Apply** (:mod:`normfold.engine.apply`): new parameter values by name (float64 math, cast back once)
   to the user's own module, where the norm can be removed from it, and to the exported program,
   which is what ``.onnx``/``.pt2`` outputs are written from.
4. **Post-condition**: planning the folded program again finds nothing to fold
   (:attr:`FoldResult.replan_folds` is 0).

A model ``torch.export`` cannot capture as a whole is folded in parts (:mod:`normfold.engine.parts`):
the largest submodules that capture, with every module that did not listed in
:attr:`FoldResult.uncaptured`.

:func:`~normfold.engine.analysis.analyse` stops after step 2 (``inspect``): it changes nothing. The
records of the result are in :mod:`normfold.engine.fold_records`; the argument checks every transform
shares (the working copy, the example inputs, the capture options) in :mod:`normfold.prepare`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from normfold.check.workers import single_threaded
from normfold.engine.analysis import Analysis, analyse, folded_record, plan_merges_into, weight_elements
from normfold.engine.capture import Capture, CaptureOptions, op_counts
from normfold.engine.costs import program_macs
from normfold.engine.fold_records import Folded, FoldResult, Merged, NotMerged, Skipped, Uncaptured
from normfold.engine.gate import CODE as CANCELLATION
from normfold.engine.gate import OVERFLOW, at_risk, judge, overflow_risk
from normfold.engine.parts import fold_parts
from normfold.engine.plan import plan
from normfold.engine.postcheck import check_artifacts_agree, check_replan, shares_tensors
from normfold.engine.reparam import plan_merges
from normfold.engine.replan import MAX_ROUNDS, Drift, apply_round
from normfold.errors import TraceError
from normfold.prepare import (
    ExampleInputs,
    as_inputs,
    borrowing_copy,
    capture_options,
    check_materialized,
    own_tensors,
    working_copy,
)

logger = logging.getLogger(__name__)

__all__ = [  # the records and helpers re-exported here keep their old import path
    "Analysis",
    "ExampleInputs",
    "FoldResult",
    "Folded",
    "Merged",
    "NotMerged",
    "Skipped",
    "Uncaptured",
    "analyse",
    "as_inputs",
    "capture_options",
    "check_materialized",
    "fold",
    "reparameterize",
    "weight_elements",
    "working_copy",
]


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
    tensor, summed (RepVGG, MobileOne, ACNet blocks), into one conv (:mod:`normfold.engine.reparam`);
    :attr:`FoldResult.merged` lists them and :attr:`FoldResult.not_merged` the sums that stay. On
    by default, as in :func:`normfold.fold_and_export` and ``normfold fold``; ``False`` leaves the
    branches as they are (e.g. to keep training the multi-branch model).
    """
    inputs = as_inputs(example_inputs)
    options = capture_options(inputs, dynamic_batch, dynamic_axes)
    # on one intra-op thread: the fold's tensor math is small or memory-bound (two threads barely
    # speed it up on an idle machine), while beside a process holding one of two cores every op
    # waits at the barrier for the preempted thread (resnet50 beside three busy processes: the
    # apply step 2.3 s on two threads, 0.13 s on one; :mod:`normfold.check.workers`)
    with single_threaded():
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
    (:mod:`normfold.engine.gate`) unless ``judged``, and kept when they fail it; the post-conditions of
    :mod:`normfold.engine.postcheck` hold for what is returned."""
    # not in place: the modules are copied now, the tensors the plan leaves unchanged after it
    # (own_tensors), so a folded weight is never copied first
    target, borrowed = (model, frozenset()) if inplace else borrowing_copy(model, "fold")
    try:
        analysis = analyse(target, inputs, options, reparameterize=reparameterize, keep=keep)
    except TraceError as e:
        own_tensors(target, borrowed)  # the parts are run: their buffers must be their own
        return fold_parts(target.eval(), inputs, e, options)
    risky = {} if judged else at_risk(analysis.capture, analysis.plan)
    overflow = {} if judged else overflow_risk(analysis.capture, analysis.plan)
    again = functools.partial(_fold, model, inputs, options, reparameterize=reparameterize, judged=True)
    if (risky or overflow) and inplace:  # judged on a copy first: the caller's model is folded once
        trial = _fold(model, inputs, options, inplace=False, reparameterize=reparameterize, keep=keep)
        kept = {s.norm: (s.code, s.reason) for s in trial.skipped if s.code in (CANCELLATION, OVERFLOW)}
        return again(inplace=True, keep={**keep, **kept})
    result = analysis.result
    drift = Drift()  # where the module and the program come to differ (export-only decisions)
    drift.record(analysis.capture, analysis.plan, analysis.eager, analysis.merges, analysis.eager_merges)
    result.program = apply_round(target, analysis.capture, analysis.plan, analysis.eager, analysis.merges,
                                 analysis.eager_merges, in_place=inplace)  # fmt: skip
    own_tensors(target, borrowed, (result.program.state_dict, result.program.constants))
    left = _settle(result, target, drift, reparameterize, merged=bool(analysis.merges), keep=keep)
    if (risky or overflow) and (kept := judge(model, result, inputs, risky, overflow)):
        if len(kept) > 1:  # which of them fail the rule: one at a time
            kept = _one_at_a_time(again, model, inputs, keep, kept, risky, overflow)
        return again(inplace=False, keep={**keep, **kept})
    check_replan(left)
    suspects = [f"{f.norm} into {f.into} ({f.pattern}, export only)" for f in result.export_only]
    suspects += [f"{m.block} into {m.into} (merge, {m.where})" for m in result.merged]
    if suspects or not shares_tensors(target, result.program):  # else: one plan written twice alike
        check_artifacts_agree(target, result.program, inputs, suspects)
    result.ops_after = op_counts(result.program.graph)
    result.params_after = weight_elements(result.program)
    result.macs_after = program_macs(result.program)
    logger.info("folded %d norm op(s), kept %d", len(result.folded), len(result.skipped))
    return result


def _one_at_a_time(
    again: Callable[..., FoldResult],
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    keep: Mapping[str, tuple[str, str]],
    kept: Mapping[str, tuple[str, str]],
    risky: Mapping[str, float],
    overflow: Mapping[str, float],
) -> dict[str, tuple[str, str]]:
    """The folds at risk to keep when folding them all failed the rule: each is added in turn to
    those already accepted and judged so (:func:`~normfold.engine.gate.judge`); it stays folded
    when the result passes, else it is kept with the reason its own trial gave. One failing fold
    no longer takes exact ones down with it (fuzz seed 647855096: a float16 fold that overflows
    kept a cancelling one beside it that is exact alone)."""
    accepted: list[str] = []
    final: dict[str, tuple[str, str]] = {}
    for name in kept:
        others = {n: why for n, why in kept.items() if n != name and n not in accepted}
        trial = again(inplace=False, keep={**keep, **others})
        alone = judge(model, trial, inputs, {name: risky[name]} if name in risky else {},
                      {name: overflow[name]} if name in overflow else {})  # fmt: skip
        if name in alone:
            final[name] = alone[name]
        else:
            accepted.append(name)
    return final


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
    neighbours: :mod:`normfold.engine.replan`), apply what it finds, until a plan finds nothing or after
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
        result.folded += [folded_record(f, again.eager) for f in found]
        result.skipped = [s for s in result.skipped if s.node not in {f.unit.nodes[0] for f in found}]
        if merges:
            plan_merges_into(again, model, drift)
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
    branch with the largest kernel and :class:`~normfold.engine.reparam.MergedBranch` (adds 0) under
    the other branches' names, where every branch is a module of its own; otherwise the block
    is merged in :attr:`FoldResult.program` only (``Merged.where == "export"``, with a note)."""
    return fold(model, example_inputs, inplace=inplace, dynamic_batch=dynamic_batch,
                dynamic_axes=dynamic_axes, reparameterize=True)  # fmt: skip
