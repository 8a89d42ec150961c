"""normfold.engine.onnx_ops: which values are computed from constants alone, found from structure."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_rows as rows

from normfold.engine import onnx_ops


def test_from_constants_follows_constants_and_stops_at_graph_inputs() -> None:
    """A conv's output depends on the graph input: outside the set, so its weight is never
    evaluated with it; Shape(W), a Constant and CastLike(constant, input) (the input's type only)
    are inside."""
    b = rows.Builder(5)
    w = b.weight("conv.weight", (4, 3, 3, 3))
    b.nodes.append(onnx.helper.make_node("Shape", [w], ["w_shape"]))
    b.nodes.append(onnx.helper.make_node("Constant", [], ["zero"], value_float=0.0))
    b.node("CastLike", ["zero", "x"], "zero_like")
    b.node("Relu", [b.node("Conv", ["x", w], "conv", pads=[1, 1, 1, 1])], "y")
    model = ir.serde.deserialize_model(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])]))
    found = {v.name for v in onnx_ops.from_constants(model.graph)}
    assert found == {"conv.weight", "w_shape", "zero", "zero_like"}
