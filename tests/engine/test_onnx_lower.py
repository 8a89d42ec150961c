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
