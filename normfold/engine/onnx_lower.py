"""Lower the BatchNormalization nodes a fold keeps into ops every runtime has (``lower_kept=``).

In eval mode a BatchNormalization is one per-channel affine map along axis 1::

    y = s * x + t,    s = scale / sqrt(var + eps),    t = B - mean * s

``s`` and ``t`` are computed in float64 from the node's constant operands and rounded once to the
input's dtype (the same single rounding a fold applies to the values it writes). Two forms:

* ``"mul-add"``: ``Add(Mul(x, s), t)`` with ``s`` and ``t`` of shape ``(C, 1, ..., 1)`` (rank of
  ``x`` minus one), so they broadcast along axis 1 at any rank from 2;
* ``"conv"``: a depthwise 1x1 ``Conv`` (``group = C``, weight ``(C, 1, 1, ...)`` holding ``s``,
  bias ``t``), for inputs of rank 3 to 5 (a Conv needs spatial axes); a runtime with a fast
  depthwise conv and no broadcasting Mul takes this one.

A node stays a BatchNormalization, with a note saying why, when its map is not that fixed map:
train mode (batch statistics), statistics or scale that are not constants, ``spatial=0``
(opset 7); or when ``x``'s rank is unknown or does not suit the form, or ``s``/``t`` do not fit the
dtype. The output keeps its name, so graph outputs and the node's users are untouched; the
statistics become unused initializers, removed. Nothing here judges the result: the written
model's parity against the original (the caller's) covers the lowered nodes like any fold.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import onnx_ir as ir
import torch

from normfold.engine import onnx_ops as ops
from normfold.engine.onnx_view import OnnxView
from normfold.options import LOWER_FORMS, check_lower_kept

__all__ = ["FORMS", "Lowered", "lower_kept"]

#: the forms ``lower_kept`` takes (:data:`normfold.options.LOWER_FORMS`), and the op(s) each writes
FORMS = dict(zip(LOWER_FORMS, ("Mul+Add", "Conv"), strict=True))


@dataclass(frozen=True)
class Lowered:
    """One BatchNormalization written as other ops: its node name and what it became."""

    node: str
    into: str


def lower_kept(view: OnnxView, form: str) -> tuple[list[Lowered], list[str]]:
    """Replace every BatchNormalization left in ``view``'s main graph by ``form`` (module
    docstring). Returns the nodes lowered and one note per node left as it is."""
    check_lower_kept(form)
    graph, lowered, notes = view.graph, [], []
    taken = {n.name for n in graph.all_nodes() if n.name} | set(graph.initializers)
    taken |= {v.name for n in graph.all_nodes() for v in (*n.inputs, *n.outputs) if v is not None and v.name}
    taken |= {v.name for v in graph.inputs if v.name}
    for node in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        name = node.outputs[0].name  # what the view calls the node (the records name it so)
        found = _map(view, node)
        if isinstance(found, str):
            notes.append(f"kept BatchNormalization {name} not lowered: {found}")
            continue
        s, t = found
        rank, dtype = _rank_and_dtype(view, node.inputs[0])
        why = _unsuited(form, rank, dtype, s, t)
        if why:
            notes.append(f"kept BatchNormalization {name} not lowered: {why}")
            continue
        stale = [v for v in node.inputs[1:] if v is not None]
        _replace(graph, node, form, rank, s.to(dtype), t.to(dtype), taken, listed=view.model.ir_version < 4)
        lowered.append(Lowered(name, FORMS[form]))
        for v in stale:  # the statistics no other node reads: initializers, or Constant nodes
            if v.uses() or v.is_graph_output() or v.is_graph_input():
                continue
            if v.name in graph.initializers:
                graph.initializers.pop(v.name)
            elif v.producer() is not None and v.producer().op_type == "Constant":
                graph.remove(v.producer(), safe=True)
    for inner in _bodies(graph):
        notes.append(f"kept BatchNormalization {inner} not lowered: it is inside a control-flow body, "
                     "which are not lowered yet")  # fmt: skip
    return lowered, notes


def _rank_and_dtype(view: OnnxView, x: ir.Value) -> tuple[int, torch.dtype | None]:
    """The rank and dtype of the value ``x`` itself (not of its producer's first output), from
    shape inference, else as declared (a rank survives a symbolic dim)."""
    shape = view.shapes.get(x.name or "") or (tuple(x.shape) if x.shape is not None else ())
    dtype = x.dtype
    if dtype is None and x.name in view.types:
        dtype = ir.DataType(view.types[x.name])
    return len(shape), ops.torch_dtype(dtype)


def _bodies(graph: ir.Graph) -> list[str]:
    """The node name of every BatchNormalization in a control-flow body of ``graph``, at any depth
    (the kept records name each with its body path: ``in_subgraph``)."""
    found = []
    for node in graph:
        for attr in node.attributes.values():
            bodies = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])  # fmt: skip
            for body in bodies:
                found += [n.name or n.outputs[0].name for n in body if n.op_type == "BatchNormalization"]
                found += _bodies(body)
    return found


def _map(view: OnnxView, node: ir.Node) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(s, t)`` in float64, or why the node is no fixed per-channel map."""
    ref = view.batch_norm(node)
    if ref is None:
        return "its statistics are per element (spatial=0), not per channel"
    if ref.training:
        return "it runs in training mode (batch statistics), which no constant map reproduces"
    consts = [view.constant(h) for h in (ref.weight, ref.bias, ref.running_mean, ref.running_var)]
    if any(c is None or not c.is_floating_point() for c in consts):
        return "its scale, bias or statistics are not constants"
    gamma, beta, mean, var = (c.double().reshape(-1) for c in consts)  # type: ignore[union-attr]
    s = gamma / torch.sqrt(var + ref.eps)
    return s, beta - mean * s


def _unsuited(
    form: str, rank: int, dtype: torch.dtype | None, s: torch.Tensor, t: torch.Tensor
) -> str | None:
    """Why ``form`` cannot take this node (``None``: it can)."""
    if dtype is None or not dtype.is_floating_point:
        return f"its input's type ({dtype}) is unknown or not floating point"
    if rank < 2:
        return "its input's rank is unknown"
    if form == "conv" and not 3 <= rank <= 5:
        return f"a Conv needs an input of rank 3 to 5, not {rank} (lower_kept='mul-add' takes any rank)"
    if form == "conv" and dtype not in (torch.float32, torch.float16):
        return (f"onnxruntime's CPU provider has no {str(dtype).removeprefix('torch.')} Conv "
                "(lower_kept='mul-add' takes it)")  # fmt: skip
    if not bool(torch.isfinite(torch.cat([s, t]).to(dtype)).all()):
        return f"its scale or shift does not fit in {str(dtype).removeprefix('torch.')}"
    return None


def _replace(
    graph: ir.Graph, node: ir.Node, form: str, rank: int, s: torch.Tensor, t: torch.Tensor, taken: set[str],
    *, listed: bool,
) -> None:  # fmt: skip
    """``node`` replaced by ``form``'s op(s), its output value (name, users, graph output) kept;
    ``listed``: the new constants are graph inputs too (ONNX IR 3 requires it of initializers)."""
    init = functools.partial(_initializer, graph, taken=taken, listed=listed)
    base = node.outputs[0].name
    channels = s.numel()
    if form == "mul-add":
        shape = (channels, *([1] * (rank - 2)))
        scale = init(f"{base}_scale", s.reshape(shape))
        shift = init(f"{base}_shift", t.reshape(shape))
        mul = ir.Node("", "Mul", [node.inputs[0], scale], name=_fresh(f"{base}_mul", taken))
        new = [mul, ir.Node("", "Add", [mul.outputs[0], shift], name=_fresh(f"{base}_add", taken))]
        mul.outputs[0].name = _fresh(f"{base}_scaled", taken)
        mul.outputs[0].type, mul.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
    else:
        weight = init(f"{base}_weight", s.reshape(channels, 1, *([1] * (rank - 2))))
        bias = init(f"{base}_bias", t)
        attrs = [ir.AttrInt64("group", channels), ir.AttrInt64s("kernel_shape", [1] * (rank - 2))]
        new = [ir.Node("", "Conv", [node.inputs[0], weight, bias], attributes=attrs,
                       name=_fresh(f"{base}_conv", taken))]  # fmt: skip
    graph.insert_after(node, new)
    old, out = node.outputs[0], new[-1].outputs[0]
    name, out.type, out.shape = old.name, old.type, old.shape
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    old.name = None
    out.name = name
    graph.remove(node, safe=True)


def _initializer(
    graph: ir.Graph, name: str, value: torch.Tensor, *, taken: set[str], listed: bool
) -> ir.Value:
    name = _fresh(name, taken)
    tensor = ops.to_ir_tensor(value.contiguous(), name)
    shape, kind = ir.Shape(tensor.shape), ir.TensorType(tensor.dtype)
    init = ir.Value(name=name, shape=shape, type=kind, const_value=tensor)
    graph.register_initializer(init)
    if listed:
        graph.inputs.append(init)
    return init


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name__k`` with the first ``k`` no value or node uses."""
    k, found = 1, name
    while found in taken:
        found, k = f"{name}__{k}", k + 1
    taken.add(found)
    return found
