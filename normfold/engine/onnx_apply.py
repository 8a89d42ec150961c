"""Apply a :class:`~normfold.engine.records.Plan` to an ``onnx_ir`` model (the ONNX twin of
:mod:`normfold.engine.apply_program`).

* Every folded unit is bypassed: the users of its last op read the value its first op
  transformed. Where the unit's output is a graph output, that output keeps its name: the value
  the unit read takes it, or, where that value is a graph input or output itself, an ``Identity``
  gives it.
* New parameter values (:meth:`Plan.values`, in the parameter's dtype) replace the stored
  initializers (a ``Constant`` node's tensor where the weight was one). A layer without a bias gets
  one: a third input for ``Conv``/``ConvTranspose``/``Gemm``, an ``Add`` after a bare ``MatMul``.
  A changed ``Gemm`` gets ``alpha = beta = 1``: its values were read as ``alpha * B``/``beta * C``
  (:class:`normfold.engine.onnx_values.OnnxValues`).
* Nodes the bypass left without any use go, and initializers that became unused (a
  BatchNormalization's statistics, an old weight) leave the graph; nothing else is touched.
* Shared weights: :func:`split_shared` gives each layer reading a shared initializer its own copy
  before planning; :func:`rejoin_unchanged` points the layers whose copy no fold changed back at
  the original and drops the copy, so only a folded layer keeps a copy of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx_ir as ir
import torch

from normfold.engine import onnx_ops as ops
from normfold.engine.onnx_values import OnnxValues
from normfold.engine.onnx_view import OnnxView
from normfold.engine.records import Plan, RowBlocks, new_bias_name

#: op type -> the input slots that hold a layer's parameters (weight, bias)
_LAYER_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "Add": (0, 1)}


def split_shared(model: ir.Model) -> dict[str, str]:
    """Give every layer slot reading an initializer that other ops read too its own copy; returns
    copy name -> original name."""
    graph, copies = model.graph, {}
    taken = {v.name for n in graph.all_nodes() for v in (*n.inputs, *n.outputs) if v is not None}
    taken |= set(graph.initializers)
    for init in list(graph.initializers.values()):
        uses = [u for u in init.uses() if u.node.op_type not in ops.SHAPE_ONLY]  # a shape read is no use
        if len(uses) < 2 or init.is_graph_input() or init.is_graph_output():
            continue
        slots = [u for u in uses if u.node.graph is graph and u.idx in _LAYER_SLOTS.get(u.node.op_type, ())]
        # the first reader keeps the original unless it is a layer another kind of reader shares
        # it with (a zero bias deduplicated with a BN's zero beta): then every layer takes a copy
        for use in slots[1:] if len(slots) == len(uses) else slots:
            k = 1
            while f"{init.name}__{k}" in taken:
                k += 1
            name = f"{init.name}__{k}"
            taken.add(name)
            copy = ir.Value(name=name, shape=init.shape, type=init.type, const_value=init.const_value)
            graph.register_initializer(copy)
            use.node.replace_input_with(use.idx, copy)
            copies[name] = init.name
    return copies


def rejoin_unchanged(model: ir.Model, copies: Mapping[str, str], changed: set[str]) -> None:
    """Layers whose copy of a shared initializer no fold or merge changed read one initializer
    again, under the original name (a changed layer's own copy takes a copy's name where the
    original was changed; where a merge removed the original's reader, a copy takes its name)."""
    graph = model.graph
    groups: dict[str, list[str]] = {}
    for name, original in copies.items():
        groups.setdefault(original, [original]).append(name)
    for original, members in groups.items():
        unchanged = [m for m in members if m not in changed and m in graph.initializers]
        if not unchanged:
            continue
        holder = graph.initializers[unchanged[0]]
        for name in unchanged[1:]:
            for use in list(graph.initializers[name].uses()):
                use.node.replace_input_with(use.idx, holder)
            graph.initializers.pop(name)
        if holder.name != original and original not in graph.initializers:  # its reader merged away
            graph.initializers.pop(holder.name)
            holder.name = original
            graph.register_initializer(holder)
        elif holder.name != original:  # the original was folded: the shared value takes its name back
            folded = graph.initializers.pop(original)
            graph.initializers.pop(holder.name)
            folded.name, holder.name = holder.name, original
            graph.register_initializer(folded)
            graph.register_initializer(holder)


def folded_values(plan: Plan, values: OnnxValues) -> dict[str, torch.Tensor | ir.LazyTensor]:
    """:meth:`Plan.values`, except that a weight folded on its output side only (the usual case)
    stays uncomputed: an ``ir.LazyTensor`` that reads the weight and scales it a block of rows at
    a time when the model is serialized or written, so the folded weights of a model of several
    GB are never all in memory at once (:meth:`Plan.iter_values` with ``lazy``)."""
    found: dict[str, torch.Tensor | ir.LazyTensor] = {}
    for fqn, value in plan.iter_values(values, lazy=True):
        handle = values.view.by_name.get(fqn)  # None: a bias the fold creates
        if not isinstance(value, RowBlocks):
            found[fqn] = value
        elif not isinstance(handle, ir.Value) or handle.const_value is None:  # a computed constant
            found[fqn] = value.tensor()
        else:
            found[fqn] = _lazy(fqn, values.reader(fqn), value, handle.const_value)
    return found


def _lazy(
    name: str, read: Callable[[], torch.Tensor], rows: RowBlocks, source: ir.TensorProtocol
) -> ir.LazyTensor:
    scale, in_out = rows.scale, rows.in_out  # not rows.weight: read again when written

    def make() -> ir.TensorProtocol:
        return ops.to_ir_tensor(RowBlocks(read(), scale, in_out).tensor(), name)

    return ir.LazyTensor(make, dtype=source.dtype, shape=ir.Shape(source.shape), name=name)


def apply_plan(
    view: OnnxView, plan: Plan, values: Mapping[str, torch.Tensor | ir.LazyTensor], names: set[str]
) -> None:
    """Write ``plan`` into ``view``'s model (module docstring); ``values`` from :func:`folded_values`,
    ``names``: every name taken before (new biases are named as :meth:`Plan.values` named them)."""
    graph = view.graph
    used_before = {v.name for v in graph.initializers.values() if v.uses()}
    dropped: list[ir.Node] = []
    becomes: dict[str, ir.Value] = {}
    for fold in plan.folds:
        nodes = [view.by_name[n] for n in fold.unit.nodes]
        x = view.norm_input(nodes[0])
        while x.name in becomes:
            x = becomes[x.name]
        out = nodes[-1].outputs[0]
        becomes[out.name] = bypass(graph, out, x)
        dropped.extend(nodes)
    producers = [
        v.producer() for n in dropped for v in n.inputs if v is not None and v.producer() is not None
    ]
    graph.remove(dropped, safe=True)  # detached from their inputs: unused statistics show as such
    biased: set[str] = set()  # layers given a new bias: one, for all the folds into them (Plan.values)
    for fold in plan.folds:
        for u in fold.updates:
            node = view.by_name[u.layer]
            if u.bias is None and u.side != "replace" and u.layer not in biased:
                biased.add(u.layer)
                name = new_bias_name(_Names(names), u.weight)
                add_bias(graph, node, initializer(name, values[name]))
            if node.op_type == "Gemm":
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    for name, value in values.items():
        handle = view.by_name.get(name)
        if isinstance(handle, ir.Value) and handle.const_value is not None:
            handle.const_value = value if isinstance(value, ir.LazyTensor) else ops.to_ir_tensor(value, name)
            handle.shape = ir.Shape(handle.const_value.shape)  # a Gemm's C may become one value per column
        elif isinstance(handle, ir.Node):  # a Constant node or a computed constant: now an initializer
            old = handle.outputs[0]
            old.name = f"{name}__computed"
            init = initializer(name, value)
            graph.register_initializer(init)
            old.replace_all_uses_with(init)
            producers.append(handle)
    _drop_dead(graph, producers)
    _drop_initializers(graph, used_before)


def drop_unused(graph: ir.Graph, nodes: list[ir.Node], dead: list[ir.Node] = ()) -> None:  # type: ignore[assignment]
    """Remove ``nodes`` (no reader left outside them), then the constant computations and the
    initializers that only they read (``dead``: more producers that may have lost their readers)."""
    inputs = [v for n in nodes for v in n.inputs if v is not None]
    producers = [v.producer() for v in inputs if v.producer() is not None and v.producer() not in nodes]
    graph.remove(nodes, safe=True)
    inputs += _drop_dead(graph, [*producers, *dead])  # type: ignore[list-item]
    _drop_initializers(graph, {v.name for v in inputs if v.is_initializer() and v.name})


def _drop_initializers(graph: ir.Graph, names: set[str]) -> None:
    """The initializers of ``names`` that nothing reads any more go (a graph input or output stays)."""
    for name in names:
        init = graph.initializers.get(name)
        if init is not None and not init.uses() and not init.is_graph_output() and not init.is_graph_input():
            graph.initializers.pop(name)


class _Names:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def value(self, fqn: str) -> torch.Tensor:  # pragma: no cover - naming reads names only
        raise KeyError(fqn)


def initializer(name: str, value: torch.Tensor) -> ir.Value:
    tensor = ops.to_ir_tensor(value, name)
    return ir.Value(
        name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )


def bypass(graph: ir.Graph, out: ir.Value, x: ir.Value) -> ir.Value:
    """Users of ``out`` read ``x`` instead; a graph output keeps ``out``'s name. Returns the value
    that now stands for ``out``."""
    if not out.is_graph_output():
        out.replace_all_uses_with(x)
        return x
    name = out.name
    own = x.producer() is not None and not x.is_graph_output() and not x.is_graph_input()
    if own:
        out.replace_all_uses_with(x, replace_graph_outputs=True)
        out.name = None
        x.name = name
        x.type, x.shape = out.type, out.shape  # as the graph output was declared
        return x
    ident = ir.Node("", "Identity", [x], name=f"{name}_identity")
    graph.insert_after(out.producer(), ident)
    out.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
    out.name = None
    ident.outputs[0].name = name
    ident.outputs[0].type, ident.outputs[0].shape = out.type, out.shape
    return ident.outputs[0]


def add_bias(graph: ir.Graph, node: ir.Node, bias: ir.Value) -> None:
    graph.register_initializer(bias)
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        if node.op_type == "Gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return
    out = node.outputs[0]  # a bare MatMul: y = x @ W + b
    add = ir.Node("", "Add", [out, bias], name=f"{node.name or out.name}_bias")
    graph.insert_after(node, add)
    new = add.outputs[0]
    new.type, new.shape = out.type, out.shape
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, new)
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[[o is out for o in outputs].index(True)] = new
        name = out.name
        out.name = f"{name}_unbiased"
        new.name = name
    else:
        new.name = f"{out.name}_biased"


def _drop_dead(graph: ir.Graph, stack: list[ir.Node]) -> list[ir.Value]:
    """Remove the nodes (``stack``: the removed nodes' producers) whose outputs nothing reads any
    more (constant computations of the statistics), and their producers in turn; returns what
    the removed nodes read."""
    read = []
    while stack:
        node = stack.pop()
        if node.graph is not graph or any(v.uses() or v.is_graph_output() for v in node.outputs):
            continue
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
        read += [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
    return read
