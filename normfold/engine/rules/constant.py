"""A layer weight computed from parameters alone, computed once: weight standardization.

timm's ``StdConv2d``/``ScaledStdConv2d`` and Hugging Face BiT standardize their weight in every
``forward``::

    W_std = batch_norm(W.reshape(1, O, -1), None, None, weight=gain, training=True, eps)
          = gain_o * (W_o - mean(W_o)) / sqrt(var(W_o) + eps)          (per output channel o)

In eval mode nothing of it depends on the input: it is a constant of the parameters. The rule
replaces the layer's weight by that constant (computed in float64, rounded once) and takes the
whole computation out of the graph, so the layer reads a plain parameter again, and a norm after it
can then fold into it as into any layer.

It matches a batch norm whose output is constant and, through constant ops each used once, is the
weight of exactly one layer. The parameter of the layer weight's shape and dtype becomes the new
weight; every other parameter the computation reads (``gain``) must be read there alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.records import Fold
from normfold.engine.view import LayerRef, Node


@dataclass
class ConstantMatch:
    cand: Candidate
    layer: LayerRef
    nodes: list[Node]  # the ops computing the weight, in graph order (the last is the weight)
    leaves: list[Node]  # the parameters they read
    weight: Node | None = None  # the parameter that becomes the weight (set by check)


class ConstantWeight:
    name: ClassVar[str] = "constant-weight"
    direction: ClassVar[str] = "backward"

    def match(self, ctx: Context, cand: Candidate) -> ConstantMatch | None:
        view, node = ctx.view, cand.nodes[-1]
        if not cand.constant:
            return None
        while True:  # forward, through constant ops used once, to the layer that reads it as weight
            users = view.users(node)
            if len(users) != 1:
                return None
            layer = view.layer(users[0])
            if layer is not None and layer.weight is node:
                break
            if not view.is_constant(users[0]):
                return None
            node = users[0]
        nodes: list[Node] = []
        leaves: list[Node] = []
        stack = [node]
        while stack:  # backward: the whole computation of the weight
            n = stack.pop()
            if n in nodes or n in leaves:
                continue
            if view.state_name(n) is not None:
                leaves.append(n)
            else:
                nodes.append(n)
                stack.extend(view.operands(n))
        order = {n: i for i, n in enumerate(view.nodes())}
        return ConstantMatch(cand, layer, sorted(nodes, key=order.__getitem__), leaves)

    def check(self, ctx: Context, m: ConstantMatch) -> Refused | None:
        view, what = ctx.view, ctx.view.describe(m.layer.node)
        inside = {*m.nodes, m.layer.node}
        for n in [*m.nodes, *m.leaves]:
            outside = [u for u in view.users(n) if u not in inside]
            if outside:
                return Refused(
                    "shared_producer",
                    f"{view.describe(n)}, which the weight of {what} is computed from, is also read by "
                    f"{view.describe(outside[0])}: computing the weight once would change it",
                )
        shape, dtype = view.shape(m.nodes[-1]), view.dtype(m.layer.node)
        fits = [
            p for p in m.leaves if view.is_parameter(p) and view.shape(p) == shape and view.dtype(p) == dtype
        ]
        if len(fits) != 1:
            return Refused(
                "weight_not_parameter",
                f"the weight of {what} is computed from {len(fits)} parameters of its shape and dtype, "
                "not one it could be stored in",
            )
        value = view.constant(m.nodes[-1])
        if value is None or not bool(torch.isfinite(value).all()):
            return Refused("bad_statistics", f"the weight {what} computes is not finite")
        m.weight = fits[0]
        return None

    def plan(self, ctx: Context, m: ConstantMatch) -> Fold:
        view = ctx.view
        value = view.constant(m.nodes[-1]).reshape(view.shape(m.weight))
        layer = dataclasses.replace(m.layer, weight=m.weight)
        channels = view.shape(m.layer.node)[m.layer.channel_axis]
        ones, zeros = torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        update = dataclasses.replace(ctx.update(layer, "replace", ones, zeros), value=value)
        unit = dataclasses.replace(
            m.cand.unit, nodes=tuple(view.name(n) for n in m.nodes), input=view.name(m.weight)
        )
        return Fold(unit, "weight_std", (update,), (), ctx.after())

    def removes(self, ctx: Context, m: ConstantMatch) -> tuple[list[Node], list[Node]]:
        """Every op of the computation now stands for the stored weight."""
        return m.nodes, [m.weight] * len(m.nodes)
