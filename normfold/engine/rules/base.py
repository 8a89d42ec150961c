"""What a fold rule is.

A rule is one small class per pattern, run by the planner (:mod:`normfold.engine.planner`) on
every norm :class:`~normfold.engine.context.Candidate`, in table order
(:data:`normfold.engine.rules.RULES`):

* ``match(ctx, cand)``: the rule's shape around the norm, as a match object; ``None`` when the
  shape is another rule's; raises :class:`~normfold.engine.context.Refused` when the walk it
  matches on stops (nothing of this direction can fold: the reason says where);
* ``check(ctx, match)``: every precondition of an exact fold; returns ``None`` or the
  :class:`~normfold.engine.context.Refused` (a code and a reason), never a bare ``False``.
  Proving the channel correspondence computes the per-layer maps; they are kept on the match;
* ``plan(ctx, match)``: the :class:`~normfold.engine.records.Fold` record (pure data);
* ``removes(ctx, match)``: the nodes the fold takes out of the graph and the node each stands for
  from then on (later walks see through them); by default the norm's own ops and their inputs.

``direction`` says when the planner tries the rule: ``backward`` rules (into the layers before the
norm) on the norms in graph order, ``forward`` rules (into the layers after it) on the norms still
left, in reverse graph order. The first rule of a direction whose ``match`` returns a match
decides for that direction.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.records import Fold
from normfold.engine.view import Node


class FoldRule(Protocol):
    name: ClassVar[str]
    direction: ClassVar[str]  # "backward" or "forward"

    def match(self, ctx: Context, cand: Candidate) -> Any | None: ...

    def check(self, ctx: Context, match: Any) -> Refused | None: ...

    def plan(self, ctx: Context, match: Any) -> Fold: ...

    def removes(self, ctx: Context, match: Any) -> tuple[list[Node], list[Node]]: ...


class NormRule:
    """The default of :meth:`FoldRule.removes`: the norm's ops go, each standing for its input."""

    def removes(self, ctx: Context, match: Any) -> tuple[list[Node], list[Node]]:
        return match.cand.nodes, match.cand.inputs


def norm_tag(cand: Candidate) -> str:
    """The norm's half of a pattern name: ``bn`` or ``affine``."""
    return "bn" if cand.unit.kind == "batch_norm" else "affine"
