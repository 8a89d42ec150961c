"""The pattern tables: which ATen ops are layers, norms, and ops a per-channel affine map commutes with.

Everything here is a plain table read by :mod:`normfold.engine.plan`; a rule reads its op's arguments by
schema name (:func:`normfold.engine.capture.bind`) and a check returns the reason it does not hold, never a
bare ``False``.

Why each "through" op is exact for ``y = s * x + t`` (``s``, ``t`` per channel ``c``):

* layout ops (view, reshape, flatten, permute, transpose, (un)squeeze, slice, select, expand,
  clone, contiguous, dtype-preserving casts, eval-mode dropout, non-zero padding modes,
  nearest upsampling) only move or copy elements, so ``op(s*x+t) = s'*op(x)+t'`` with ``s'``,
  ``t'`` the same values at the moved channel positions; the planner tracks where the channel
  axis goes by running the op on a tensor of channel ids.
* averages (avg pooling without counted zero padding, adaptive avg pooling, mean over
  non-channel axes) average ``n`` values of one channel: ``sum(s*x_i+t)/n = s*mean(x)+t``.
  Zero padding counted in the divisor would give ``s*mean+t*n_real/n``: refused.
* maxima (max pooling, ``amax``) commute only with increasing maps: ``max(s*x+t) = s*max(x)+t``
  needs ``s > 0`` on every channel (checked per fold).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from normfold.engine.capture import bind, tensor_meta
from normfold.engine.view import LayerRef as Layer

aten = torch.ops.aten


# --- layers ---------------------------------------------------------------------------------------


def _padded(padding: Any, weight: fx.Node) -> bool:
    if isinstance(padding, str):
        if padding == "valid":
            return False
        kernel = tuple(tensor_meta(weight).shape[2:])  # "same": zero padding unless the kernel is 1
        return any(k != 1 for k in kernel)
    return any(int(p) != 0 for p in padding)


def _read_conv(node: fx.Node, kind: str) -> Layer | None:
    args = bind(node)
    if kind == "convolution" and args["transposed"]:
        kind = "conv_transpose"
    elif kind == "convolution":
        kind = "conv"
    weight, bias = args["weight"], args["bias"]
    if not isinstance(weight, fx.Node) or not isinstance(args["input"], fx.Node):
        return None
    meta = tensor_meta(weight)
    if meta is None:
        return None
    padded = _padded(args["padding"], weight) if kind == "conv" else True
    return Layer(node, kind, args["input"], weight, bias, int(args["groups"]), meta.dim() - 2, padded)


def _read_linear(node: fx.Node) -> Layer | None:
    args = bind(node)
    weight = args["weight"]
    if not isinstance(weight, fx.Node) or not isinstance(args["input"], fx.Node):
        return None
    return Layer(node, "linear", args["input"], weight, args["bias"], 1, 0, False)


def _matrix(node: Any) -> tuple[fx.Node, bool, fx.Node | None] | None:
    """``(weight placeholder, in_out, via)`` for a matmul's right operand ``W`` or ``t(W)``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        return node, True, None
    source = node.args[0] if node.args else None
    flips = (
        node.target is aten.t.default
        or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])
        or (node.target is aten.transpose.int and sorted(int(a) % 2 for a in node.args[1:]) == [0, 1])
    )
    if (
        flips
        and isinstance(source, fx.Node)
        and source.op == "placeholder"
        and tensor_meta(source).dim() == 2
    ):
        return source, False, node
    return None


def _read_addmm(node: fx.Node) -> Layer | None:
    args = bind(node)
    found = _matrix(args["mat2"])
    if found is None or not isinstance(args["mat1"], fx.Node) or args["beta"] != 1 or args["alpha"] != 1:
        return None
    weight, in_out, via = found
    return Layer(node, "linear", args["mat1"], weight, args["self"], 1, 0, False, in_out, via)


def _read_matmul_add(node: fx.Node) -> Layer | None:
    """``x @ W + b``: the add is the layer's output, ``b`` a 1-d bias parameter."""
    args = bind(node)
    mm, bias = args["self"], args["other"]
    if isinstance(bias, fx.Node) and isinstance(mm, fx.Node) and mm.target not in _MATMULS:
        mm, bias = bias, mm
    if not isinstance(mm, fx.Node) or mm.target not in _MATMULS or args["alpha"] != 1:
        return None
    if not isinstance(bias, fx.Node) or bias.op != "placeholder" or tensor_meta(bias).dim() != 1:
        return None
    x, found = mm.args[0], _matrix(mm.args[1])
    if found is None or not isinstance(x, fx.Node) or len(mm.users) != 1:
        return None
    weight, in_out, via = found
    return Layer(node, "linear", x, weight, bias, 1, 0, False, in_out, via, mm)


def _read_matmul(node: fx.Node) -> Layer | None:
    """A bare ``x @ W`` (``W`` a 2-d placeholder, or its transpose): a Linear without bias. A
    matmul that is the inner op of an ``x @ W + b`` layer is read through its add instead
    (:func:`layer_reading`), so a fold never sees the add's bias as missing."""
    x, found = (node.args[0], _matrix(node.args[1])) if len(node.args) == 2 else (None, None)
    if found is None or not isinstance(x, fx.Node) or tensor_meta(x) is None or tensor_meta(x).dim() < 1:
        return None
    weight, in_out, via = found
    if tensor_meta(weight) is None or tensor_meta(weight).dim() != 2:
        return None
    return Layer(node, "linear", x, weight, None, 1, 0, False, in_out, via)


_MATMULS = {aten.matmul.default, aten.mm.default}

LAYERS: dict[Any, Callable[[fx.Node], Layer | None]] = {
    aten.addmm.default: _read_addmm,
    aten.add.Tensor: _read_matmul_add,
    aten.conv1d.default: lambda n: _read_conv(n, "conv"),
    aten.conv2d.default: lambda n: _read_conv(n, "conv"),
    aten.conv3d.default: lambda n: _read_conv(n, "conv"),
    aten.conv1d.padding: lambda n: _read_conv(n, "conv"),
    aten.conv2d.padding: lambda n: _read_conv(n, "conv"),
    aten.conv3d.padding: lambda n: _read_conv(n, "conv"),
    aten.conv_transpose1d.default: lambda n: _read_conv(n, "conv_transpose"),
    aten.conv_transpose2d.input: lambda n: _read_conv(n, "conv_transpose"),
    aten.conv_transpose3d.input: lambda n: _read_conv(n, "conv_transpose"),
    aten.convolution.default: lambda n: _read_conv(n, "convolution"),
    aten.linear.default: _read_linear,
    aten.matmul.default: _read_matmul,
    aten.mm.default: _read_matmul,
}


def read_layer(node: fx.Node) -> Layer | None:
    reader = LAYERS.get(node.target) if node.op == "call_function" else None
    return reader(node) if reader is not None else None


def layer_reading(node: fx.Node) -> Layer | None:
    """The layer whose data input ``node`` is the first op of (a matmul inside ``x @ W + b`` too)."""
    if node.op == "call_function" and node.target in _MATMULS and len(node.users) == 1:
        layer = read_layer(next(iter(node.users)))
        if layer is not None and layer.inner is node:
            return layer
    return read_layer(node)


# --- ops a per-channel affine map passes through -------------------------------------------------


@dataclass(frozen=True)
class Through:
    """An op that commutes with a per-channel affine map. ``kind``: layout, mean or max."""

    name: str
    kind: str
    check: Callable[[dict[str, Any]], str | None] = lambda args: None


def _eval_dropout(args: dict[str, Any]) -> str | None:
    return None if not args.get("train") else "dropout runs in training mode"


def _avg_pool(args: dict[str, Any]) -> str | None:
    if args.get("divisor_override") is not None:
        return "avg pooling with divisor_override does not average"
    if any(int(p) != 0 for p in args.get("padding") or ()) and args.get("count_include_pad", True):
        return "avg pooling counts zero padding in its divisor, which scales the norm's shift at borders"
    return None


def _pad(args: dict[str, Any]) -> str | None:
    mode = args.get("mode", "constant")
    return "constant padding inserts values the norm never saw" if mode == "constant" else None


_LAYOUT = [
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.expand.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.type_as.default, aten.movedim.int, aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec,
    aten.upsample_nearest3d.vec, aten.pixel_shuffle.default, aten.channel_shuffle.default,
    aten.reshape_as.default, aten.view_as.default, aten.expand_as.default, aten.repeat.default,
]  # fmt: skip
_MEAN = [
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
    aten.mean.dim,
]  # fmt: skip
_MAX = [
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.amax.default,
]  # fmt: skip

THROUGH: dict[Any, Through] = {
    **{op: Through(str(op.overloadpacket.__name__), "layout") for op in _LAYOUT},
    **{op: Through(str(op.overloadpacket.__name__), "mean") for op in _MEAN},
    **{op: Through(str(op.overloadpacket.__name__), "max") for op in _MAX},
    aten.dropout.default: Through("dropout", "layout", _eval_dropout),
    aten.feature_dropout.default: Through("feature_dropout", "layout", _eval_dropout),
    aten.alpha_dropout.default: Through("alpha_dropout", "layout", _eval_dropout),
    aten.avg_pool1d.default: Through("avg_pool1d", "mean", _avg_pool),
    aten.avg_pool2d.default: Through("avg_pool2d", "mean", _avg_pool),
    aten.avg_pool3d.default: Through("avg_pool3d", "mean", _avg_pool),
    aten.pad.default: Through("pad", "layout", _pad),
}

#: ops that read only the shape of an argument (by argument name): such a use does not count as a user
SHAPE_ONLY: dict[Any, tuple[str, ...]] = {
    aten.reshape_as.default: ("other",),
    aten.view_as.default: ("other",),
    aten.expand_as.default: ("other",),
    aten.sym_size.int: ("self",),
    aten.sym_numel.default: ("self",),
    aten.sym_stride.int: ("self",),
    aten.sym_storage_offset.default: ("self",),
    aten._assert_tensor_metadata.default: ("a",),  # export's dtype/device check on .to()
    aten.type_as.default: ("other",),  # only its dtype: ``probs.type_as(hidden)`` reads no value
    **{op: ("self",) for op in (aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                                aten.full_like.default)},  # a new tensor of the same shape and dtype
}

#: reductions: exact only when every reduced element belongs to one channel (checked on channel ids)
REDUCTIONS = {aten.mean.dim, aten.amax.default}

#: merges of several producer outputs: a norm after them splits (cat) or scales all (add)
MERGES = {aten.cat.default: "concat", aten.add.Tensor: "add"}


_COPY = Through("cat", "layout")


def through_of(node: fx.Node) -> Through | None:
    """The :data:`THROUGH` rule of ``node``; a concat of a single tensor is a copy."""
    if node.op != "call_function":
        return None
    if node.target is aten.cat.default and len(node.args[0]) == 1:
        return _COPY
    return THROUGH.get(node.target)


def through_input(node: fx.Node) -> fx.Node | None:
    """The tensor an op from :data:`THROUGH` passes the map along (its first tensor argument)."""
    first = node.args[0] if node.args else None
    if isinstance(first, (list, tuple)) and len(first) == 1:
        first = first[0]
    return first if isinstance(first, fx.Node) else None


# --- norms and the ops around them ----------------------------------------------------------------

BATCH_NORMS = {aten.batch_norm.default}

#: elementwise ops with a constant operand: ``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x``
AFFINE_OPS = {
    aten.mul.Tensor: "mul",
    aten.mul.Scalar: "mul",
    aten.div.Tensor: "div",
    aten.div.Scalar: "div",
    aten.add.Tensor: "add",
    aten.add.Scalar: "add",
    aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub",
    aten.rsub.Scalar: "rsub",
    aten.rsub.Tensor: "rsub",
}

#: ops that make a fold "after an activation" (the reason users see most)
ACTIVATIONS = {
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "tanh", "mish", "softplus", "clamp", "clamp_min", "clamp_max", "prelu",
    "relu_", "silu_", "hardswish_", "softmax", "_softmax", "log_softmax", "abs", "square", "pow",
}  # fmt: skip
