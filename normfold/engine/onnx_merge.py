"""Structural reparameterization of an ONNX graph: parallel branches of one tensor, summed, become
one ``Conv``.

The math and its preconditions are :mod:`normfold.engine.reparam`'s: branch ``i`` centred in the
largest kernel reads the same windows exactly when ``p_i = P - d * (K - k_i) / 2`` on every axis
(:func:`~normfold.engine.branches.check_geometry`), and the block is one conv with

    W = sum_i c_i * centre(W_i),    b = sum_i c_i * b_i

(``c_i``: ``-1`` for a subtracted branch), computed in float64 from the original's values and the
fold plan's maps and rounded once (:func:`~normfold.engine.reparam_values.merged_values`). This
module finds the blocks of an ONNX graph and writes them:

* **a block**: a tree of ``Add``/``Sub`` nodes, every operand of the output's shape (no
  broadcasting), whose summands, seen through the norms the plan folds, are ``Conv`` outputs of one
  tensor ``x`` (padded alike on both sides of an axis: by ``pads``, or by ``auto_pad`` SAME at
  stride 1, ``d (k - 1) / 2`` a side), ``x`` itself, or a norm the plan keeps on ``x`` (a
  BatchNormalization or a per-channel ``Mul``/``Add`` chain: a 1-tap kernel ``s_c`` at channel
  ``c``'s own input, bias ``t``);
* **written** after the plan's folds (:func:`~normfold.engine.onnx_apply.apply_plan`): the conv
  with the largest kernel takes ``W`` and ``b`` (a new bias input where it has none), the sum's
  users read it (a graph output keeps its name), and the other branches' nodes and the sum's go,
  with the initializers only they read.

A per-channel scale (a kept ``Mul`` by a constant, no shift) of a sub-sum that only the outer sum
reads weights that sub-sum's branches (FastViT's RepMixer ``x + g * (mixer(x) - norm(x))``) and
goes with the merge. Average-pool branches are merged on the PyTorch path only: here such a sum is
no block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
import torch

from normfold.engine import onnx_ops as ops
from normfold.engine.branches import Branch, Merge, Unmerged, check_geometry, merge_target, per_channel
from normfold.engine.context import Refused
from normfold.engine.fold_records import Folded, Merged, NotMerged
from normfold.engine.onnx_apply import add_bias, bypass, drop_unused, initializer
from normfold.engine.onnx_view import OnnxView
from normfold.engine.records import Keep, Plan, Unit, Values, new_bias_name
from normfold.engine.reparam_values import merged_values
from normfold.engine.rules.checks import check_layer

__all__ = ["apply_merges", "plan_merges"]

_SIGN = {"Add": 1.0, "Sub": -1.0}
_ONE = torch.tensor(1.0, dtype=torch.float64)


def plan_merges(view: OnnxView, values: Values, plan: Plan) -> tuple[list[Merge], list[Unmerged]]:
    """Every block of ``view``'s graph whose branches sum into one conv once ``plan``'s folds apply,
    with its values; and the sums of branches of one tensor that stay, each with a code."""
    return _Merger(view, values, plan).run()


class _Merger:
    def __init__(self, view: OnnxView, values: Values, plan: Plan) -> None:
        self.view, self.values, self.plan = view, values, plan
        by_name = view.by_name
        # every op of a folded unit stands for the value the unit reads (removed: its handle)
        self.removed_value = {
            by_name[n]: view.norm_input(by_name[f.unit.nodes[0]]) for f in plan.folds for n in f.unit.nodes
        }
        self.removed = {node: view.handle(value) for node, value in self.removed_value.items()}
        self.kept: dict[object, Keep] = {by_name[k.unit.nodes[-1]]: k for k in [*plan.kept, *plan.silent]}

    def resolve(self, node: object) -> object:
        while node in self.removed:
            node = self.removed[node]
        return node

    def users(self, node: object) -> list[object]:
        """Users seen through folded ops."""
        out: list[object] = []
        for u in self.view.users(node):
            out.extend(self.users(u) if u in self.removed else [u])
        return out

    def run(self) -> tuple[list[Merge], list[Unmerged]]:
        merges: list[Merge] = []
        unmerged: list[Unmerged] = []
        seen: set[object] = set()
        for node in reversed(list(self.view.nodes())):
            if node in seen or self._summands(node) is None:
                continue
            adds, weighted, scales = self._tree(node)
            source = self._source([leaf for leaf, _ in weighted])
            if source is None:  # not branches of one tensor; an inner sum may be a block on its own
                continue
            seen.update(adds)
            try:
                merges.append(self._merge(adds, weighted, source, scales))
            except Refused as fail:
                unmerged.append(Unmerged(tuple(self.view.name(a) for a in adds), "", fail.code, fail.reason))
        return merges[::-1], unmerged[::-1]

    # --- the sum and its branches -------------------------------------------------------------------

    def _summands(self, node: object) -> list[tuple[object, float]] | None:
        """The operands an ``Add``/``Sub`` node sums, with their signs; None for any other node
        (or one that broadcasts, or adds a constant: a bias, no branch)."""
        if not isinstance(node, ir.Node) or node.domain not in ("", "ai.onnx") or node.op_type not in _SIGN:
            return None
        operands = self.view.operands(node)
        if len(operands) != 2 or any(self.view.is_constant(o) for o in operands):
            return None
        out = self.view.shape(node)
        if not out or any(self.view.shape(o) != out for o in operands):
            return None
        return [(operands[0], 1.0), (operands[1], _SIGN[node.op_type])]

    def _tree(
        self, root: object, coeff: torch.Tensor | None = None
    ) -> tuple[list[object], list[tuple], list[Unit]]:
        """The sum's nodes (the root first, then each inner sum or per-channel scale of a sum that
        only the outer one uses), its summands with their factors (None: 1), and the scales taken
        away; seen through folded ops."""
        ops_, leaves, scales = [root], [], []
        for arg, sign in self._summands(root) or []:
            factor = coeff if sign == 1 else -(_ONE if coeff is None else coeff)
            leaf = self.resolve(arg)
            if self.users(leaf) == [root]:
                while (zero := self._plus_zero(leaf)) is not None:  # later hops: checked in _plus_zero
                    keep, leaf = zero
                    ops_ += [self.view.by_name[n] for n in reversed(keep.unit.nodes)]
                    scales.append(keep.unit)
            if self._summands(leaf) is not None and self.users(leaf) == [root]:
                inner = self._tree(leaf, factor)
            elif (scaled := self._scaled_sum(leaf, root)) is not None:
                keep, inner_root, scale = scaled
                inner = self._tree(inner_root, scale if factor is None else factor * scale)
                ops_ += [self.view.by_name[n] for n in reversed(keep.unit.nodes)]
                scales.append(keep.unit)
            else:
                leaves.append((leaf, factor))
                continue
            ops_ += inner[0]
            leaves += inner[1]
            scales += inner[2]
        return ops_, leaves, scales

    def _plus_zero(self, leaf: object) -> tuple[Keep, object] | None:
        """``(kept map, what it reads)`` when ``leaf`` is a kept map that changes nothing (``y + 0``:
        timm's literal 0 for a missing branch, exported as an ``Add`` of a zero constant) on a
        tensor only it reads: seen through, and gone with the merge."""
        keep = self.kept.get(leaf)
        if keep is None or keep.map is None or keep.unit.kind != "affine":
            return None
        s, t, _ = keep.map
        first = self.view.by_name[keep.unit.nodes[0]]
        inner = self.resolve(self.view.handle(self.view.norm_input(first)))
        if not (bool((s == 1).all()) and bool((t == 0).all())) or self.users(inner) != [first]:
            return None
        return keep, inner

    def _scaled_sum(self, leaf: object, user: object) -> tuple[Keep, object, torch.Tensor] | None:
        """``(kept scale, the sum it scales, the scale per channel)`` when ``leaf`` is a kept
        per-channel scale (no shift, on the channel axis) of a sum only it reads, and ``user``
        alone reads ``leaf`` (FastViT's ``x + g * (mixer(x) - norm(x))``)."""
        keep = self.kept.get(leaf)
        if keep is None or keep.map is None or self.users(leaf) != [user]:
            return None
        s, t, axis = keep.map
        first = self.view.by_name[keep.unit.nodes[0]]
        inner = self.resolve(self.view.handle(self.view.norm_input(first)))
        rank = len(self.view.shape(leaf))
        if bool((t != 0).any()) or axis not in (None, 1, 1 - rank) or self._summands(inner) is None:
            return None
        if self.users(inner) != [first]:
            return None
        return keep, inner, s.reshape(-1).to(torch.float64)

    def _conv(self, node: object) -> object | None:
        layer = self.view.layer(node)
        return layer if layer is not None and layer.kind == "conv" and node.op_type == "Conv" else None

    def _source(self, leaves: list[object]) -> object | None:
        """The one tensor every summand branches from (at least one a conv of it), or None."""
        conv_inputs = {leaf: self.resolve(layer.input) for leaf in leaves if (layer := self._conv(leaf))}
        # a summand other convs read is the identity branch, even when it is a conv output itself
        sources = {x for leaf, x in conv_inputs.items() if leaf not in conv_inputs.values()}
        if len(leaves) < 2 or len(sources) != 1:
            return None
        (source,) = sources
        if len(self.view.shape(source)) < 3:
            return None
        others = [leaf for leaf in leaves if leaf is not source and conv_inputs.get(leaf) is not source]
        if not all(self._norm_input(leaf, source) is source for leaf in others):
            return None
        return source if self._one_tensor(source, leaves) else None

    def _one_tensor(self, source: object, leaves: list[object]) -> bool:
        """Handles are nodes, and the outputs of a Split one handle but different tensors: of a
        node with several outputs, every branch must read the same one (a bare identity branch,
        whose value the sum reads, is no block there)."""
        if not isinstance(source, ir.Node) or len(source.outputs) == 1:
            return True
        if source in leaves:
            return False
        read = set()
        for leaf in leaves:
            layer = self._conv(leaf)
            first = layer.node if layer is not None else self.view.by_name[self.kept[leaf].unit.nodes[0]]
            value = layer.node.inputs[0] if layer is not None else self.view.norm_input(first)
            while (producer := value.producer()) in self.removed_value:
                value = self.removed_value[producer]
            read.add(id(value))
        return len(read) == 1

    def _norm_input(self, leaf: object, source: object) -> object | None:
        """What a kept norm summand reads (seen through folded ops; for a norm kept on the output
        of a conv other than ``source``, that conv's input: the block is found, and
        :meth:`_branch` says why it stays); None for any other op."""
        keep = self.kept.get(leaf)
        if keep is None:
            return None
        read = self._kept_input(keep)
        layer = self._conv(read) if read is not source else None
        return self.resolve(layer.input) if layer is not None else read

    def _kept_input(self, keep: Keep) -> object:
        return self.resolve(self.view.handle(self.view.norm_input(self.view.by_name[keep.unit.nodes[0]])))

    # --- one block ----------------------------------------------------------------------------------

    def _merge(self, adds: list[object], weighted: list[tuple], source: object, scales: list[Unit]) -> Merge:
        leaves = [leaf for leaf, _ in weighted]
        if len(set(leaves)) != len(leaves):
            where = self.view.describe(adds[0])
            raise Refused("repeated_branch", f"the same branch is added twice in the sum at {where}")
        y_shape, x_shape = self.view.shape(adds[0]), self.view.shape(source)
        nd = len(x_shape) - 2
        branches = [
            dataclasses.replace(self._branch(leaf, source, adds, nd), coeff=per_channel(c, y_shape[1]))
            for leaf, c in weighted
        ]
        target = merge_target([b for b in branches if b.kind == "conv"], branches)
        check_geometry(target, branches, tuple(x_shape), tuple(y_shape))
        bias = target.bias or new_bias_name(self.values, target.weight or "")
        folds = self.plan.folds
        new = merged_values(self.values, self.plan, folds, branches, target, bias)  # type: ignore[arg-type]
        return Merge(tuple(self.view.name(a) for a in adds), "", target, tuple(branches), bias,
                     target.bias is None, tuple(scales), new)  # fmt: skip

    def _branch(self, leaf: object, source: object, adds: list[object], nd: int) -> Branch:
        one = (1,) * nd
        if leaf is source:
            return Branch("identity", (), one, one, (0,) * nd, None)
        outside = [u for u in self.users(leaf) if u not in adds]
        if outside:
            what, other = self.view.describe(leaf), self.view.describe(outside[0])
            raise Refused("multiple_users", f"{what} output is also used outside the sum, by {other}")
        layer = self._conv(leaf)
        if layer is not None:
            return self._conv_branch(layer)
        keep = self.kept[leaf]
        if self._kept_input(keep) is not source:  # a norm kept on a conv's output
            raise Refused(keep.code, f"{keep.unit.name} stays on its conv branch: {keep.reason}")
        if keep.map is None:
            raise Refused(keep.code, f"{keep.unit.name} is no per-channel map: {keep.reason}")
        s, t, axis = keep.map
        channels = self.view.shape(leaf)[1]
        if axis not in (None, 1, -(nd + 1)):
            raise Refused("wrong_axis", f"{keep.unit.name} scales axis {axis}, not the channel axis 1")
        scale, shift = s.reshape(-1).expand(channels).clone(), t.reshape(-1).expand(channels).clone()
        return Branch("norm", keep.unit.nodes, one, one, (0,) * nd, None, scale=scale, shift=shift,
                      unit=keep.unit)  # fmt: skip

    def _conv_branch(self, layer: object) -> Branch:
        view, node = self.view, layer.node
        what = view.describe(node)
        check_layer(view, layer, "merging its block")
        kernel = tuple(view.shape(layer.weight)[2:])
        nd = len(kernel)
        strides = tuple(int(s) for s in ops.attr(node, "strides", [1] * nd))
        dilations = tuple(int(d) for d in ops.attr(node, "dilations", [1] * nd))
        auto = ops.attr(node, "auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER") and all(s == 1 for s in strides):
            # at stride 1 SAME pads d (k - 1) in all, split evenly when that is even
            pads = tuple(d * (k - 1) // 2 for d, k in zip(dilations, kernel, strict=True)) * 2
            if any(d * (k - 1) % 2 for d, k in zip(dilations, kernel, strict=True)):
                raise Refused("reparam_padding", f"{what} pads by {auto} an odd amount: unevenly")
        elif auto not in ("NOTSET", "VALID"):
            why = f"{what} pads by {auto} at a stride: its padding depends on the input size"
            raise Refused("reparam_padding", why)
        else:
            pads = tuple(int(p) for p in ops.attr(node, "pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:]:
            raise Refused("reparam_padding",
                          f"{what} pads {list(pads)}: not the same on both sides of an axis")  # fmt: skip
        nodes, out = [view.name(node)], node
        while len(users := view.users(out)) == 1 and users[0] in self.removed:
            out = users[0]
            nodes.append(view.name(out))  # its folded norms: part of the branch, gone with it
        return Branch(
            "conv", tuple(nodes), kernel, strides, pads[:nd], dilations, int(ops.attr(node, "group", 1)),
            layer=view.name(node), weight=view.state_name(layer.weight),
            bias=view.state_name(layer.bias) if layer.bias is not None else None,
        )  # fmt: skip


def apply_merges(view: OnnxView, merges: Sequence[Merge]) -> None:
    """Write ``merges`` (:func:`plan_merges`) into ``view``'s graph, after the plan's folds
    (module docstring). ``view`` indexes the graph as it was planned: its handles still name the
    nodes the folds left."""
    graph = view.graph
    for m in merges:
        target = view.by_name[m.target.layer]
        dead = _write(graph, target, 1, m.target.weight or "", m.values[m.target.weight or ""])
        if len(target.inputs) > 2 and target.inputs[2] is not None:  # its own, or one a fold gave it
            dead += _write(graph, target, 2, m.bias, m.values[m.bias])
        else:
            add_bias(graph, target, initializer(m.bias, m.values[m.bias]))
        out = bypass(graph, view.by_name[m.adds[0]].outputs[0], target.outputs[0])
        gone = [view.by_name[n] for n in m.adds]
        for b in m.branches:
            if b is not m.target:
                gone += [view.by_name[n] for n in b.nodes if view.by_name[n].graph is graph]
        for node in gone:  # what else reads them reads only their shape, which is the sum's
            for v in node.outputs:
                for use in list(v.uses()):
                    if use.node not in gone:
                        use.node.replace_input_with(use.idx, out)
        drop_unused(graph, gone, dead)


def _write(graph: ir.Graph, node: ir.Node, index: int, name: str, value: torch.Tensor) -> list[ir.Node]:
    """``node``'s input ``index`` takes ``value``: written into its initializer, or, read from a
    ``Constant`` or a computation (a cast), a new initializer ``name`` (the old value renamed);
    returns the producer left without that reader."""
    current = node.inputs[index]
    if current.is_initializer():
        current.const_value = ops.to_ir_tensor(value, current.name)
        return []
    if current.name == name:
        current.name = f"{name}__computed"
    node.replace_input_with(index, new := initializer(name, value))
    graph.register_initializer(new)
    producer = current.producer()
    return [producer] if producer is not None else []


def merge_records(
    merges: Sequence[Merge], unmerged: Sequence[Unmerged]
) -> tuple[list[Merged], list[NotMerged], list[Folded]]:
    """The report's records: each block merged (named by its last sum), each that stays with its
    code, and each kept norm a merge takes away, reported folded into the block's conv."""
    merged, taken = [], []
    for m in merges:
        into = m.target.layer or ""
        for unit in [*(b.unit for b in m.branches if b.unit is not None), *m.scales]:
            pattern = "reparam-bn" if unit.kind == "batch_norm" else "reparam-affine"
            taken.append(Folded(unit.name, unit.module_type, into, "Conv", pattern, "onnx", unit.nodes[0]))
        labels = tuple(_label(b) for b in m.branches)
        merged.append(Merged(m.adds[0], into, labels, "onnx", m.adds[0]))
    kept = [NotMerged(u.adds[0], u.code, u.reason, u.adds[0]) for u in unmerged]
    return merged, kept, taken


def _label(branch: Branch) -> str:
    if branch.kind == "identity":
        return "identity"
    owner = branch.layer if branch.kind == "conv" else branch.unit.name if branch.unit is not None else ""
    return f"{owner} ({branch.label()})"
