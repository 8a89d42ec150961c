"""``lower_kept``: the BatchNormalization nodes a fold keeps, written as Mul+Add or a depthwise
1x1 Conv (normfold.engine.onnx_lower), judged like any fold against the original in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_rows as rows
import pytest
from onnx import numpy_helper as nh

import normfold
from normfold.engine.onnx_lower import FORMS, Lowered
from normfold.errors import UsageError


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(rows.REFUSALS))
def test_every_kept_batch_norm_is_lowered_and_matches_the_original(name: str, form: str) -> None:
    build, code = rows.REFUSALS[name]
    original = build()
    result = normfold.fold_onnx(original, lower_kept=form)
    ops, before = _ops(result.model), _ops(original)
    assert ops["BatchNormalization"] == 0
    assert result.lowered == [Lowered("bn", FORMS[form])]
    if form == "mul-add":
        assert (ops["Mul"], ops["Add"]) == (before["Mul"] + 1, before["Add"] + 1)
    else:
        conv = next(n for n in result.model.graph.node if n.name.startswith("bn_conv"))
        assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute} == {
            "group": 4 if name != "bn_conv3x3_padded" else 6, "kernel_shape": [1, 1]}  # fmt: skip
    assert [(s.norm, s.code) for s in result.skipped] == [("bn", code)]  # still kept: not folded
    assert result.parity.passed, result.parity.failures()
    assert result.parity.notes == ()  # against the float64 run of the original
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    names = {i.name for i in result.model.graph.initializer}
    assert not names & {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert result.to_dict()["lowered"] == [{"node": "bn", "into": FORMS[form]}]


def test_the_lowered_values_are_the_map_in_float64_rounded_once() -> None:
    original = rows.input_bn_relu()
    inits = {i.name: nh.to_array(i).astype(np.float64) for i in original.graph.initializer}
    s = inits["bn.weight"] / np.sqrt(inits["bn.running_var"] + 1e-5)
    t = inits["bn.bias"] - inits["bn.running_mean"] * s
    result = normfold.fold_onnx(original, lower_kept="mul-add")
    got = {i.name: nh.to_array(i) for i in result.model.graph.initializer}
    assert got["bn_scale"].shape == got["bn_shift"].shape == (4, 1, 1)
    assert np.array_equal(got["bn_scale"].reshape(-1), s.astype(np.float32))
    assert np.array_equal(got["bn_shift"].reshape(-1), t.astype(np.float32))


def test_a_batch_norm_that_is_a_graph_output_keeps_its_name() -> None:
    b = rows.Builder(61)
    b.bn("x", 5, "y")
    original = b.model([("x", ["N", 5, 6])], [("y", ["N", 5, 6])])
    for form in FORMS:
        result = normfold.fold_onnx(original, lower_kept=form)
        assert [o.name for o in result.model.graph.output] == ["y"]
        assert _ops(result.model)["BatchNormalization"] == 0 and result.parity.passed


def test_nodes_that_are_no_fixed_map_or_do_not_suit_the_form_stay_with_a_note() -> None:
    b = rows.Builder(62)
    b.bn(b.conv("x", 3, 8, "conv"), 8, "bn", training_mode=1)
    b.nodes[-1].output.extend(["bn_mean", "bn_var"])
    b.node("Relu", ["bn"], "y")
    trained = b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], opset=15)
    result = normfold.fold_onnx(trained, lower_kept="mul-add")
    assert result.lowered == [] and _ops(result.model)["BatchNormalization"] == 1
    assert "kept BatchNormalization bn not lowered: it runs in training mode (batch statistics), which no " \
           "constant map reproduces" in result.notes  # fmt: skip

    b = rows.Builder(63)
    b.node("Relu", [b.bn("x", 6, "bn")], "y")
    flat = b.model([("x", ["N", 6])], [("y", ["N", 6])])  # rank 2: no spatial axes for a Conv
    kept = normfold.fold_onnx(flat, lower_kept="conv")
    assert kept.lowered == [] and _ops(kept.model)["BatchNormalization"] == 1
    assert "kept BatchNormalization bn not lowered: a Conv needs an input of rank 3 to 5, not 2 " \
           "(lower_kept='mul-add' takes any rank)" in kept.notes  # fmt: skip
    lowered = normfold.fold_onnx(flat, lower_kept="mul-add")
    assert lowered.lowered == [Lowered("bn", "Mul+Add")] and lowered.parity.passed


def test_a_folded_norm_is_not_lowered_twice_and_default_lowers_nothing() -> None:
    original = rows.conv_bn_relu()
    assert normfold.fold_onnx(original, lower_kept="conv").lowered == []
    kept = normfold.fold_onnx(rows.input_bn_relu())
    assert kept.lowered == [] and _ops(kept.model)["BatchNormalization"] == 1


def test_an_unknown_form_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(UsageError, match=r"^lower_kept must be 'mul-add' or 'conv', got 'mul'$"):
        normfold.fold_onnx(tmp_path / "missing.onnx", lower_kept="mul")


def _model(nodes, inits, inputs, outputs, *, opset: int = 15, ir_version: int = 8) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _stats(rng: np.random.Generator, c: int, dtype=np.float32) -> dict[str, np.ndarray]:
    drawn = {"g": rng.uniform(0.5, 2, c), "b": rng.normal(0, 1, c), "m": rng.normal(0, 1, c),
             "v": rng.uniform(0.5, 2, c)}  # fmt: skip
    return {k: v.astype(dtype) for k, v in drawn.items()}


def test_rank_and_dtype_are_the_read_values_not_the_producers_first_output() -> None:
    """Review of 805555c: a BN reading an LSTM's ``Y_h`` (rank 3) took the rank of ``Y`` (rank 4)
    and wrote constants of the wrong shape (onnx.checker failed the fold)."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    rng = np.random.default_rng(0)
    s, b, i, hidden = 3, 2, 5, 6
    inits = [nh.from_array(rng.normal(0, 0.3, (1, 4 * hidden, n)).astype(np.float32), k)
             for k, n in (("W", i), ("R", hidden))]  # fmt: skip
    inits += [nh.from_array(v, k) for k, v in _stats(rng, b).items()]
    nodes = [h.make_node("LSTM", ["x", "W", "R"], ["Y", "Y_h"], hidden_size=hidden, name="lstm"),
             h.make_node("BatchNormalization", ["Y_h", "g", "b", "m", "v"], ["bn"], name="bn"),
             h.make_node("Relu", ["bn"], ["y"]), h.make_node("Relu", ["Y"], ["y0"])]  # fmt: skip
    model = _model(nodes, inits, [h.make_tensor_value_info("x", TP.FLOAT, [s, b, i])],
                   [h.make_tensor_value_info("y", TP.FLOAT, [1, b, hidden]),
                    h.make_tensor_value_info("y0", TP.FLOAT, [s, 1, b, hidden])])  # fmt: skip
    shapes = {
        "mul-add": {"bn_scale": (2, 1), "bn_shift": (2, 1)},
        "conv": {"bn_weight": (2, 1, 1), "bn_bias": (2,)},
    }
    for form, expected in shapes.items():
        result = normfold.fold_onnx(model, lower_kept=form)
        assert result.lowered == [Lowered("bn", FORMS[form])] and result.parity.passed
        inits = result.model.graph.initializer
        assert {t.name: nh.to_array(t).shape for t in inits if t.name.startswith("bn_")} == expected


def test_ir3_constant_node_statistics_are_lowered_and_removed() -> None:
    """Review of 805555c: in ONNX IR 3 an initializer must be a graph input too (onnx.checker
    refused the lowered file); statistics from Constant nodes left those nodes behind."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    stats = _stats(np.random.default_rng(1), 4)
    nodes = [h.make_node("Constant", [], [k], value=nh.from_array(v, k)) for k, v in stats.items()]
    nodes += [h.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"], name="bn"),
              h.make_node("Relu", ["bn"], ["y"])]  # fmt: skip
    io = ([h.make_tensor_value_info("x", TP.FLOAT, ["N", 4, 5, 5])],
          [h.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 5, 5])])  # fmt: skip
    model = _model(nodes, [], *io, opset=8, ir_version=3)
    for form in FORMS:
        result = normfold.fold_onnx(model, lower_kept=form)
        assert result.lowered == [Lowered("bn", FORMS[form])] and result.parity.passed
        onnx.checker.check_model(result.model, full_check=True)
        assert _ops(result.model)["Constant"] == 0
        inits = {t.name for t in result.model.graph.initializer}
        assert inits <= {i.name for i in result.model.graph.input}  # IR 3: every initializer listed


def test_float64_is_lowered_to_mul_add_only() -> None:
    """Review of 805555c: onnxruntime's CPU provider has no float64 Conv, so the conv form made the
    whole fold fail; it now leaves the node, with a note naming the form that takes it."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    stats = _stats(np.random.default_rng(2), 4, np.float64)
    nodes = [h.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"], name="bn"),
             h.make_node("Relu", ["bn"], ["y"])]  # fmt: skip
    io = ([h.make_tensor_value_info("x", TP.DOUBLE, ["N", 4, 5])],
          [h.make_tensor_value_info("y", TP.DOUBLE, ["N", 4, 5])])  # fmt: skip
    model = _model(nodes, [nh.from_array(v, k) for k, v in stats.items()], *io)
    kept = normfold.fold_onnx(model, lower_kept="conv")
    assert kept.lowered == [] and kept.parity.passed
    assert "kept BatchNormalization bn not lowered: onnxruntime's CPU provider has no float64 Conv " \
           "(lower_kept='mul-add' takes it)" in kept.notes  # fmt: skip
    lowered = normfold.fold_onnx(model, lower_kept="mul-add")
    assert lowered.lowered == [Lowered("bn", "Mul+Add")] and lowered.parity.passed


def test_a_batch_norm_in_a_control_flow_body_stays_with_a_note_and_is_counted() -> None:
    """Review of 805555c: a BN inside an If body was neither lowered nor noted, and the written
    file's count (main graph only) said none was left."""
    from normfold.io.onnx_file import describe

    def out(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 3, 4, 4])

    inner = rows.Builder(64)
    inner.bn("x", 3, "then_out")
    then = onnx.helper.make_graph(inner.nodes, "then", [], [out("then_out")], inner.inits)
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["else_out"])], "else", [],
                                   [out("else_out")])  # fmt: skip
    cond = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    outer = rows.Builder(65)
    outer.node("Relu", [outer.bn("x", 3, "bn")], "z")
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    graph = onnx.helper.make_graph([*outer.nodes, node], "g", [cond, out("x")], [out("y"), out("z")],
                                   outer.inits)  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    result = normfold.fold_onnx(model, inputs=[np.array(True), np.ones((2, 3, 4, 4), np.float32)],
                                lower_kept="mul-add")  # fmt: skip
    assert result.lowered == [Lowered("bn", "Mul+Add")] and result.parity.passed
    assert "kept BatchNormalization then_out_batchnormalization not lowered: it is inside a control-flow " \
           "body, which are not lowered yet" in result.notes  # fmt: skip
    assert describe(result.model)["batchnorm_nodes"] == 1
