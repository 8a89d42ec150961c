"""OnnxView: what the rules see of an ONNX graph (layers, norms, affine steps, through ops, ids)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_rows as rows
import pytest
import torch

import normfold
from normfold.engine.onnx_shapes import concrete_shapes
from normfold.engine.onnx_view import OUTPUT, OnnxView
from normfold.onnx_fold import _example_inputs


def _view(model: onnx.ModelProto) -> OnnxView:
    feeds = _example_inputs(model, None, None)
    shapes, types = concrete_shapes(model, {k: tuple(v.shape) for k, v in feeds.items()})
    return OnnxView(ir.serde.deserialize_model(model), shapes, types)


def _node(view: OnnxView, output: str) -> ir.Node:
    return view.by_name[output]


def test_layers_and_their_weights() -> None:
    b = rows.Builder(50)
    c3 = b.conv("x", 3, 8, "c3")
    c1 = b.conv(c3, 8, 8, "c1", k=1)
    up = b.node("ConvTranspose", [c1, b.weight("up.w", (8, 4, 2, 2))], "up", strides=[2, 2])
    pool = b.node("GlobalAveragePool", [up], "gap")
    flat = b.node("Flatten", [pool], "flat")
    g0 = b.node("Gemm", [flat, b.weight("g0.w", (4, 6))], "g0")  # (in, out)
    g1 = b.node(
        "Gemm", [g0, b.weight("g1.w", (5, 6)), b.init("g1.c", b.rng.normal(0, 1, (2, 5)))], "g1", transB=1
    )
    mm = b.node("MatMul", [g1, b.weight("mm.w", (5, 3))], "mm")
    b.node("Add", [mm, b.init("mm.b", b.rng.normal(0, 1, 3))], "y")
    view = _view(b.model([("x", [2, 3, 8, 8])], [("y", [2, 3])]))
    conv3, conv1 = view.layer(_node(view, "c3")), view.layer(_node(view, "c1"))
    assert (conv3.kind, conv3.zero_padding, conv1.zero_padding, conv3.kernel_dims) == ("conv", True, False, 2)
    assert view.state_name(conv3.weight) == "c3.weight" and view.state_name(conv3.bias) == "c3.bias"
    t = view.layer(_node(view, "up"))
    assert (t.kind, t.transposed, t.bias) == ("conv_transpose", True, None)
    g0_layer = view.layer(_node(view, "g0"))
    assert (g0_layer.kind, g0_layer.in_out, g0_layer.bias) == ("linear", True, None)
    assert view.layer(_node(view, "g1")) is None  # C varies along the batch axis: no per-output bias
    fused = view.layer(_node(view, "y"))
    assert fused.inner is _node(view, "mm") and view.state_name(fused.bias) == "mm.b"
    assert view.layer_reading(_node(view, "mm")) == fused
    assert view.affine_step(_node(view, "y")) is None  # a layer's bias add is no norm
    assert view.through(_node(view, "gap")).kind == "mean"
    assert view.users(_node(view, "y")) == [OUTPUT]


def test_batch_norm_modes_by_opset() -> None:
    def one(opset: int, outputs: int = 1, **attrs: object) -> OnnxView:
        b = rows.Builder(51)
        b.bn(b.conv("x", 3, 4, "c"), 4, "bn", **attrs)
        b.nodes[-1].output.extend([f"bn_o{i}" for i in range(1, outputs)])
        b.node("Relu", ["bn"], "y")
        return _view(b.model([("x", [2, 3, 8, 8])], [("y", [2, 4, 8, 8])], opset=opset))

    for view, training in (
        (one(9), False),
        (one(9, 5), True),
        (one(15), False),
        (one(15, 3, training_mode=1), True),
    ):
        bn = view.batch_norm(view.by_name["bn"])
        assert (bn.training, bn.eps) == (training, pytest.approx(1e-5))
        assert view.state_name(bn.running_var) == "bn.running_var"
    assert one(7, spatial=0).batch_norm(one(7, spatial=0).by_name["bn"]) is None  # per element, no map


def test_affine_steps_and_constants_computed_in_the_graph() -> None:
    b = rows.Builder(52)
    c = b.conv("x", 3, 4, "c")
    var_eps = b.node("Add", [b.init("var", b.rng.uniform(0.3, 2, (1, 4, 1, 1))), b.init("eps", [1e-3])], "ve")
    std = b.node("Sqrt", [var_eps], "std")
    sub = b.node("Sub", [b.init("k", [2.0]), c], "rsub")  # k - x
    div = b.node("Div", [sub, std], "div")
    b.node("Div", [b.init("one", [1.0]), div], "y")  # c / x: no affine step
    view = _view(b.model([("x", [2, 3, 8, 8])], [("y", [2, 4, 8, 8])]))
    step = view.affine_step(_node(view, "rsub"))
    assert step.op == "rsub" and step.input is _node(view, "c")
    div_step = view.affine_step(_node(view, "div"))
    expected = torch.sqrt(view.constant(view.by_name["var"]) + view.constant(view.by_name["eps"]))
    assert div_step.op == "div" and torch.allclose(div_step.constant, expected, rtol=0, atol=1e-12)
    assert div_step.constant.dtype == torch.float64
    assert view.affine_step(_node(view, "y")) is None
    assert view.is_constant(_node(view, "std")) and not view.is_constant(_node(view, "div"))


def test_channel_ids_through_layout_ops() -> None:
    b = rows.Builder(53)
    c = b.conv("x", 3, 4, "c")
    tr = b.node("Transpose", [c], "tr", perm=[0, 2, 3, 1])
    b.node("Reshape", [tr, b.init_i64("shape", [-1, 4])], "y")
    view = _view(b.model([("x", [2, 3, 5, 5])], [("y", [50, 4])]))
    ids = torch.arange(4, dtype=torch.float64).reshape(1, 4, 1, 1).expand(2, 4, 5, 5).clone()
    tr_node, y_node = _node(view, "tr"), _node(view, "y")
    moved = view.step_ids(tr_node, _node(view, "c"), ids, lambda n: n)
    out = view.step_ids(y_node, tr_node, moved, lambda n: n)
    assert out.shape == (50, 4) and bool((out == torch.arange(4.0)).all())


def test_avg_pool_counting_padding_is_refused() -> None:
    b = rows.Builder(54)
    pool = b.node("AveragePool", [b.conv("x", 3, 4, "c")], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                  count_include_pad=1)  # fmt: skip
    b.bn(pool, 4, "y")
    model = b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])])
    assert "counts zero padding" in _view(model).through(_view(model).by_name["pool"]).refused
    (kept,) = normfold.fold_onnx(model).skipped
    assert kept.code == "not_commuting"


def test_decomposed_batch_norm_with_computed_statistics_folds() -> None:
    """tf2onnx-style: (x - mean) / sqrt(var + eps) * gamma + beta, the sqrt computed in the graph."""
    b = rows.Builder(55)
    c = b.conv("x", 3, 8, "conv")
    var = b.init("var", b.rng.uniform(0.3, 2, (8, 1, 1)))
    std = b.node("Sqrt", [b.node("Add", [var, b.init("eps", [1e-3])], "ve")], "std")
    centered = b.node("Sub", [c, b.init("mean", b.rng.normal(0, 0.5, (8, 1, 1)))], "centered")
    normed = b.node("Div", [centered, std], "normed")
    scaled = b.node("Mul", [normed, b.init("gamma", b.rng.uniform(0.5, 1.5, (8, 1, 1)))], "scaled")
    b.node("Relu", [b.node("Add", [scaled, b.init("beta", b.rng.normal(0, 0.3, (8, 1, 1)))], "shifted")], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])]))
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    assert [f.pattern for f in result.folded] == ["conv-affine"]
    assert {i.name for i in result.model.graph.initializer} == {"conv.weight", "conv.bias"}
    assert result.parity.passed and result.parity.notes == ()


def test_conv_auto_pad_and_gemm_transposed_input() -> None:
    b = rows.Builder(56)
    same = b.node("Conv", ["x", b.weight("same.w", (4, 3, 3, 3))], "same", auto_pad="SAME_UPPER")
    valid = b.node("Conv", [same, b.weight("valid.w", (4, 4, 3, 3))], "valid", auto_pad="VALID")
    one = b.node("Conv", [valid, b.weight("one.w", (4, 4, 1, 1))], "one", auto_pad="SAME_LOWER")
    flat = b.node("Flatten", [one], "flat", axis=2)  # (N * 4, 36)
    b.node("Gemm", [flat, b.weight("g.w", (4, 5))], "y", transA=1)  # (36, 4) @ (4, 5)
    view = _view(b.model([("x", [1, 3, 8, 8])], [("y", [36, 5])]))
    padded = {n: view.layer(_node(view, n)).zero_padding for n in ("same", "valid", "one")}
    assert padded == {"same": True, "valid": False, "one": False}
    gemm = _node(view, "y")
    assert view.layer(gemm) is not None  # its output's channels are its columns: a backward fold is fine
    assert view.layer_reading(gemm) is None  # its input is read transposed: no forward fold into it
