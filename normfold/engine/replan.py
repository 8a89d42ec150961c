"""Re-planning after merges: plan, merge, plan again until nothing changes.

A merge makes new neighbours: the merged conv now feeds what the block's sum fed. A norm after a
block (kept by the first plan: its input was a sum, or a layer output with two users) then follows
one conv, and a block whose branch only now ends in a conv can merge. :func:`normfold.folding.fold`
therefore plans the folded program again and applies what it finds, at most :data:`MAX_ROUNDS`
times, until a plan finds nothing (``FoldResult.replan_folds == 0``).

A later round plans on the program. The program is what the eager module computes except where
the export alone changed, by an export-only fold or merge: there the module still runs the ops the
program lost, and the layers they went into keep their own values. :class:`Drift` records those
differences, and a later fold or merge lands in the module too only where it touches none of them:

* no layer it updates holds another value in the module than in the program
  (:attr:`Drift.weights`: an export-only fold went into it, or it took an export-only merge, or a
  merge of such layers);
* the module it removes (the norm's own module, a merged branch's module) runs no op in the module
  that the program has lost (:attr:`Drift.modules`), and no statistics read by such an op.

Everything else is the same computation in both, so the eager decision of
:func:`normfold.engine.apply.eager_plan` on the program's capture holds for the module.

:func:`apply_round` applies one round (the first included) to both: the program gets every fold
and merge with values computed from its own (float64, cast once); the module gets its subset,
with values computed from the module's own: a merged conv there never starts from a value that
holds an export-only fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from torch.export import ExportedProgram

from normfold.engine.apply import EagerPlan, apply_module, apply_program, eager_plan, write_in_place
from normfold.engine.capture import Capture, module_calls
from normfold.engine.plan import Fold, Keep, Plan
from normfold.engine.reparam_eager import apply_merges

if TYPE_CHECKING:
    from normfold.engine.branches import Merge
    from normfold.engine.reparam_eager import EagerMerge

#: plan -> apply rounds after the first; each round removes ops, so a fixpoint comes fast (one
#: round for a norm after a merged block, one more per level of blocks nested that way)
MAX_ROUNDS = 4


@dataclass
class Drift:
    """Where the eager module and the program differ after export-only folds and merges."""

    weights: dict[str, str] = field(default_factory=dict)  # layer weight FQN -> why it differs
    modules: dict[str, str] = field(default_factory=dict)  # module path -> the op the program lost

    def record(
        self,
        capture: Capture,
        plan: Plan,
        eager: EagerPlan,
        merges: Sequence[Merge] = (),
        eager_merges: Sequence[EagerMerge] = (),
    ) -> None:
        """Add one round's export-only decisions (before its program is written: the ops are
        looked up in ``capture``'s graph)."""
        mine = {id(f) for f in eager.folds}
        gone: list[str] = []
        for f in plan.folds:
            if id(f) in mine or f.identity:  # an op that changes nothing differs nowhere
                continue
            for u in f.updates:
                self.weights.setdefault(u.weight, f"{f.unit.name} is folded into it in the export only")
            gone += f.unit.nodes
            stats = f.unit.stats.get("running_mean") or ""
            if "." in stats:  # a module's statistics read by forward code the module still runs
                self.modules.setdefault(stats.rpartition(".")[0], f"{f.unit.name} reads its statistics")
        for m, e in zip(merges, eager_merges, strict=True):
            weight = m.target.weight or ""
            if e.target is None:
                self.weights.setdefault(weight, "its block is merged in the export only")
                gone += [
                    *m.adds,
                    *(n for b in m.branches for n in b.nodes),
                    *(n for s in m.scales for n in s.nodes),
                ]
            elif any(b.weight in self.weights for b in m.branches):
                self.weights.setdefault(weight, "it took branches that differ in the module")
            elif e.target != weight.rpartition(".")[0]:  # a branch module (conv + BN) became the conv
                self.weights.setdefault(weight, f"the module holds the merged conv as {e.target}")
        by_name = {n.name: n for n in capture.graph.nodes}
        for name in gone:
            for _, path in module_calls(by_name[name]):
                path = capture.canonical(path)
                if path:
                    self.modules.setdefault(
                        path, f"it runs {name}, which only the export has folded or merged"
                    )

    def why(self, fold: Fold) -> str | None:
        """Why a later round's ``fold`` cannot land in the module (None: it can)."""
        for u in fold.updates:
            if u.weight in self.weights:
                return f"{u.weight} differs in the eager module: {self.weights[u.weight]}"
        unit = fold.unit
        stats = unit.stats.get("running_mean") or ""
        path = stats.rpartition(".")[0] if unit.kind == "batch_norm" and "." in stats else unit.module
        if path in self.modules:
            return f"{path} differs in the eager module: {self.modules[path]}"
        return None

    def eager_plan(self, plan: Plan, capture: Capture, model: nn.Module) -> EagerPlan:
        """:func:`normfold.engine.apply.eager_plan` for a later round's ``plan`` (on the program's
        ``capture``), its folds that touch a difference held to the export (with the reason)."""
        held = {f.unit.nodes[0]: why for f in plan.folds if (why := self.why(f)) is not None}
        if not held:
            return eager_plan(plan, capture, model)
        # the held folds stay in the module: kept there, so a norm module they share stays too
        stay = [
            Keep(f.unit, "export_only", held[f.unit.nodes[0]]) for f in plan.folds if f.unit.nodes[0] in held
        ]
        sub = Plan(
            folds=[f for f in plan.folds if f.unit.nodes[0] not in held],
            kept=[*plan.kept, *stay],
            silent=list(plan.silent),
        )
        eager = eager_plan(sub, capture, model)
        eager.export_only.update(held)
        return eager


def apply_round(
    model: nn.Module,
    capture: Capture,
    plan: Plan,
    eager: EagerPlan,
    merges: Sequence[Merge] = (),
    eager_merges: Sequence[EagerMerge] = (),
    *,
    in_place: bool = False,
) -> ExportedProgram:
    """Apply one round's folds and merges to ``model`` (``eager``'s folds, the merges with an
    eager target) and to ``capture``'s program (all of them); return the program. ``in_place``
    (the first round): where the module takes every fold, its own tensors receive the values."""
    if len(eager.folds) == len(plan.folds):  # the module and the program get the same values
        if in_place:  # written into the model's own tensors: no second copy of the weights
            values = write_in_place(model, plan.iter_values(capture, lazy=True))
        else:
            values = plan.values(capture)
        apply_module(model, eager, values)
    else:  # some folds land in the export only: the module gets its own subset
        values = plan.values(capture)
        apply_module(model, eager, plan.values(capture, eager.folds))
    for m in merges:  # computed when planned, from the capture's values (normfold.engine.reparam_values)
        values.update(m.values)
    apply_merges(model, merges, eager_merges)  # with the values from the module's own
    return apply_program(capture, plan, values, merges)
