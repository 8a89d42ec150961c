"""Structural reparameterization of ONNX graphs (normfold.engine.onnx_merge): RepVGG-like blocks
built with onnx.helper, merged into one Conv and judged against the original in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_rows as rows

import normfold


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_a_repvgg_block_becomes_one_conv_with_parity_against_the_original() -> None:
    original = rows.repvgg_block()
    result = normfold.fold_onnx(original)
    assert result.parity.passed and result.parity.decided
    assert _ops(result.model) == Counter({"Conv": 1, "Relu": 1})
    (merged,) = result.merged
    assert merged.into == "conv_a" and merged.node == "sum"
    assert merged.branches == ("conv_a (conv 3x3)", "conv_b (conv 1x1)", "bn_id (norm)")
    assert {(f.norm, f.pattern) for f in result.folded} >= {("bn_id", "reparam-bn")}
    assert not result.skipped and not result.not_merged
    names = {t.name for t in result.model.graph.initializer}
    assert names == {"conv_a.weight", "conv_a.bias"}  # every other branch's weights and statistics gone
    assert [o.name for o in result.model.graph.output] == ["y"]


def test_without_reparameterize_the_branches_stay_folded_apart() -> None:
    result = normfold.fold_onnx(rows.repvgg_block(), reparameterize=False)
    assert result.parity.passed and not result.merged
    assert _ops(result.model) == Counter({"Conv": 2, "Add": 2, "BatchNormalization": 1, "Relu": 1})


def test_a_block_padded_unevenly_stays_with_its_code() -> None:
    """A 2x2 branch padded on one side only (as converters write SAME padding) has no centred
    place in the 3x3 kernel: no merge, and why; the folds still apply."""
    result = normfold.fold_onnx(rows.repvgg_block(71, identity=False, k1=2, pads1=[1, 1, 0, 0]))
    assert result.parity.passed and not result.merged
    (kept,) = result.not_merged
    assert kept.code == "reparam_padding" and kept.node == "sum_ab"
    assert kept.reason == "conv_b_conv (Conv) pads [1, 1, 0, 0]: not the same on both sides of an axis"
    assert _ops(result.model) == Counter({"Conv": 2, "Add": 1, "Relu": 1})


def test_the_sum_as_a_graph_output_keeps_its_name() -> None:
    b = rows.Builder(72)
    a = b.bn(b.conv("x", 4, 4, "conv_a", k=3), 4, "bn_a")
    b.node("Add", [a, b.bn(b.conv("x", 4, 4, "conv_b", k=1, pads=[0, 0, 0, 0]), 4, "bn_b")], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 4, 5, 5])], [("y", ["N", 4, 5, 5])]))
    assert result.parity.passed and _ops(result.model) == Counter({"Conv": 1})
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert result.model.graph.node[0].output[0] == "y"


def test_a_difference_and_a_depthwise_block_with_a_bare_identity_merge() -> None:
    """``(dw3x3(x) - dw1x1(x)) + x`` with groups = channels: the subtracted branch enters with -1,
    the identity as channel c's own tap of its group."""
    b = rows.Builder(73)
    a = b.bn(b.conv("x", 6, 6, "dw_a", k=3, group=6), 6, "bn_a")
    c = b.bn(b.conv("x", 6, 6, "dw_b", k=1, group=6, pads=[0, 0, 0, 0]), 6, "bn_b")
    d = b.node("Sub", [a, c], "diff")
    b.node("Add", [d, "x"], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 6, 5, 5])], [("y", ["N", 6, 5, 5])]))
    assert result.parity.passed and result.parity.decided
    assert _ops(result.model) == Counter({"Conv": 1})
    (merged,) = result.merged
    assert merged.branches == ("dw_a (conv 3x3)", "dw_b (conv 1x1)", "identity")


def test_a_branch_read_outside_the_sum_stays_with_its_code() -> None:
    b = rows.Builder(74)
    a = b.bn(b.conv("x", 4, 4, "conv_a", k=3), 4, "bn_a")
    c = b.bn(b.conv("x", 4, 4, "conv_b", k=1, pads=[0, 0, 0, 0]), 4, "bn_b")
    b.node("Add", [a, c], "y")
    b.node("Relu", [c], "z")  # conv_b's output is a second output's input too
    model = b.model([("x", ["N", 4, 5, 5])], [("y", ["N", 4, 5, 5]), ("z", ["N", 4, 5, 5])])
    result = normfold.fold_onnx(model)
    assert result.parity.passed and not result.merged
    (kept,) = result.not_merged
    assert kept.code == "multiple_users"
    assert kept.reason == "conv_b_conv (Conv) output is also used outside the sum, by z_relu (Relu)"


def test_a_layer_scaled_difference_and_a_plus_zero_branch_merge() -> None:
    """FastViT's RepMixer ``x + g * (conv(x) - bn(x))`` (g per channel: the difference's branches
    weighted by g), and timm's missing branch as a literal 0 (``(bn(x) + 0) + conv(x)``): each one
    Conv, the scale and the ``+ 0`` reported folded into it."""
    b = rows.Builder(75)
    mixer = b.bn(b.conv("x", 6, 6, "mix", k=3, group=6), 6, "bn_mix")
    diff = b.node("Sub", [mixer, b.bn("x", 6, "norm")], "diff")
    g = b.init("g", b.rng.uniform(0.5, 1.5, (6, 1, 1)))
    h = b.node("Add", ["x", b.node("Mul", [diff, g], "scaled")], "h")
    zero = b.node("Add", [b.bn(h, 6, "bn_id"), b.init("zero", np.zeros(()))], "plus_zero")
    b.node("Add", [zero, b.bn(b.conv(h, 6, 6, "conv", k=3), 6, "bn_conv")], "y")
    result = normfold.fold_onnx(b.model([("x", ["N", 6, 5, 5])], [("y", ["N", 6, 5, 5])]))
    assert result.parity.passed and result.parity.decided
    assert _ops(result.model) == Counter({"Conv": 2})
    assert [m.node for m in result.merged] == ["h", "y"]
    patterns = {f.norm: f.pattern for f in result.folded}
    assert patterns["scaled_mul:scaled"] == patterns["plus_zero_add:plus_zero"] == "reparam-affine"
    assert patterns["norm"] == patterns["bn_id"] == "reparam-bn" and not result.skipped
