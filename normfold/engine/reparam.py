"""Structural reparameterization: parallel branches of one tensor, summed, become one conv.

RepVGG-style blocks (RepVGG, MobileOne, FastViT, ACNet, ...) train several branches on one input
``x`` and add them: ``y = conv_a(x) + conv_b(x) + bn(x) + x``. Once each branch's BatchNorm is
folded (:mod:`normfold.engine.plan`), every branch is a conv of ``x`` sampled on the same output grid:

* a conv branch: ``W_i * x + b_i`` (kernel ``k_i``, padding ``p_i``);
* a norm on the identity path (a kept BatchNorm or per-channel scale/shift ``s * x + t``): a
  1-tap kernel holding ``s_c`` at channel ``c``'s own input, bias ``t``; the identity itself is
  ``s = 1``, ``t = 0``;
* an average pool (kernel ``k``, zero padding counted in the divisor), normed or not: the kernel
  ``s_c / prod(k)`` on every tap of channel ``c``'s own input, bias ``t``.

With stride ``S``, dilation ``d`` and groups ``g`` shared, output ``o`` of branch ``i`` reads
``x[o*S - p_i + d*j]`` for ``j < k_i`` on each spatial axis. Centring the kernel in the largest
one ``K`` (``(K - k_i) / 2`` zeros on each side) makes that ``x[o*S - P + d*j']``, ``j' < K``,
exactly when ``p_i = P - d * (K - k_i) / 2`` on every axis: the centred kernels see the same
windows, and the sum is one conv with

    W = sum_i centre(W_i),    b = sum_i b_i

A difference ``a - b`` and a per-channel scale ``g * (sum)`` of a sub-sum (FastViT's RepMixer:
``x + g * (mixer(x) - norm(x))``) weight their branches: branch ``i`` enters with a factor
``c_i`` per output channel (``-1``, ``g``, their products), ``W = sum_i c_i * centre(W_i)``,
``b = sum_i c_i * b_i``; such a block changes in the export only (its ``forward`` does the
arithmetic). A 1-tap branch (norm, identity) needs stride 1, ``in_channels == out_channels`` and
``P = d * (K - 1) / 2``; with groups, channel ``c``'s own input is column ``c mod (C_in / g)``
of row ``c``. The conv with the largest kernel takes ``W`` and ``b``; the adds and the other
branches go. :func:`plan_merges` finds the blocks and their new values
(:mod:`normfold.engine.reparam_values`: float64, cast once; a block whose merged values do not fit the
dtype stays, code ``overflow``); :mod:`normfold.engine.reparam_eager` decides which blocks change in the
user's module too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import fx

from normfold.engine import aten
from normfold.engine.branches import (
    Branch,
    Merge,
    Unmerged,
    check_geometry,
    conv_padding,
    ints,
    merge_target,
    per_channel,
    pool_branch,
)
from normfold.engine.capture import Capture, bind, owner, shape, tensor_meta
from normfold.engine.context import Refused
from normfold.engine.records import Fold, Keep, Plan, Unit, new_bias_name
from normfold.engine.reparam_values import merged_values
from normfold.engine.rules.checks import check_layer
from normfold.engine.torch_view import TorchView, describe

logger = logging.getLogger(__name__)

_ONE = torch.tensor(1.0, dtype=torch.float64)
_SUMS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.sub.Tensor}
_AVG_POOLS = {getattr(torch.ops.aten, f"avg_pool{d}d").default for d in (1, 2, 3)}


def plan_merges(
    capture: Capture, plan: Plan, folds: Sequence[Fold] | None = None
) -> tuple[list[Merge], list[Unmerged]]:
    """Every block of ``capture`` whose branches sum into one conv once ``folds`` (default: all of
    ``plan``'s) apply. With the folds the eager module takes (``EagerPlan.folds``), the blocks as
    the eager module computes them: an op folded in the export only is still there."""
    return _Merger(capture, plan, plan.folds if folds is None else folds).run()


class _Merger:
    def __init__(self, capture: Capture, plan: Plan, folds: Sequence[Fold]) -> None:
        self.capture, self.plan, self.folds = capture, plan, folds
        self.view = view = TorchView.of(capture)
        self.consts = view.consts
        by_name = view.by_name
        # every op of a folded unit stands for the unit's input
        self.removed = {by_name[n]: by_name[f.unit.input] for f in folds for n in f.unit.nodes}
        self.kept: dict[fx.Node, Keep] = {by_name[k.unit.nodes[-1]]: k for k in [*plan.kept, *plan.silent]}
        self.by_name = by_name

    def resolve(self, node: fx.Node) -> fx.Node:
        while node in self.removed:
            node = self.removed[node]
        return node

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Users seen through folded ops; shape reads do not count."""
        out: list[fx.Node] = []
        for u in self.view.users(node):
            out.extend(self.users(u) if u in self.removed else [u])
        return out

    def run(self) -> tuple[list[Merge], list[Unmerged]]:
        merges: list[Merge] = []
        unmerged: list[Unmerged] = []
        seen: set[fx.Node] = set()
        for node in reversed(list(self.capture.graph.nodes)):
            if node in seen or self._summands(node) is None:
                continue
            adds, weighted, scales = self._tree(node)
            leaves = [leaf for leaf, _ in weighted]
            source = self._source(leaves)
            if source is None:  # not branches of one tensor: no reparameterizable block here, but
                continue  # an inner sum may be one on its own (RepGhost's, inside a residual add)
            seen.update(adds)
            module = self.capture.canonical(owner(node)[1])
            try:
                merges.append(self._merge(adds, weighted, source, module, scales))
            except Refused as fail:
                logger.debug("block at %s stays: %s", node.name, fail.reason)
                unmerged.append(Unmerged(tuple(a.name for a in adds), module, fail.code, fail.reason))
        return merges[::-1], unmerged[::-1]

    # --- the sum and its branches ---------------------------------------------------------------

    def _summands(self, node: fx.Node) -> list[tuple[fx.Node, float]] | None:
        """The tensors a sum op adds, with their signs: ``a + b`` and ``a += b``, ``a - b``, and
        ``a + 0`` (a block whose missing branch is a literal ``0``); None when ``node`` is no sum."""
        if node.op != "call_function" or node.target not in _SUMS or aten.read_layer(node) is not None:
            return None
        args = bind(node)
        signs = [1.0, -1.0 if node.target is torch.ops.aten.sub.Tensor else 1.0]
        operands = list(zip([args["self"], args["other"]], signs, strict=True))
        tensors = [(a, sign) for a, sign in operands if isinstance(a, fx.Node)]
        literals = [a for a, _ in operands if not isinstance(a, fx.Node)]
        if args.get("alpha", 1) != 1 or any(type(a) not in (int, float) or a != 0 for a in literals):
            return None
        if not tensors or any(self.consts.is_const.get(t) or tensor_meta(t) is None for t, _ in tensors):
            return None
        return tensors if all(shape(t) == shape(node) for t, _ in tensors) else None

    def _tree(
        self, root: fx.Node, coeff: torch.Tensor | None = None
    ) -> tuple[list[fx.Node], list[tuple[fx.Node, torch.Tensor | None]], list[Unit]]:
        """The ops of a sum (the root first, then each inner sum or per-channel scale of a sum
        that only the outer op uses), its summands with their factors (None: 1), and the scales
        taken away; seen through folded ops."""
        ops, leaves, scales = [root], [], []
        for arg, sign in self._summands(root) or []:
            factor = coeff if sign == 1 else -(_ONE if coeff is None else coeff)
            leaf = self.resolve(arg)
            if self._summands(leaf) is not None and self.users(leaf) == [root]:
                inner = self._tree(leaf, factor)
            elif (scaled := self._scaled_sum(leaf, root)) is not None:
                keep, inner_root, scale = scaled
                inner = self._tree(inner_root, scale if factor is None else factor * scale)
                ops += [self.by_name[n] for n in reversed(keep.unit.nodes)]
                scales.append(keep.unit)
            else:
                leaves.append((leaf, factor))
                continue
            ops += inner[0]
            leaves += inner[1]
            scales += inner[2]
        return ops, leaves, scales

    def _scaled_sum(self, leaf: fx.Node, user: fx.Node) -> tuple[Keep, fx.Node, torch.Tensor] | None:
        """``(kept scale, the sum it scales, the scale per channel)`` when ``leaf`` is a kept
        per-channel scale (no shift, on the channel axis) of a sum used only by it, and ``user``
        alone uses ``leaf``."""
        keep = self.kept.get(leaf)
        if keep is None or keep.map is None or self.users(leaf) != [user]:
            return None
        s, t, axis = keep.map
        inner = self.resolve(self.view.norm_input(self._first(keep)))
        if bool((t != 0).any()) or axis not in (None, 1) or self._summands(inner) is None:
            return None
        if self.users(inner) != [self._first(keep)]:
            return None
        return keep, inner, s.reshape(-1).to(torch.float64)

    def _source(self, leaves: list[fx.Node]) -> fx.Node | None:
        """The one tensor every summand branches from (at least one a conv of it), or None."""
        conv_inputs = {}
        for leaf in leaves:
            layer = aten.read_layer(leaf)
            if layer is not None and layer.kind == "conv":
                conv_inputs[leaf] = self.resolve(layer.input)
        # a summand other convs read is the identity branch, even when it is a conv output itself
        sources = {x for leaf, x in conv_inputs.items() if leaf not in conv_inputs.values()}
        if len(leaves) < 2 or len(sources) != 1:
            return None
        (source,) = sources
        others = [leaf for leaf in leaves if leaf is not source and conv_inputs.get(leaf) is not source]
        return source if all(self._reads(leaf, source) is source for leaf in others) else None

    def _reads(self, leaf: fx.Node, source: fx.Node) -> fx.Node | None:
        """The tensor a kept-norm or average-pool summand reads (for a conv whose norm stays:
        that conv's input); None for any other op."""
        keep = self.kept.get(leaf)
        if keep is not None:
            leaf = self.resolve(self.view.norm_input(self._first(keep)))
            layer = aten.read_layer(leaf)
            if leaf is not source and layer is not None:
                return self.resolve(layer.input) if layer.kind == "conv" else None
            if leaf.op != "call_function" or leaf.target not in _AVG_POOLS:
                return leaf
        if leaf.op == "call_function" and leaf.target in _AVG_POOLS:
            return self.resolve(bind(leaf)["self"])
        return None

    def _first(self, keep: Keep) -> fx.Node:
        return self.by_name[keep.unit.nodes[0]]

    # --- one block ------------------------------------------------------------------------------

    def _merge(
        self,
        adds: list[fx.Node],
        weighted: list[tuple[fx.Node, torch.Tensor | None]],
        source: fx.Node,
        module: str,
        scales: list[Unit],
    ) -> Merge:
        leaves = [leaf for leaf, _ in weighted]
        if len(set(leaves)) != len(leaves):
            raise Refused(
                "repeated_branch", f"the same branch is added twice in the sum at {describe(adds[0])}"
            )
        channels = shape(adds[0])[1]
        branches = [
            dataclasses.replace(self._branch(leaf, source, adds), coeff=per_channel(coeff, channels))
            for leaf, coeff in weighted
        ]
        convs = [b for b in branches if b.kind == "conv"]
        target = merge_target(convs, branches)
        check_geometry(target, branches, tuple(shape(source)), tuple(shape(adds[0])))
        bias = target.bias or new_bias_name(self.capture, target.weight or "")
        values = merged_values(self.capture, self.plan, self.folds, branches, target, bias)
        return Merge(tuple(a.name for a in adds), module, target, tuple(branches), bias, target.bias is None,
                     tuple(scales), values)  # fmt: skip

    def _branch(self, leaf: fx.Node, source: fx.Node, adds: list[fx.Node]) -> Branch:
        if leaf is source:
            nd = len(shape(source)) - 2
            return Branch("identity", (), (1,) * nd, (1,) * nd, (0,) * nd, None)
        outside = [u for u in self.users(leaf) if u not in adds]
        if outside:
            raise Refused(
                "multiple_users",
                f"{describe(leaf)} output is also used outside the sum, by {describe(outside[0])}",
            )
        layer = aten.read_layer(leaf)
        if layer is not None:
            return self._conv_branch(layer)
        keep = self.kept.get(leaf)
        scale, shift, nodes, unit = None, None, (), None
        if keep is not None:
            scale, shift = self._norm_map(keep, leaf)
            nodes, unit = keep.unit.nodes, keep.unit
            leaf = self.resolve(self.view.norm_input(self._first(keep)))
            if leaf is not source and aten.read_layer(leaf) is not None:
                raise Refused(keep.code, f"{keep.unit.name} stays on its conv branch: {keep.reason}")
            if leaf is source:
                nd = len(shape(source)) - 2
                return Branch(
                    "norm", nodes, (1,) * nd, (1,) * nd, (0,) * nd, None, scale=scale, shift=shift, unit=unit
                )
            if len(self.users(leaf)) != 1:
                raise Refused("multiple_users", f"{describe(leaf)} output is also used outside the sum")
        return pool_branch(leaf, nodes, scale, shift, unit)

    def _conv_branch(self, layer: aten.Layer) -> Branch:
        what = describe(layer.node)
        check_layer(self.view, layer, "merging its block")
        args = bind(layer.node)
        kernel = tuple(shape(layer.weight)[2:])
        nd = len(kernel)
        dilation = ints(args.get("dilation", 1), nd)
        padding = conv_padding(args["padding"], kernel, dilation, what)
        nodes, node = [layer.node.name], layer.node
        while len(node.users) == 1 and (node := next(iter(node.users))) in self.removed:
            nodes.append(node.name)  # its folded norms: part of the branch, gone with it
        return Branch(
            "conv", tuple(nodes), kernel, ints(args["stride"], nd), padding, dilation, layer.groups,
            layer=layer.node.name, weight=self.capture.fqn[layer.weight.name],
            bias=self.capture.fqn[layer.bias.name] if layer.bias is not None else None,
        )  # fmt: skip

    def _norm_map(self, keep: Keep, leaf: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
        if keep.map is None:
            raise Refused(keep.code, f"{keep.unit.name} is no per-channel map: {keep.reason}")
        s, t, axis = keep.map
        channels = shape(leaf)[1]
        if axis not in (None, 1):
            raise Refused("wrong_axis", f"{keep.unit.name} scales axis {axis}, not the channel axis 1")
        return s.reshape(-1).expand(channels).clone(), t.reshape(-1).expand(channels).clone()
