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
        x = view.handle(node.inputs[0])
        declared = node.inputs[0].shape  # a rank, where the view's shapes lack it (a symbolic dim)
        rank, dtype = len(view.shape(x) or (declared if declared is not None else ())), view.dtype(x)
        why = _unsuited(form, rank, dtype, s, t)
        if why:
            notes.append(f"kept BatchNormalization {name} not lowered: {why}")
            continue
        stale = [v for v in node.inputs[1:] if v is not None and v.name in graph.initializers]
        _replace(graph, node, form, rank, s.to(dtype), t.to(dtype), taken)
        lowered.append(Lowered(name, FORMS[form]))
        for v in stale:  # the statistics no other node reads
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name, None)
    return lowered, notes


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
    if not bool(torch.isfinite(torch.cat([s, t]).to(dtype)).all()):
        return f"its scale or shift does not fit in {str(dtype).removeprefix('torch.')}"
    return None


def _replace(
    graph: ir.Graph, node: ir.Node, form: str, rank: int, s: torch.Tensor, t: torch.Tensor, taken: set[str]
) -> None:
    """``node`` replaced by ``form``'s op(s), its output value (name, users, graph output) kept."""
    base = node.outputs[0].name
    channels = s.numel()
    if form == "mul-add":
        shape = (channels, *([1] * (rank - 2)))
        scale = _initializer(graph, f"{base}_scale", s.reshape(shape), taken)
        shift = _initializer(graph, f"{base}_shift", t.reshape(shape), taken)
        mul = ir.Node("", "Mul", [node.inputs[0], scale], name=_fresh(f"{base}_mul", taken))
        new = [mul, ir.Node("", "Add", [mul.outputs[0], shift], name=_fresh(f"{base}_add", taken))]
        mul.outputs[0].name = _fresh(f"{base}_scaled", taken)
        mul.outputs[0].type, mul.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
    else:
        weight = _initializer(graph, f"{base}_weight", s.reshape(channels, 1, *([1] * (rank - 2))), taken)
        bias = _initializer(graph, f"{base}_bias", t, taken)
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


def _initializer(graph: ir.Graph, name: str, value: torch.Tensor, taken: set[str]) -> ir.Value:
    name = _fresh(name, taken)
    tensor = ops.to_ir_tensor(value.contiguous(), name)
    shape, kind = ir.Shape(tensor.shape), ir.TensorType(tensor.dtype)
    init = ir.Value(name=name, shape=shape, type=kind, const_value=tensor)
    graph.register_initializer(init)
    return init


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name__k`` with the first ``k`` no value or node uses."""
    k, found = 1, name
    while found in taken:
        found, k = f"{name}__{k}", k + 1
    taken.add(found)
    return found
