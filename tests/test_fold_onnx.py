"""fold_onnx: the 16 foldable rows and 3 refusals of issue 21's table, BatchNormalization opsets,
train-mode BNs, Gemm's alpha/beta, shared weights, and parity against the original in onnxruntime."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_rows as rows
import pytest
import torch
from onnx import numpy_helper as nh

import normfold
from normfold.check.onnx_exact import exact_run
from normfold.check.parity_rule import ParityRule
from normfold.errors import UsageError
from normfold.onnx_fold import parity_onnx


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize("name", list(rows.ROWS))
def test_row_folds_with_parity_against_the_original(name: str) -> None:
    original = rows.ROWS[name]()
    result = normfold.fold_onnx(original)
    assert _count(result.model, "BatchNormalization") == 0
    if name == "conv_mul_add":
        assert _count(result.model, "Mul") == 0 and _count(result.model, "Add") == 0
    assert result.folded and not result.skipped
    assert result.parity.passed, result.parity.failures()
    assert result.parity.notes == ()  # measured against the float64 run of the original
    assert {o.inputs for o in result.parity.outputs} == {"normal", "uniform[0,255]"}
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    assert result.model.opset_import == original.opset_import
    assert result.model.producer_name == "normfold-tests"
    used = {i for n in result.model.graph.node for i in n.input}
    assert all(init.name in used for init in result.model.graph.initializer)  # unused ones removed


@pytest.mark.parametrize("name", list(rows.REFUSALS))
def test_refused_rows_stay_with_their_code(name: str) -> None:
    build, code = rows.REFUSALS[name]
    result = normfold.fold_onnx(build())
    assert _count(result.model, "BatchNormalization") == 1
    assert not result.folded
    (kept,) = result.skipped
    assert (kept.norm, kept.code) == ("bn", code)
    reasons = {
        "zero_padding_forward": "input of bn is model input x, not a Conv/ConvTranspose/Linear output; as a "
        "forward fold: bn feeds y_conv (Conv), whose zero padding would see 0 instead of the norm's shift "
        "at the borders",
        "multiple_users": "conv_conv (Conv) output has 2 users",
        "after_input": "input of bn is model input x, not a Conv/ConvTranspose/Linear output",
    }
    assert kept.reason == reasons[code]
    assert result.parity.passed


def _conv_bn(opset: int, **bn_attrs: object) -> onnx.ModelProto:
    b = rows.Builder(30 + opset)
    b.node("Relu", [b.bn(b.conv("x", 3, 8, "conv"), 8, "bn", **bn_attrs)], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], opset=opset)


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_batch_norm_opsets_fold_and_have_an_exact_reference(opset: int) -> None:
    original = _conv_bn(opset)
    feeds = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(opset))}
    exact, why = exact_run(original, feeds)
    assert why is None
    # the exact reference agrees with onnxruntime's float32 run of the original, BN included
    ort = _session(original).run(None, {"x": feeds["x"].numpy()})[0]
    assert np.abs(exact["y"].numpy() - ort).max() < 1e-4 * np.abs(ort).max()
    result = normfold.fold_onnx(original)
    assert _count(result.model, "BatchNormalization") == 0
    assert result.parity.passed and result.parity.notes == ()


def test_training_mode_batch_norm_is_kept_with_its_code() -> None:
    b = rows.Builder(45)
    b.bn(b.conv("x", 3, 8, "conv"), 8, "bn", training_mode=1)
    bn = b.nodes[-1]
    bn.output.extend(["bn_mean", "bn_var"])  # training_mode=1 outputs the updated statistics
    b.node("Relu", ["bn"], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], opset=15))
    assert _count(result.model, "BatchNormalization") == 1
    (kept,) = result.skipped
    assert (kept.code, kept.reason) == (
        "batch_statistics", "bn runs in training mode: it normalizes with batch statistics"
    )  # fmt: skip
    assert any("training mode" in n for n in result.parity.notes)  # no exact run of a train-mode BN


def test_a_wrong_fold_fails_parity_against_the_original() -> None:
    original = rows.conv_bn_relu()
    folded = normfold.fold_onnx(original).model
    wrong = copy.deepcopy(folded)
    bias = next(i for i in wrong.graph.initializer if i.name.endswith("bias"))
    value = nh.to_array(bias).copy()
    value[3] += 0.1  # one channel shifted by a tenth of a typical std
    bias.CopyFrom(nh.from_array(value, bias.name))
    feeds = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
    report = parity_onnx(original, wrong, feeds, ParityRule())
    assert not report.passed
    assert parity_onnx(original, folded, feeds, ParityRule()).passed


def test_gemm_alpha_beta_transposed_weight_and_row_bias() -> None:
    b = rows.Builder(40)
    w = b.weight("fc.weight", (12, 10))  # (in, out): transB=0
    c = b.init("fc.c", b.rng.normal(0, 0.1, (1, 10)))
    g = b.node("Gemm", ["x", w, c], "fc", alpha=0.5, beta=2.0)
    b.bn(g, 10, "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 12])], [("y", ["N", 10])]))
    assert _count(result.model, "BatchNormalization") == 0
    (gemm,) = result.model.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == 1.0 and attrs["beta"] == 1.0
    assert result.parity.passed and result.parity.notes == ()


def test_shared_weight_is_copied_only_for_the_conv_that_folds() -> None:
    b = rows.Builder(41)
    w = b.weight("shared.weight", (8, 3, 3, 3))
    y1 = b.bn(b.conv("x", 3, 8, "conv1", weight=w), 8, "bn1")
    y2 = b.node("Relu", [b.conv("x", 3, 8, "conv2", weight=w)], "relu")
    b.node("Add", [y1, y2], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])]))
    convs = {n.output[0]: n.input[1] for n in result.model.graph.node if n.op_type == "Conv"}
    assert convs["conv2"] == "shared.weight" and convs["conv1"] == "shared.weight__1"
    assert result.parity.passed


def test_flatten_of_a_spatial_map_is_not_one_channel_per_feature() -> None:
    b = rows.Builder(42)
    c = b.conv("x", 4, 3, "conv", k=3, pads=[0, 0, 0, 0])  # 4x4 -> 2x2: 12 features from 3 channels
    b.bn(b.node("Flatten", [c], "flat"), 12, "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 4, 4, 4])], [("y", ["N", 12])]))
    (kept,) = result.skipped
    assert kept.code == "channel_mixing"
    assert kept.reason.startswith("one channel of conv_conv (Conv) reaches several channels of y")


def test_negative_scale_does_not_cross_max_pooling() -> None:
    b = rows.Builder(43)
    pool = b.node("MaxPool", [b.conv("x", 3, 8, "conv")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b.bn(pool, 8, "y", gamma=(-1.5, -0.5))
    result = normfold.fold_onnx(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 4, 4])]))
    (kept,) = result.skipped
    assert kept.code == "negative_scale"
    assert kept.reason == "y has 8 non-positive scale(s), which pool_maxpool (MaxPool) does not commute with"


def test_written_by_the_file_rules(tmp_path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(rows.conv_bn_relu(), src)
    out = tmp_path / "folded.onnx"
    result = normfold.fold_onnx(src, out)
    assert result.out == out
    report = json.loads(json.dumps(result.to_dict()))
    assert report["folded"][0]["pattern"] == "conv-bn" and report["parity"]["passed"] is True
    assert report["ops_after"] == {"Conv": 1, "Relu": 1} and report["out"] == str(out)
    written = onnx.load(str(out))
    assert _count(written, "BatchNormalization") == 0
    with pytest.raises(UsageError, match="already exists"):
        normfold.fold_onnx(src, out)
    with pytest.raises(UsageError, match="input of this run"):
        normfold.fold_onnx(src, src, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx", "model.onnx"]


def test_float16_model_and_given_inputs() -> None:
    model = rows.conv_bn_relu()
    for init in model.graph.initializer:
        init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), init.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)).half()
    result = normfold.fold_onnx(model, inputs=[x])
    assert _count(result.model, "BatchNormalization") == 0
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in result.model.graph.initializer)
    assert [o.inputs for o in result.parity.outputs] == ["given", "normal", "uniform[0,255]"]
    assert {o.dtype for o in result.parity.outputs} == {"float16"}
    assert result.parity.passed and result.parity.notes == ()
    with pytest.raises(UsageError, match="the graph takes"):
        normfold.fold_onnx(model, inputs={"image": x})


def test_dynamo_style_graph_computed_bias_and_reshape_from_shape() -> None:
    """As torch.onnx's dynamo exporter writes with its optimizer off: a conv's zero bias computed
    as Expand(CastLike(0, x), Shape(W)[:1]), a flatten as Reshape(x, Concat(Shape(x)[:1], [-1]))."""
    b = rows.Builder(60)
    w = b.weight("conv.weight", (8, 3, 3, 3))
    b.nodes.append(onnx.helper.make_node("Shape", [w], ["w_out"], start=0, end=1))
    b.nodes.append(onnx.helper.make_node("Constant", [], ["zero"], value=nh.from_array(np.float32(0.0))))
    b.node("CastLike", ["zero", "x"], "zero_like")
    bias = b.node("Expand", ["zero_like", "w_out"], "conv_bias")
    relu = b.node("Relu", [b.bn(b.node("Conv", ["x", w, bias], "conv", pads=[1, 1, 1, 1]), 8, "bn")], "relu")
    gap = b.node("GlobalAveragePool", [relu], "gap")
    b.nodes.append(onnx.helper.make_node("Shape", ["x"], ["n"], start=0, end=1))
    b.nodes.append(onnx.helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]))
    b.node("Concat", ["n", "minus_one"], "flat_shape", axis=0)
    flat = b.node("Reshape", [gap, "flat_shape"], "flat")
    fc = b.node(
        "Gemm", [flat, b.weight("fc.weight", (10, 8)), b.init("fc.bias", np.zeros(10))], "fc", transB=1
    )
    b.bn(fc, 10, "y")
    original = b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 10])])
    result = normfold.fold_onnx(original)
    assert _count(result.model, "BatchNormalization") == 0
    assert [f.pattern for f in result.folded] == ["conv-bn", "linear-bn"]
    assert {"CastLike", "Expand"}.isdisjoint(n.op_type for n in result.model.graph.node)
    names = [i.name for i in result.model.graph.initializer]
    assert names.count("conv.weight") == 1 and not any("__" in n for n in names)  # Shape(W) is no share
    assert result.parity.passed and result.parity.notes == ()
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)  # another batch size
    got, want = _session(result.model).run(None, {"x": x})[0], _session(original).run(None, {"x": x})[0]
    assert got.shape == (5, 10) and np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_model_metadata_and_untouched_parts_are_kept() -> None:
    model = rows.conv_bn_relu()
    model.producer_version = "1.2.3"
    model.doc_string = "a model"
    onnx.helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    model.graph.value_info.append(
        onnx.helper.make_tensor_value_info("conv", onnx.TensorProto.FLOAT, ["N", 8, 8, 8])
    )
    result = normfold.fold_onnx(model)
    out = result.model
    assert (out.producer_name, out.producer_version, out.doc_string) == ("normfold-tests", "1.2.3", "a model")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone", "license": "MIT"}
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 1)}
    assert out.ir_version == model.ir_version
    assert _count(out, "BatchNormalization") == 0


def test_exact_reference_beyond_the_memory_limit_says_so() -> None:
    result = normfold.fold_onnx(rows.conv_bn_relu(), rule=ParityRule(exact_limit_bytes=100))
    assert result.parity.passed
    assert any("exceeds the rule's exact_limit_bytes" in n for n in result.parity.notes)
    assert all(o.noise != o.noise for o in result.parity.outputs)  # no noise measured: NaN, floor alone


def test_linear_on_tokens_through_a_transposed_weight() -> None:
    """LeViT as the TorchScript exporter writes it: MatMul(x, Transpose(W)) on (B, T, K), flattened
    to (B*T, N) for BatchNorm1d and back: the weight (out, in) keeps its name and layout."""
    b = rows.Builder(61)
    w = b.weight("qkv.linear.weight", (12, 16))
    mm = b.node("MatMul", ["x", b.node("Transpose", [w], "w_t", perm=[1, 0])], "mm")
    flat = b.node("Reshape", [mm, b.init_i64("flat_shape", [-1, 12])], "flat")
    b.node("Reshape", [b.bn(flat, 12, "bn"), b.init_i64("back_shape", [2, -1, 12])], "y")
    result = normfold.fold_onnx(b.model([("x", [2, 5, 16])], [("y", [2, 5, 12])]))
    assert _count(result.model, "BatchNormalization") == 0
    assert _count(result.model, "Transpose") == 1
    weight = next(i for i in result.model.graph.initializer if i.name == "qkv.linear.weight")
    assert tuple(weight.dims) == (12, 16)
    assert result.parity.passed and result.parity.notes == ()


def test_norms_inside_an_if_body_are_kept_with_a_code() -> None:
    def out(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 3, 4, 4])

    inner = rows.Builder(62)
    inner.bn("x", 3, "then_out")
    then = onnx.helper.make_graph(inner.nodes, "then", [], [out("then_out")], inner.inits)
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["else_out"])], "else", [], [out("else_out")]
    )
    cond = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    graph = onnx.helper.make_graph([node], "g", [cond, out("x")], [out("y")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    result = normfold.fold_onnx(model, inputs=[np.array(True), np.ones((2, 3, 4, 4), np.float32)])
    (kept,) = result.skipped  # kept with a code, so require_all / --require-all sees it
    assert (kept.norm, kept.code) == ("If_0.then_branch/then_out_batchnormalization", "in_subgraph")
    body, NOT_YET = "If_0.then_branch", "control-flow bodies are not folded yet"
    assert kept.reason == f"then_out_batchnormalization is inside the body {body}: {NOT_YET}"
    assert not result.folded and result.parity.passed


def test_statistics_fed_as_graph_inputs_are_kept_with_a_code() -> None:
    b = rows.Builder(64)
    c = b.conv("x", 3, 4, "conv")
    rng = b.rng
    stats = [b.init("bn.weight", rng.uniform(0.5, 1.5, 4)), b.init("bn.bias", rng.normal(0, 0.3, 4)), "mean",
             b.init("bn.running_var", rng.uniform(0.3, 2, 4))]  # fmt: skip
    b.node("BatchNormalization", [c, *stats], "y")
    model = b.model([("x", ["N", 3, 8, 8]), ("mean", [4])], [("y", ["N", 4, 8, 8])])
    result = normfold.fold_onnx(model, inputs={"x": torch.randn(2, 3, 8, 8), "mean": torch.randn(4)})
    (kept,) = result.skipped
    assert (kept.code, kept.reason) == (
        "not_constant",
        "y_batchnormalization running_mean is computed from the input, not a buffer",
    )
    assert _count(result.model, "BatchNormalization") == 1 and result.parity.passed


def test_plan_onnx_decides_as_fold_onnx_without_changing_anything() -> None:
    original = rows.conv_bn_residual()
    before = original.SerializeToString()
    planned = normfold.plan_onnx(original)
    assert original.SerializeToString() == before and planned.model is original
    assert planned.parity is None and planned.ops_after == {}
    folded = normfold.fold_onnx(rows.conv_bn_residual())
    assert [(s.norm, s.code, s.reason) for s in planned.skipped] == [
        (s.norm, s.code, s.reason) for s in folded.skipped
    ]
    assert normfold.plan_onnx(rows.conv_bn_relu()).folded == normfold.fold_onnx(rows.conv_bn_relu()).folded


def test_input_shapes_by_order_or_name_checked_against_the_graph() -> None:
    model = rows.conv_bn_relu()  # x: [N, 3, 8, 8]
    assert normfold.plan_onnx(model, input_shapes=[(5, 3, 8, 8)]).input_shapes == {"x": (5, 3, 8, 8)}
    assert normfold.plan_onnx(model, input_shapes={"x": (4, 3, 8, 8)}).input_shapes == {"x": (4, 3, 8, 8)}
    with pytest.raises(UsageError, match=r"^input_shapes= names image; the graph's inputs are x$"):
        normfold.plan_onnx(model, input_shapes={"image": (1, 3, 8, 8)})
    with pytest.raises(UsageError, match=r"the graph declares x \[N, 3, 8, 8\]$"):
        normfold.plan_onnx(model, input_shapes=[(1, 3, 8)])
    with pytest.raises(UsageError, match=r"gives 2 shape\(s\); the graph takes 1 input\(s\): x$"):
        normfold.plan_onnx(model, input_shapes=[(1, 3, 8, 8), (1, 3, 8, 8)])


def test_a_file_is_sniffed_before_it_is_parsed(tmp_path: Path) -> None:
    from normfold.errors import LoadError

    (tmp_path / "w.onnx").write_text("name,value\n")
    with pytest.raises(LoadError, match=r"w\.onnx is not an ONNX model: its first bytes are not those of an"):
        normfold.fold_onnx(tmp_path / "w.onnx")
    with pytest.raises(LoadError, match="not a file but a directory"):
        normfold.plan_onnx(tmp_path)


def _opset_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int], opset: int,
                 out_shape: list[int]) -> onnx.ModelProto:  # fmt: skip
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)
    graph = onnx.helper.make_graph(nodes, "g", [x], [y], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def test_an_opset_9_clip_reads_its_bounds_from_attributes() -> None:
    """Conv -> BN -> Clip(0, 6) at opset 9 (ReLU6 as old exporters wrote it): the bounds are
    attributes; the exact reference computes them (it crashed with a raw RuntimeError before)."""
    rng = np.random.default_rng(5)
    h = onnx.numpy_helper.from_array
    inits = [
        h(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        h(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"), h(rng.normal(0, 0.3, 4).astype(np.float32), "b"),
        h(rng.normal(0.5, 1, 4).astype(np.float32), "m"), h(rng.uniform(0.5, 2, 4).astype(np.float32), "v"),
    ]  # fmt: skip
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        onnx.helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        onnx.helper.make_node("Clip", ["n"], ["y"], name="relu6", min=0.0, max=6.0),
    ]
    result = normfold.fold_onnx(_opset_model(nodes, inits, [2, 3, 8, 8], 9, [2, 4, 6, 6]))
    assert [f.norm for f in result.folded] == ["bn"] and result.skipped == []
    assert result.parity.passed and result.parity.notes == ()  # judged against the float64 run


def test_a_softmax_before_opset_13_is_the_exact_reference_onnx_defines() -> None:
    """Before opset 13 Softmax normalizes the input read as 2-D from ``axis`` (default 1) on: the
    float64 reference must compute that, not a softmax over the last axis."""
    from normfold.check.onnx_exact import exact_run

    model = _opset_model([onnx.helper.make_node("Softmax", ["x"], ["y"])], [], [2, 3, 4], 11, [2, 3, 4])
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    exact, why = exact_run(model, {"x": x})
    assert why is None
    want = torch.softmax(x.double().reshape(2, 12), 1).reshape(2, 3, 4)
    torch.testing.assert_close(exact["y"], want, rtol=1e-12, atol=1e-12)


def _session(model: onnx.ModelProto) -> Any:
    from normfold.io.onnx_run import open_session

    return open_session(model.SerializeToString()).session


def test_the_folded_model_is_checked_on_each_provider_asked_for() -> None:
    """Each provider runs the folded model against the one reference (the original on the CPU
    provider and in float64); with two, each output is named after its provider. The Azure
    provider of the stock onnxruntime wheel runs a local graph on the CPU kernels: a second
    provider every CI machine has."""
    original = rows.conv_bn_relu()
    result = normfold.fold_onnx(original, providers=["CPUExecutionProvider", "AzureExecutionProvider"])
    assert result.parity.passed
    names = [(o.name, o.inputs) for o in result.parity.outputs]
    assert names == [(f"onnxruntime-{p}: output['y']", s) for p in ("cpu", "azure")
                     for s in ("normal", "uniform[0,255]")]  # fmt: skip
    one = normfold.fold_onnx(original, providers=["CPUExecutionProvider"])
    assert [o.name for o in one.parity.outputs] == ["output['y']", "output['y']"]
    refused = r"^providers=\['CUDAExecutionProvider'\]: 'CUDAExecutionProvider' is not installed in "
    with pytest.raises(UsageError, match=refused):
        normfold.fold_onnx(original, providers=["CUDAExecutionProvider"])


def test_shapes_are_inferred_from_the_graph_without_the_weights_bytes() -> None:
    from normfold.engine.onnx_shapes import _SKELETON_LIMIT, concrete_shapes, skeleton

    b = rows.Builder(43)
    c = b.conv("x", 16, 64, "conv", k=3, pads=[0, 0, 0, 0])  # 3x3 -> 1x1: one feature per channel
    flat = b.node("Reshape", [c, b.init_i64("flat_shape", [-1, 64])], "flat")
    b.bn(flat, 64, "y")
    model = b.model([("x", ["N", 16, 3, 3])], [("y", ["N", 64])])
    weight = next(t for t in model.graph.initializer if t.name == "conv.weight")
    assert weight.ByteSize() > _SKELETON_LIMIT  # the case under test: a weight reduced to its dims

    bare = skeleton(model)
    stub = next(t for t in bare.graph.initializer if t.name == "conv.weight")
    assert list(stub.dims) == [64, 16, 3, 3] and not stub.raw_data and not stub.float_data
    kept = next(t for t in bare.graph.initializer if t.name == "flat_shape")
    assert kept == next(t for t in model.graph.initializer if t.name == "flat_shape")
    assert len(model.graph.initializer[0].raw_data) > 0  # the model itself is untouched

    shapes, types = concrete_shapes(model, {"x": (5, 16, 3, 3)})
    assert shapes["conv"] == (5, 64, 1, 1) and shapes["flat"] == (5, 64) and shapes["y"] == (5, 64)
    assert types["flat"] == onnx.TensorProto.FLOAT
    result = normfold.fold_onnx(model)
    assert [f.into_type for f in result.folded] == ["Conv"] and not result.skipped and result.parity.passed
    assert _count(result.model, "BatchNormalization") == 0


def test_a_layer_without_bias_taking_two_folds_gets_one_new_bias() -> None:
    """BN -> Conv 1x1 (no bias) -> BN, as MobileOne's stem: both norms fold into the conv; the
    applier added the conv's new bias once per fold and failed on the second (timm mobileone_s0)."""
    b = rows.Builder(44)
    pre = b.bn("x", 4, "pre")
    b.node("Conv", [pre, b.weight("conv.weight", (6, 4, 1, 1))], "conv", pads=[0, 0, 0, 0])
    b.node("Relu", [b.bn("conv", 6, "post")], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 4, 5, 5])], [("y", ["N", 6, 5, 5])]))
    assert sorted(f.pattern for f in result.folded) == ["bn-conv", "conv-bn"]
    assert result.parity.passed and _count(result.model, "BatchNormalization") == 0
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(conv.input) == 3 and conv.input[2] == "conv.weight_folded_bias"
