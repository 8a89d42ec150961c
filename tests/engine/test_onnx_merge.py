"""Structural reparameterization of ONNX graphs (normfold.engine.onnx_merge): RepVGG-like blocks
built with onnx.helper, merged into one Conv and judged against the original in onnxruntime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_rows as rows
from onnx import numpy_helper as nh

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


X, Y = [("x", ["N", 4, 5, 5])], [("y", ["N", 4, 5, 5])]


def test_outputs_of_one_split_are_different_tensors() -> None:
    """``conv(s1) + s0`` and ``conv_a(s0) + conv_b(s1)``: a Split's outputs are one node but not
    one tensor; merging them computed ``conv(s1) + s1`` (parity caught it and nothing folded)."""
    for two_convs in (False, True):
        b = rows.Builder(41)
        split = onnx.helper.make_node("Split", ["x"], ["s0", "s1"], name="split", axis=1, num_outputs=2)
        b.nodes.append(split)
        other = b.bn(b.conv("s0", 4, 4, "conv_a", k=1, pads=[0] * 4), 4, "bn_a") if two_convs else "s0"
        b.node("Add", [b.bn(b.conv("s1", 4, 4, "conv", k=3), 4, "bn"), other], "y")
        result = normfold.fold_onnx(b.model([("x", ["N", 8, 5, 5])], Y, opset=18))
        assert result.parity.passed and not result.merged and not result.not_merged
        assert _ops(result.model)["BatchNormalization"] == 0


def test_weights_and_biases_shared_with_a_layer_outside_the_block() -> None:
    """A branch or the target sharing its weight or bias with a conv elsewhere: the merged values
    are the target's own, the other conv keeps the shared one (a KeyError when the dropped branch
    held the original name; the merged weight joined back to its sharer, wrong outputs)."""
    for case in ("branch", "target", "bias"):
        b = rows.Builder(1)
        w = b.weight("shared.weight", (4, 4, 1, 1) if case == "branch" else (4, 4, 3, 3))
        kw = {"weight": w} if case == "target" else {}
        a = b.conv("x", 4, 4, "conv_a", k=3, **kw)
        c = b.conv("x", 4, 4, "conv_b", k=1, pads=[0] * 4, **({"weight": w} if case == "branch" else {}))
        if case == "bias":
            b.nodes[0].input[2] = "conv_b.bias"  # conv_a reads conv_b's bias; z below reads it too
        b.node("Add", [a, c], "y")
        zw = w if case != "bias" else b.weight("z.weight", (4, 4, 1, 1))
        k = 3 if case == "target" else 1
        b.node("Conv", ["x", zw, "conv_b.bias"], "z", pads=[k // 2] * 4)
        result = normfold.fold_onnx(b.model(X, [*Y, ("z", ["N", 4, 5, 5])]))
        assert result.parity.passed and [m.into for m in result.merged] == ["conv_a"]


def test_a_target_whose_weight_or_bias_is_a_constant_node_takes_the_merged_values() -> None:
    """A weight from a ``Constant`` node, or computed by a ``Cast``, no fold to make it an
    initializer: the merged values were written nowhere and the branches dropped anyway."""
    for how in ("constant", "cast", "bias"):
        b = rows.Builder(5)
        w = b.rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
        if how == "constant":
            const = onnx.helper.make_node("Constant", [], ["wconst"], value=nh.from_array(w, "wconst"))
            b.nodes.append(const)
            a = b.conv("x", 4, 4, "conv_a", k=3, weight="wconst")
        elif how == "cast":
            b.inits.append(nh.from_array(w.astype(np.float16), "w16"))
            w32 = b.node("Cast", ["w16"], "w32", to=onnx.TensorProto.FLOAT)
            a = b.conv("x", 4, 4, "conv_a", k=3, weight=w32)
        else:
            a = b.conv("x", 4, 4, "conv_a", k=3)
            bias = nh.from_array(b.rng.normal(0, 0.1, 4).astype(np.float32), "bconst")
            b.nodes.insert(0, onnx.helper.make_node("Constant", [], ["bconst"], value=bias))
            b.nodes[1].input[2] = "bconst"
        b.node("Add", [a, b.conv("x", 4, 4, "conv_b", k=1, pads=[0] * 4)], "y")
        result = normfold.fold_onnx(b.model(X, Y))
        assert result.parity.passed and len(result.merged) == 1
        assert _ops(result.model) == Counter({"Conv": 1})  # the Constant / Cast went with the old value


def test_a_branch_whose_shape_is_read_and_a_norm_kept_on_a_conv_branch() -> None:
    """A ``Shape`` of a branch (a shape read is no use) reads the merged conv: it crashed the
    apply; a norm kept on a conv's output leaves the block with that norm's code, as on the
    PyTorch path (the block was silently no block)."""
    b = rows.Builder(50)
    a = b.bn(b.conv("x", 4, 4, "conv_a", k=3), 4, "bn_a")
    c = b.bn(b.conv("x", 4, 4, "conv_b", k=1, pads=[0] * 4), 4, "bn_b")
    s = b.node("Add", [a, c], "s")
    b.node("Reshape", [s, b.node("Shape", [c], "shp")], "y")
    result = normfold.fold_onnx(b.model(X, Y))
    assert result.parity.passed and len(result.merged) == 1 and _ops(result.model)["Conv"] == 1

    b = rows.Builder(23)
    a = b.bn(b.conv("x", 4, 4, "ca", k=3), 4, "bna")
    cb = b.conv("x", 4, 4, "cb", k=1, pads=[0] * 4)
    b.node("Add", [a, b.bn(cb, 4, "bnb")], "y")
    b.node("Relu", [cb], "z")
    result = normfold.fold_onnx(b.model(X, [*Y, ("z", ["N", 4, 5, 5])]))
    (kept,) = result.not_merged
    assert kept.code == "multiple_users" and kept.reason.startswith("bnb stays on its conv branch: ")


def _unused(model: onnx.ModelProto) -> list[str]:
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return [t.name for t in model.graph.initializer if t.name not in read]


def test_a_block_on_one_split_output_and_a_block_on_a_conv_output_merge() -> None:
    """A RepVGG block on one chunk of a Split (every branch reads that same output), and one whose
    input is a conv's output with a norm kept on it: both merge (the fixes for Split outputs and
    kept norms on conv branches had made them no block)."""
    b = rows.Builder(41)
    b.nodes.append(onnx.helper.make_node("Split", ["x"], ["s0", "s1"], name="split", axis=1, num_outputs=2))
    s = b.node("Add", [b.bn(b.conv("s1", 4, 4, "conv_a", k=3), 4, "bn_a"),
                       b.bn(b.conv("s1", 4, 4, "conv_b", k=1, pads=[0] * 4), 4, "bn_b")], "s")  # fmt: skip
    b.node("Concat", ["s0", b.node("Add", [s, b.bn("s1", 4, "bn_id")], "t")], "y", axis=1)
    result = normfold.fold_onnx(b.model([("x", ["N", 8, 5, 5])], [("y", ["N", 8, 5, 5])], opset=18))
    assert result.parity.passed and [m.node for m in result.merged] == ["t"]
    assert _ops(result.model)["BatchNormalization"] == 0 and _ops(result.model)["Conv"] == 1

    b = rows.Builder(42)
    c0 = b.conv("x", 4, 4, "conv0", k=3)
    s = b.node("Add", [b.bn(b.conv(c0, 4, 4, "conv_a", k=3), 4, "bn_a"),
                       b.bn(b.conv(c0, 4, 4, "conv_b", k=1, pads=[0] * 4), 4, "bn_b")], "s")  # fmt: skip
    b.node("Add", [s, b.bn(c0, 4, "bn_id")], "y")
    result = normfold.fold_onnx(b.model(X, Y))
    assert result.parity.passed and [m.node for m in result.merged] == ["y"]
    assert _ops(result.model) == Counter({"Conv": 2})


def test_weights_read_through_an_identity_or_cast_leave_no_initializer_unused() -> None:
    for where in ("branch", "target"):
        b = rows.Builder(5)
        raw = b.weight("w_raw", (4, 4, 1, 1) if where == "branch" else (4, 4, 3, 3))
        w = b.node("Identity", [raw], "onnx::Conv_7")
        a = b.conv("x", 4, 4, "conv_a", k=3, **({"weight": w} if where == "target" else {}))
        c = b.conv("x", 4, 4, "conv_b", k=1, pads=[0] * 4, **({"weight": w} if where == "branch" else {}))
        b.node("Add", [a, c], "y")
        result = normfold.fold_onnx(b.model(X, Y))
        assert result.parity.passed and len(result.merged) == 1
        assert _unused(result.model) == [] and "w_raw" not in {t.name for t in result.model.graph.initializer}


def test_a_zero_bias_deduplicated_with_a_norms_beta_is_copied_for_the_conv() -> None:
    """An exporter's one zero initializer as conv_b's bias and bn_id's beta: the conv takes its
    own copy whichever node reads it first (first the conv: ``shared_producer``, no fold, no merge)."""
    for conv_first in (True, False):
        b = rows.Builder(3)
        b.init("Z", np.zeros(4))
        if not conv_first:
            idn = b.bn("x", 4, "bn_id")
            b.nodes[-1].input[2] = "Z"
        a = b.bn(b.conv("x", 4, 4, "conv_a", k=3), 4, "bn_a")
        c = b.conv("x", 4, 4, "conv_b", k=1, pads=[0] * 4)
        b.nodes[-1].input[2] = "Z"
        c = b.bn(c, 4, "bn_b")
        if conv_first:
            idn = b.bn("x", 4, "bn_id")
            b.nodes[-1].input[2] = "Z"
        b.node("Add", [b.node("Add", [a, c], "s"), idn], "y")
        result = normfold.fold_onnx(b.model(X, Y))
        assert result.parity.passed and [m.node for m in result.merged] == ["y"]
        assert _ops(result.model) == Counter({"Conv": 1}) and not result.skipped


def test_a_norm_after_a_merged_block_folds_into_its_conv() -> None:
    """``bn(bn_a(conv_a(x)) + x)``: once the block is one conv, the norm after its sum follows a
    conv, and the next round folds it (as the PyTorch path plans its folded program again); it
    was kept with the stale reason of the first round (its input a model input). Folding the
    written model again finds nothing."""
    b = rows.Builder(60)
    a = b.bn(b.conv("x", 4, 4, "conv_a", k=3), 4, "bn_a")
    b.bn(b.node("Add", [a, "x"], "s"), 4, "y")
    result = normfold.fold_onnx(b.model(X, Y))
    assert result.parity.passed and _ops(result.model) == Counter({"Conv": 1})
    assert [m.node for m in result.merged] == ["s"] and not result.skipped
    assert {(f.norm, f.pattern) for f in result.folded} == {("bn_a", "conv-bn"), ("y", "conv-bn")}
    again = normfold.fold_onnx(result.model)
    assert not again.folded and not again.merged and not again.skipped
    plain = normfold.fold_onnx(b.model(X, Y), reparameterize=False)
    (kept,) = plain.skipped
    assert (kept.norm, kept.code) == ("y", "after_input")  # without the merge: the sum reads x too


def test_same_auto_padding_at_stride_one_merges_and_at_a_stride_stays() -> None:
    """tf2onnx-style ``auto_pad=SAME_UPPER``: at stride 1 a 3x3 and a 1x1 pad 1 and 0 a side, the
    same windows centred; at stride 2 the padding depends on the input size."""
    for stride, merged in ((1, True), (2, False)):
        b = rows.Builder(61)
        w3, w1 = b.weight("w3", (4, 4, 3, 3)), b.weight("w1", (4, 4, 1, 1))
        a = b.bn(b.node("Conv", ["x", w3], "ca", auto_pad="SAME_UPPER", strides=[stride] * 2), 4, "bna")
        c = b.bn(b.node("Conv", ["x", w1], "cb", auto_pad="SAME_UPPER", strides=[stride] * 2), 4, "bnb")
        b.node("Add", [a, c], "y")
        side = 5 if stride == 1 else 3
        result = normfold.fold_onnx(b.model([("x", ["N", 4, 5, 5])], [("y", ["N", 4, side, side])]))
        assert result.parity.passed and bool(result.merged) == merged
        if not merged:
            (kept,) = result.not_merged
            why = "ca_conv (Conv) pads by SAME_UPPER at a stride: its padding depends on the input size"
            assert (kept.code, kept.reason) == ("reparam_padding", why)
