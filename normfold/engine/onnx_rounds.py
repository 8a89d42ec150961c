"""Writing a plan and its merges into an ONNX model, then planning the result again until nothing
more folds.

A merge puts one conv where a sum of branches was, so a norm after the block's sum
(``bn(conv_a(x) + conv_b(x))``) now follows a conv and folds into it, and a block whose branch was
such a sum may now merge. As the PyTorch path plans its folded program again
(:func:`normfold.folding._settle`), the merged graph is viewed and planned again, and each round's
folds and merges are written, until a round finds nothing (at most
:data:`~normfold.engine.planner.MAX_ROUNDS` rounds). A later round folds values already rounded
once (the merged conv's), so its folds round twice; the parity check judges the file as written
either way. Without merges the first round leaves nothing a second could fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from normfold.engine import planner
from normfold.engine.branches import Merge
from normfold.engine.onnx_apply import apply_plan, folded_values
from normfold.engine.onnx_merge import apply_merges, plan_merges
from normfold.engine.onnx_values import OnnxValues
from normfold.engine.onnx_view import OnnxView
from normfold.engine.records import Keep, Plan

__all__ = ["Applied", "apply_rounds"]


@dataclass
class Applied:
    """What :func:`apply_rounds` wrote."""

    view: OnnxView  # of the graph as written
    changed: set[str]  # initializers a fold or merge gave new values
    later: list[tuple[Plan, list[Merge]]] = field(default_factory=list)  # rounds after the first
    kept: list[Keep] | None = None  # the last round's keeps (None: one round only)


def apply_rounds(
    view: OnnxView, values: OnnxValues, plan: Plan, merges: Sequence[Merge], *, reparameterize: bool
) -> Applied:
    """Write ``plan`` and ``merges`` into ``view``'s model, then the later rounds (module docstring)."""
    applied = Applied(view, _write(view, values, plan, merges))
    if not merges:
        return applied
    for _ in range(planner.MAX_ROUNDS):
        view = OnnxView(view.model, view.shapes, view.types)
        values = OnnxValues(view)
        plan = planner.plan(view, values)
        again = plan_merges(view, values, plan)[0] if reparameterize else []
        applied.view, applied.kept = view, plan.kept
        if not plan.folds and not again:
            break
        applied.changed |= _write(view, values, plan, again)
        applied.later.append((plan, again))
    return applied


def _write(view: OnnxView, values: OnnxValues, plan: Plan, merges: Sequence[Merge]) -> set[str]:
    new = folded_values(plan, values)
    apply_plan(view, plan, new, values.names)
    apply_merges(view, merges)
    return set(new) | {n for m in merges for n in (m.target.weight or "", m.bias)}
