"""The two walks fold rules match on.

* :func:`trace_back`: from a norm's input back to Conv/ConvTranspose/Linear outputs, through ops
  the map commutes with (:class:`~normfold.engine.view.ThroughRef`), through folded norms, and
  through at most one merge (``concat``: the norm splits per slice; ``add``: every branch is
  scaled). Every node on the way must feed only the next one.
* :func:`trace_forward`: from a norm's output to every consumer; each must be the data input of a
  layer, reached through commuting ops only.

A walk that stops raises :class:`~normfold.engine.context.Refused` saying where and why; one walk
serves every rule of its direction (memoized per norm and plan state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.rules.checks import stop
from normfold.engine.view import LayerRef, Node


@dataclass
class Branch:
    layer: LayerRef
    path: list[Node] = field(default_factory=list)  # nodes after the layer up to the norm's input


@dataclass
class BackTrace:
    branches: list[Branch]
    merge: Node | None = None
    merge_kind: str | None = None  # "concat" or "add"


@dataclass
class ForwardTrace:
    sinks: list[Branch]  # each consumer layer and the path from the norm's output to it


def _is_merge(ctx: Context, node: Node, kind: str) -> bool:
    view = ctx.view
    tensors = view.operands(node)
    if kind == "add":
        out = view.shape(node)
        return len(tensors) == 2 and all(view.shape(a) == out and not view.is_constant(a) for a in tensors)
    return len(tensors) >= 2


def trace_back(ctx: Context, cand: Candidate) -> BackTrace:
    key = ("back", id(cand), len(ctx.plan.folds))
    if ctx.memo.get("key") != key:
        ctx.start_walk()
        trace = BackTrace([])
        try:
            trace.branches = _sources(ctx, cand.inputs[0], cand.nodes[0], trace, f"input of {cand.unit.name}")
            ctx.memo.update(key=key, value=trace, passed=list(ctx.passed))
        except Refused as r:
            ctx.memo.update(key=key, value=r, passed=list(ctx.passed))
    ctx.passed = list(ctx.memo["passed"])
    found = ctx.memo["value"]
    if isinstance(found, Refused):
        raise found
    return found


def _sources(ctx: Context, node: Node, user: Node, trace: BackTrace, role: str) -> list[Branch]:
    """The layers whose outputs reach ``user`` (as ``node``) through commuting ops."""
    view = ctx.view
    while node in ctx.removed:
        ctx.passed.append(node)
        node = ctx.removed[node]
    if view.is_input(node):
        raise stop(view, node, role)
    users = ctx.users(node)
    if users != [user] or sum(ctx.resolve(a) is node for a in view.operands(user)) > 1:
        raise Refused("multiple_users", f"{view.describe(node)} output has {len(users)} users")
    layer = ctx.layer(node)
    if layer is not None:
        return [Branch(layer)]
    through = view.through(node)
    kind = view.merge_kind(node)
    if through is not None:
        if through.refused is not None:
            raise Refused("not_commuting", f"{view.describe(node)}: {through.refused}")
        branches = _sources(ctx, through.input, node, trace, role)
    elif kind is not None and trace.merge is None and _is_merge(ctx, node, kind):
        trace.merge, trace.merge_kind = node, kind
        branches = [b for a in view.operands(node) for b in _sources(ctx, a, node, trace, role)]
    else:
        raise stop(view, node, role)
    for b in branches:
        b.path.append(node)
    return branches


def trace_forward(ctx: Context, cand: Candidate) -> ForwardTrace:
    ctx.start_walk()
    sinks = _sinks(ctx, cand.nodes[-1], [], cand.unit.name)
    if not sinks:
        raise Refused("unused", f"{cand.unit.name} output is never used")
    return ForwardTrace(sinks)


def _sinks(ctx: Context, node: Node, path: list[Node], name: str) -> list[Branch]:
    view = ctx.view
    found = []
    for user in ctx.users(node):
        layer = ctx.layer(user, reading=True)
        if layer is not None and ctx.resolve(layer.input) is node:
            found.append(Branch(layer, path))
            continue
        through = view.through(user)
        if through is None or ctx.resolve(through.input) is not node:
            raise stop(view, user, name, forward=True)
        if through.refused is not None:
            raise Refused("not_commuting", f"{view.describe(user)}: {through.refused}")
        found.extend(_sinks(ctx, user, [*path, user], name))
    return found
