"""What rules read while a plan is being made: the graph view plus the folds committed so far.

A folded norm op is gone from the graph the plan describes, so a later rule walks *through* it: it
stands for its input (:meth:`Context.resolve`), and its users count as users of that input
(:meth:`Context.users`). Every folded op a walk passed through is recorded (:meth:`Context.after`):
the new fold is exact only where those ops are gone too, which the appliers honour.

The planner (:mod:`normfold.engine.planner`) is the only writer (:meth:`Context.commit`); rules
only read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from normfold.engine.records import Fold, LayerUpdate, Plan, Unit, Values
from normfold.engine.view import GraphView, LayerRef, Node


class Refused(Exception):
    """A precondition of a rule that does not hold: a stable code (:mod:`normfold.codes`) and the
    reason users read."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class Context:
    view: GraphView
    values: Values  # the capture: current tensors (overflow checks) and taken names (new biases)
    removed: dict[Node, Node] = field(default_factory=dict)  # folded op -> its input on the chain
    passed: list[Node] = field(default_factory=list)  # folded ops the current walk went through
    #: weight FQN -> (plan index, fold) of the folds into it
    folds_into: dict[str, list[tuple[int, Fold]]] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    memo: dict[str, object] = field(default_factory=dict)  # the last walk (one serves every rule)

    # --- reading through folded ops ---------------------------------------------------------------

    def resolve(self, node: Node) -> Node:
        """A folded op stands for its input."""
        while node in self.removed:
            node = self.removed[node]
        return node

    def users(self, node: Node) -> list[Node]:
        """Users of the node's values: folded ops are seen through (their users count instead)."""
        out: list[Node] = []
        for u in self.view.users(node):
            if u in self.removed:
                self.passed.append(u)
                out.extend(self.users(u))
            else:
                out.append(u)
        return out

    def layer(self, node: Node, *, reading: bool = False) -> LayerRef | None:
        """The layer whose output (``reading``: whose data input) ``node`` is, with its weight and
        bias seen through folded ops (a weight computed once by a fold is that fold's parameter);
        such ops count as passed: the new fold builds on theirs."""
        layer = self.view.layer_reading(node) if reading else self.view.layer(node)
        if layer is None or (layer.weight not in self.removed and layer.bias not in self.removed):
            return layer
        for arg in (layer.weight, layer.bias):
            while arg in self.removed:
                self.passed.append(arg)
                arg = self.removed[arg]
        return dataclasses.replace(layer, weight=self.resolve(layer.weight), bias=self.resolve(layer.bias))

    def start_walk(self) -> None:
        self.passed = []

    def after(self) -> tuple[str, ...]:
        """The folded ops the last walk passed through: the fold is exact only where they are gone."""
        return tuple(dict.fromkeys(self.view.name(n) for n in self.passed))

    def related(self, fold: Fold) -> list[Fold]:
        """Folds committed into the layers ``fold`` changes, in plan order (the order maps compose)."""
        found = {i: f for u in fold.updates for i, f in self.folds_into.get(u.weight, [])}
        return [found[i] for i in sorted(found)]

    # --- records ----------------------------------------------------------------------------------

    def update(self, layer: LayerRef, side: str, scale: torch.Tensor, shift: torch.Tensor) -> LayerUpdate:
        view = self.view
        _, module, cls = view.owner(layer.node)
        bias = view.state_name(layer.bias) if layer.bias is not None else None
        return LayerUpdate(
            layer=view.name(layer.node), module=view.canonical(module), module_type=cls, kind=layer.kind,
            weight=view.state_name(layer.weight), bias=bias, groups=layer.groups, in_out=layer.in_out,
            side=side, scale=scale, shift=shift,
        )  # fmt: skip

    # --- the planner's writes -----------------------------------------------------------------------

    def commit(self, nodes: list[Node], inputs: list[Node], fold: Fold) -> None:
        for node, x in zip(nodes, inputs, strict=True):
            self.removed[node] = x
        self.plan.folds.append(fold)
        for u in fold.updates:
            self.folds_into.setdefault(u.weight, []).append((len(self.plan.folds) - 1, fold))


@dataclass
class Candidate:
    """A norm unit found in the graph, with its per-channel map ``y = s * x + t`` (``s``, ``t``
    broadcastable against the unit's input; ``axis`` its channel axis, None for a scalar map)."""

    unit: Unit
    nodes: list[Node]
    inputs: list[Node]  # each node's transformed input (the first one is the unit's input)
    s: torch.Tensor | None = None
    t: torch.Tensor | None = None
    axis: int | None = None
    refused: Refused | None = None  # the map itself is not a per-channel map
    #: the norm computes on parameters and literals alone (weight standardization): its output is
    #: a constant, for :class:`~normfold.engine.rules.constant.ConstantWeight`, not a map on data
    constant: bool = False
