"""The ONNX op tables the ONNX graph view reads (:mod:`normfold.engine.onnx_view`), and the two
computations it runs on tensors: constants folded in float64, and an op run on channel ids.

Why each "through" op is exact for ``y = s * x + t`` (per channel) is the same as for ATen
(:mod:`normfold.engine.aten`): layout ops (Reshape, Flatten, Transpose, (Un)Squeeze, Slice,
Identity, inference Dropout, a Cast to the same type) move or copy elements; averages
(GlobalAveragePool, AveragePool without counted zero padding, ReduceMean over non-channel axes)
average one channel's values, ``mean(s*x+t) = s*mean(x)+t``; maxima (MaxPool, GlobalMaxPool,
ReduceMax) commute with increasing maps only (``s > 0``, checked per fold).

Constants (:func:`evaluate`): initializers, ``Constant`` nodes, and the few ops converters wrap
BN statistics in (``Sqrt(var + eps)``, ``Reciprocal``, ``Mul``/``Div`` by ``gamma``, reshapes to
``(1, C, 1, 1)``), computed in float64 from the stored values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import torch

LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Cast", "Slice"}
MEAN = {"GlobalAveragePool", "AveragePool", "ReduceMean"}
MAX = {"GlobalMaxPool", "MaxPool", "ReduceMax"}
POOLS = {"GlobalAveragePool", "AveragePool", "GlobalMaxPool", "MaxPool"}
REDUCTIONS = {"ReduceMean", "ReduceMax"}
#: ops that read only the shape of their input: such a use is no use of its values
SHAPE_ONLY = {"Shape", "Size"}
ACTIVATIONS = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
    "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Softmax", "LogSoftmax", "Abs",
    "Pow", "Sqrt", "Exp", "Log", "Erf",
}  # fmt: skip
AFFINE = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub"}

_TORCH = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def torch_dtype(dtype: ir.DataType | None) -> torch.dtype | None:
    return _TORCH.get(dtype) if dtype is not None else None


def attr(node: ir.Node, name: str, default: object = None) -> object:
    a = node.attributes.get(name)
    return default if a is None else a.value


def as_tensor(t: ir.TensorProtocol) -> torch.Tensor:
    """An ONNX tensor as a torch tensor of its own dtype (bfloat16 through float32), a copy: a
    weight mapped from external data is unmapped once copied, so reading every weight of a model
    of several GB one after the other never keeps more than one of them resident."""
    if t.dtype == ir.DataType.BFLOAT16:
        out = torch.from_numpy(np.array(t.numpy(), dtype=np.float32)).to(torch.bfloat16)
    else:
        out = torch.from_numpy(np.array(t.numpy()))
    if isinstance(t, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still held elsewhere: stays mapped
            t.release()
    return out


def to_ir_tensor(value: torch.Tensor, name: str) -> ir.TensorProtocol:
    if value.dtype == torch.bfloat16:
        return ir.tensor(value.float().numpy(), dtype=ir.DataType.BFLOAT16, name=name)
    return ir.tensor(value.detach().cpu().contiguous().numpy(), name=name)


def _axes(node: ir.Node, operands: Sequence[torch.Tensor | None], index: int) -> list[int] | None:
    """An op's ``axes``: the attribute (older opsets) or the constant operand ``index`` (newer)."""
    axes = attr(node, "axes")
    if axes is None and len(operands) > index and operands[index] is not None:
        axes = operands[index].long().tolist()
    return None if axes is None else [int(a) for a in axes]


def from_constants(graph: ir.Graph) -> set[ir.Value]:
    """The values of ``graph`` computed from initializers and Constant nodes alone (no graph input
    upstream), found from the structure without reading a weight: a value outside this set is
    never evaluated, so its weights are not read (a model's weights may be gigabytes, mapped from
    its external data)."""
    found = {v for v in graph.initializers.values() if v.const_value is not None and not v.is_graph_input()}
    for node in graph:  # topological order
        if all(v is None or v in found for v in read_inputs(node)):
            found.update(node.outputs)
    return found


def read_inputs(node: ir.Node) -> Sequence[ir.Value | None]:
    """The inputs whose values ``node`` reads (a CastLike reads only the type of its second)."""
    return node.inputs[:1] if node.op_type == "CastLike" else node.inputs


def evaluate(node: ir.Node, operands: list[torch.Tensor | None]) -> torch.Tensor | None:
    """A node's output from constant operands (float64 for floating values), None if not known."""
    op = node.op_type
    if op == "Constant":
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            a = node.attributes.get(key)
            if a is not None:
                v = as_tensor(a.value) if key == "value" else torch.tensor(a.value)
                return v.double() if v.is_floating_point() else v
        return None
    if node.domain not in ("", "ai.onnx") or any(o is None for o in operands) or not operands:
        return None
    x = operands[0]
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
    unary = {"Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Identity": torch.clone}
    if op in binary and len(operands) == 2:
        if x.is_floating_point() != operands[1].is_floating_point():
            return None
        return binary[op](x, operands[1]) if x.is_floating_point() or op != "Div" else None
    if op in unary:
        return unary[op](x) if x.is_floating_point() or op == "Identity" else None
    if op == "Cast":
        to = torch_dtype(ir.DataType(attr(node, "to")))
        if to is None:
            return None
        return x.double() if to.is_floating_point and x.is_floating_point() else x.to(to)
    if op == "Reshape" and len(operands) == 2:
        shape = [int(d) for d in operands[1].tolist()]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "Shape":  # of a constant: its stored shape
        dims = list(x.shape)[int(attr(node, "start", 0)) : attr(node, "end", None)]
        return torch.tensor(dims, dtype=torch.int64)
    if op == "Expand" and len(operands) == 2:
        shape = torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in operands[1].tolist()))
        return torch.broadcast_to(x, shape).clone()
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node, operands, 1)
        if op == "Squeeze":
            return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))
        if axes is None:
            return None
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x
    return None


def _spatially_constant(ids: torch.Tensor) -> bool:
    flat = ids.flatten(2)
    return bool((flat == flat[..., :1]).all())


def step_ids(
    node: ir.Node,
    operand_ids: Callable[[int], torch.Tensor | None],
    ids: torch.Tensor,
    out_shape: tuple[int, ...],
    constant: Callable[[int], torch.Tensor | None],
) -> torch.Tensor:
    """``node`` run on channel ids (``ids``: those of its first operand; ``operand_ids(i)``: the
    ids of operand ``i`` for a merge, ``-1`` where not ours; ``constant(i)``: operand ``i``'s value).
    A result no layer channel can be read from holds ``0.5`` (not an id: ``channel_mixing``)."""
    op = node.op_type
    mixed = torch.full(out_shape, 0.5, dtype=torch.float64)
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return ids.reshape(out_shape)
    if op in ("Identity", "Dropout", "Cast"):
        return ids.clone()
    if op == "Transpose":
        perm = attr(node, "perm") or list(range(ids.dim()))[::-1]
        return ids.permute(*[int(p) for p in perm]).contiguous()
    if op == "Slice":
        starts, ends = constant(1), constant(2)
        axes, steps = constant(3), constant(4)
        if starts is None or ends is None:
            return mixed
        index: list[slice] = [slice(None)] * ids.dim()
        for k, a in enumerate(axes.long().tolist() if axes is not None else range(len(starts))):
            step = int(steps[k]) if steps is not None else 1
            index[a % ids.dim()] = slice(int(starts[k]), int(ends[k]), step)
        out = torch.from_numpy(np.ascontiguousarray(ids.numpy()[tuple(index)]))
        return out if tuple(out.shape) == out_shape else mixed
    if op in POOLS:  # a window mixes positions: exact only where each channel is one id everywhere
        if not _spatially_constant(ids):
            return mixed
        first = ids.flatten(2)[..., :1].reshape(*ids.shape[:2], *[1] * (len(out_shape) - 2))
        return first.expand(out_shape).clone()
    if op in REDUCTIONS:  # the reduced axes hold one id each (checked before this runs)
        axes = _axes(node, [None, constant(1)], 1)
        dims = sorted({a % ids.dim() for a in (axes if axes else range(ids.dim()))})
        for d in dims:
            ids = ids.narrow(d, 0, 1)
        return ids.reshape(out_shape)
    if op == "Concat":
        axis = int(attr(node, "axis", 0))
        return torch.cat([operand_ids(i) for i in range(len(node.inputs))], dim=axis % len(out_shape))
    if op == "Add":
        return ids.expand(out_shape).clone()
    return mixed
