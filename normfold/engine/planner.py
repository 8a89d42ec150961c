"""The planner: runs the rule table on every norm unit until nothing more folds.

Each round visits the norms still in place: first every ``backward`` rule, in graph order (a fold
into the layer before a norm makes the next norm's walk pass through it), then every ``forward``
rule on those still left, in reverse graph order (a later norm folding forward first leaves an
earlier one a layer to fold into). Rounds repeat while a round folds something. Within a direction
the table order is the priority: the first rule that matches decides. Every decision is recorded:
a :class:`~normfold.engine.records.Fold`, or a :class:`~normfold.engine.records.Keep` with the
code and reason of the rule that refused (the backward reason first; the forward one where it
names what blocks a fold that could exist).

Pure: reads the view, changes nothing. ``keep``: norms (by :attr:`Unit.name`) decided elsewhere to
stay, with their ``(code, reason)`` (the measured gate of :mod:`normfold.engine.gate`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.norms import candidates, norm_like
from normfold.engine.records import Keep, Plan, Values
from normfold.engine.rules import RULES
from normfold.engine.rules.base import FoldRule
from normfold.engine.rules.checks import check_range
from normfold.engine.view import GraphView

logger = logging.getLogger(__name__)

#: forward-walk codes that say only "no layer after it": the backward reason tells more
_GENERIC_FORWARD = {"feeds_op", "before_activation", "model_output", "unused", "multiple_users"}
#: rounds of the table over the norms left; each folding round removes ops, so a fixpoint comes fast
MAX_ROUNDS = 8


def plan(
    view: GraphView,
    values: Values,
    keep: Mapping[str, tuple[str, str]] | None = None,
    rules: Sequence[FoldRule] = RULES,
) -> Plan:
    """Plan every fold of the viewed graph (pure data; see the module docstring)."""
    ctx = Context(view, values)
    keep = keep or {}
    pending: list[Candidate] = []
    refusals: dict[int, dict[str, Refused]] = {}
    for cand in candidates(view):
        if cand.unit.name in keep:
            ctx.plan.kept.append(Keep(cand.unit, *keep[cand.unit.name]))
        elif cand.refused is not None and not cand.constant:
            if cand.unit.kind == "batch_norm":  # arithmetic that is no per-channel map is no norm
                ctx.plan.kept.append(Keep(cand.unit, cand.refused.code, cand.refused.reason))
        else:
            pending.append(cand)
    done: set[int] = set()
    for _ in range(MAX_ROUNDS):
        folded = 0
        for direction, order in (("backward", pending), ("forward", pending[::-1])):
            table = [r for r in rules if r.direction == direction]
            for cand in order:
                if id(cand) in done or not table:
                    continue
                refused = _try(ctx, cand, table)
                if refused is None:
                    done.add(id(cand))
                    folded += 1
                else:
                    refusals.setdefault(id(cand), {})[direction] = refused
        if not folded:
            break
    for cand in pending:
        if id(cand) not in done:
            _keep(ctx, cand, refusals.get(id(cand), {}))
    order = {view.name(n): i for i, n in enumerate(view.nodes())}
    ctx.plan.kept.sort(key=lambda k: order.get(k.unit.nodes[0], -1))
    return ctx.plan


def _try(ctx: Context, cand: Candidate, rules: Sequence[FoldRule]) -> Refused | None:
    """The first rule of ``rules`` that matches decides: None when it folded, else its refusal."""
    refused: Refused | None = None
    for rule in rules:
        try:
            match = rule.match(ctx, cand)
        except Refused as r:  # the walk this rule matches on stops: the reason says where
            refused = refused or r
            continue
        if match is None:
            continue
        refused = rule.check(ctx, match)
        if refused is None:
            fold = rule.plan(ctx, match)
            try:
                check_range(ctx, fold)
            except Refused as r:
                return r
            ctx.commit(*rule.removes(ctx, match), fold)
            logger.debug("fold %s -> %s (%s, %s)", cand.unit.name, [u.layer for u in fold.updates],
                         fold.pattern, rule.name)  # fmt: skip
        return refused
    return refused or Refused("no_rule", f"no rule of the table matches {cand.unit.name}")


def _keep(ctx: Context, cand: Candidate, why: dict[str, Refused]) -> None:
    back, fwd = why.get("backward"), why.get("forward")
    if cand.unit.kind == "affine" and not norm_like(cand):
        # a scalar op or a layer scale that stays is not a norm: not reported
        last = fwd or back or Refused("no_rule", f"no rule of the table matches {cand.unit.name}")
        ctx.plan.silent.append(Keep(cand.unit, last.code, last.reason, (cand.s, cand.t, cand.axis)))
        return
    # the forward attempt's code only when it names what blocks a fold that could exist
    fail = back or fwd or cand.refused or Refused("no_rule", f"no rule of the table matches {cand.unit.name}")
    fail = back if fwd is None or (back is not None and fwd.code in _GENERIC_FORWARD) else fwd
    reason = fail.reason
    if back is not None and fwd is not None and back.reason != fail.reason:
        reason = f"{back.reason}; as a forward fold: {fail.reason}"
    logger.debug("keep %s: %s", cand.unit.name, reason)
    ctx.plan.kept.append(
        Keep(cand.unit, fail.code, reason, None if cand.s is None else (cand.s, cand.t, cand.axis))
    )
