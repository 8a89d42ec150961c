"""The ONNX patterns of issue 21's table, built with ``onnx.helper`` at opset 17 (realistic BN
statistics: gamma in 0.5..1.5, beta ~ N(0, 0.3), mean ~ N(0, 0.5), var in 0.3..2).

``ROWS``: name -> builder of the 16 exactly foldable patterns; ``REFUSALS``: name -> (builder,
code) of the three that must stay. Each builder returns a checked ``ModelProto``; :func:`repvgg_block`
builds a block of parallel branches for the merges (``normfold.engine.onnx_merge``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

F = TensorProto.FLOAT


class Builder:
    """Nodes and initializers of one graph, with seeded realistic values."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(nh.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) or 1
        return self.init(name, self.rng.normal(0, 1 / np.sqrt(fan_in), shape))

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(h.make_node(op, inputs, [output], name=f"{output}_{op.lower()}", **attrs))
        return output

    def bn(
        self, x: str, c: int, out: str, *, gamma: tuple[float, float] = (0.5, 1.5), **attrs: object
    ) -> str:
        p = out
        stats = [
            self.init(f"{p}.weight", self.rng.uniform(*gamma, c)),
            self.init(f"{p}.bias", self.rng.normal(0, 0.3, c)),
            self.init(f"{p}.running_mean", self.rng.normal(0, 0.5, c)),
            self.init(f"{p}.running_var", self.rng.uniform(0.3, 2.0, c)),
        ]
        return self.node("BatchNormalization", [x, *stats], out, epsilon=1e-5, **attrs)

    def conv(self, x: str, c_in: int, c_out: int, out: str, k: int = 3, *, group: int = 1, dims: int = 2,
             weight: str | None = None, **attrs: object) -> str:  # fmt: skip
        w = weight or self.weight(f"{out}.weight", (c_out, c_in // group, *[k] * dims))
        b = self.init(f"{out}.bias", self.rng.normal(0, 0.1, c_out))
        pads = attrs.pop("pads", [k // 2] * (2 * dims))
        return self.node("Conv", [x, w, b], out, group=group, pads=pads, **attrs)

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], opset: int = 17):
        graph = h.make_graph(
            self.nodes, "g", [h.make_tensor_value_info(n, F, s) for n, s in inputs],
            [h.make_tensor_value_info(n, F, s) for n, s in outputs], self.inits,
        )  # fmt: skip
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="normfold-tests")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def conv_bn_relu() -> onnx.ModelProto:
    b = Builder(1)
    b.node("Relu", [b.bn(b.conv("x", 3, 8, "conv"), 8, "bn")], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])])


def conv_bn_output() -> onnx.ModelProto:
    b = Builder(2)
    b.bn(b.conv("x", 3, 8, "conv"), 8, "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])])


def depthwise_conv_bn() -> onnx.ModelProto:
    b = Builder(3)
    b.node("Relu", [b.bn(b.conv("x", 6, 6, "dw", group=6), 6, "bn")], "y")
    return b.model([("x", ["N", 6, 8, 8])], [("y", ["N", 6, 8, 8])])


def conv1d_bn() -> onnx.ModelProto:
    b = Builder(4)
    b.bn(b.conv("x", 4, 8, "conv", dims=1), 8, "y")
    return b.model([("x", ["N", 4, 16])], [("y", ["N", 8, 16])])


def _conv_transpose_bn(groups: int, seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    w = b.weight("up.weight", (4, 6 // groups, 2, 2))
    up = b.node("ConvTranspose", ["x", w], "up", strides=[2, 2], group=groups)
    b.bn(up, 6, "y")
    return b.model([("x", ["N", 4, 5, 5])], [("y", ["N", 6, 10, 10])])


def conv_transpose_bn() -> onnx.ModelProto:
    return _conv_transpose_bn(1, 5)


def conv_transpose_groups_bn() -> onnx.ModelProto:
    return _conv_transpose_bn(2, 6)


def gemm_bn() -> onnx.ModelProto:
    b = Builder(7)
    g = b.node("Gemm", ["x", b.weight("fc.weight", (10, 12)), b.init("fc.bias", b.rng.normal(0, 0.1, 10))],
               "fc", transB=1)  # fmt: skip
    b.bn(g, 10, "y")
    return b.model([("x", ["N", 12])], [("y", ["N", 10])])


def matmul_bn() -> onnx.ModelProto:
    b = Builder(8)
    b.bn(b.node("MatMul", ["x", b.weight("proj", (12, 10))], "mm"), 10, "y")
    return b.model([("x", ["N", 12])], [("y", ["N", 10])])


def conv_mul_add() -> onnx.ModelProto:
    b = Builder(9)
    c = b.conv("x", 3, 8, "conv")
    m = b.node("Mul", [c, b.init("scale", b.rng.uniform(0.5, 1.5, (1, 8, 1, 1)))], "scaled")
    b.node("Add", [m, b.init("shift", b.rng.normal(0, 0.3, (1, 8, 1, 1)))], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])])


def shared_weight_convs() -> onnx.ModelProto:
    b = Builder(10)
    w = b.weight("shared.weight", (8, 3, 3, 3))
    y1 = b.bn(b.conv("x", 3, 8, "conv1", weight=w), 8, "bn1")
    y2 = b.bn(b.conv("x", 3, 8, "conv2", weight=w), 8, "bn2")
    b.node("Add", [y1, y2], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])])


def levit_matmul_reshape_bn() -> onnx.ModelProto:
    b = Builder(11)
    mm = b.node("MatMul", ["x", b.weight("qkv", (16, 12))], "mm")
    flat = b.node("Reshape", [mm, b.init_i64("flat_shape", [-1, 12])], "flat")
    bn = b.bn(flat, 12, "bn")
    b.node("Reshape", [bn, b.init_i64("back_shape", [-1, 5, 12])], "y")
    return b.model([("x", [2, 5, 16])], [("y", [2, 5, 12])])


def conv_flatten_bn1d() -> onnx.ModelProto:
    b = Builder(12)
    c = b.conv("x", 4, 8, "conv", k=4, pads=[0, 0, 0, 0])  # 4x4 input, 4x4 kernel: 1x1 output
    b.bn(b.node("Flatten", [c], "flat"), 8, "y")
    return b.model([("x", ["N", 4, 4, 4])], [("y", ["N", 8])])


def conv_maxpool_bn() -> onnx.ModelProto:
    b = Builder(13)
    pool = b.node("MaxPool", [b.conv("x", 3, 8, "conv")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b.bn(pool, 8, "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 4, 4])])


def concat_bn() -> onnx.ModelProto:
    b = Builder(14)
    cat = b.node("Concat", [b.conv("x", 3, 4, "conv1"), b.conv("x", 3, 6, "conv2")], "cat", axis=1)
    b.node("Relu", [b.bn(cat, 10, "bn")], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 10, 8, 8])])


def bn_conv1x1() -> onnx.ModelProto:
    b = Builder(15)
    b.conv(b.bn("x", 6, "bn"), 6, 8, "y", k=1)
    return b.model([("x", ["N", 6, 8, 8])], [("y", ["N", 8, 8, 8])])


def bn_gemm() -> onnx.ModelProto:
    b = Builder(16)
    bn = b.bn("x", 12, "bn")
    b.node("Gemm", [bn, b.weight("fc.weight", (10, 12)), b.init("fc.bias", b.rng.normal(0, 0.1, 10))], "y",
           transB=1)  # fmt: skip
    return b.model([("x", ["N", 12])], [("y", ["N", 10])])


def bn_conv3x3_padded() -> onnx.ModelProto:
    b = Builder(17)
    b.conv(b.bn("x", 6, "bn"), 6, 8, "y", k=3)
    return b.model([("x", ["N", 6, 8, 8])], [("y", ["N", 8, 8, 8])])


def conv_bn_residual() -> onnx.ModelProto:
    b = Builder(18)
    c = b.conv("x", 4, 4, "conv")
    b.node("Add", [b.bn(c, 4, "bn"), c], "y")
    return b.model([("x", ["N", 4, 8, 8])], [("y", ["N", 4, 8, 8])])


def input_bn_relu() -> onnx.ModelProto:
    b = Builder(19)
    b.node("Relu", [b.bn("x", 4, "bn")], "y")
    return b.model([("x", ["N", 4, 8, 8])], [("y", ["N", 4, 8, 8])])


def repvgg_block(
    seed: int = 70, *, identity: bool = True, k1: int = 1, pads1: list[int] | None = None
) -> onnx.ModelProto:
    """relu(bn_a(conv3x3(x)) + bn_b(conv k1 x k1(x)) [+ bn_id(x)]), 8 channels, as a RepVGG block."""
    b = Builder(seed)
    a = b.bn(b.conv("x", 8, 8, "conv_a", k=3), 8, "bn_a")
    c = b.bn(b.conv("x", 8, 8, "conv_b", k=k1, pads=pads1 or [0, 0, 0, 0]), 8, "bn_b")
    s = b.node("Add", [a, c], "sum_ab")
    if identity:
        s = b.node("Add", [s, b.bn("x", 8, "bn_id")], "sum")
    b.node("Relu", [s], "y")
    return b.model([("x", ["N", 8, 6, 6])], [("y", ["N", 8, 6, 6])])


def _init_i64(self: Builder, name: str, value: list[int]) -> str:
    self.inits.append(nh.from_array(np.asarray(value, dtype=np.int64), name))
    return name


Builder.init_i64 = _init_i64  # type: ignore[attr-defined]

ROWS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__: f
    for f in (
        conv_bn_relu, conv_bn_output, depthwise_conv_bn, conv1d_bn, conv_transpose_bn,
        conv_transpose_groups_bn, gemm_bn, matmul_bn, conv_mul_add, shared_weight_convs,
        levit_matmul_reshape_bn, conv_flatten_bn1d, conv_maxpool_bn, concat_bn, bn_conv1x1, bn_gemm,
    )
}  # fmt: skip
#: name -> (builder, the code it stays with, the start of its reason)
REFUSALS: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "bn_conv3x3_padded": (bn_conv3x3_padded, "zero_padding_forward"),
    "conv_bn_residual": (conv_bn_residual, "multiple_users"),
    "input_bn_relu": (input_bn_relu, "after_input"),
}
