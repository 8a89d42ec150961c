"""The shape of every value of an ONNX graph with its inputs at the example sizes: ONNX shape
inference (data propagation on) on the graph without its weights' bytes, then, for what inference
leaves unknown (a reshape to a shape computed from ``Shape(x)``), one float32 run of the original
by normfold's interpreter. The rules read these shapes to run channel ids along any path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from normfold.errors import LoadError, first_line

__all__ = ["concrete_shapes", "run_shapes", "skeleton"]


def concrete_shapes(
    model: onnx.ModelProto, sizes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Every value's shape with the inputs at ``sizes``, and its element type (ONNX shape
    inference, data propagation on)."""
    fixed = skeleton(model)
    for spec in fixed.graph.input:
        if spec.name in sizes:
            shape = spec.type.tensor_type.shape
            shape.ClearField("dim")
            for d in sizes[spec.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as e:
        raise LoadError(f"ONNX shape inference failed on the model: {first_line(e)}") from e
    found: dict[str, tuple[int, ...]] = {}
    types: dict[str, int] = {}
    g = inferred.graph
    for info in [*g.value_info, *g.input, *g.output]:
        tt = info.type.tensor_type
        if tt.elem_type:
            types[info.name] = int(tt.elem_type)
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            found[info.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    return found, types


#: an initializer of more bytes keeps only its name, type and dims in :func:`skeleton`: shape
#: constants (a Reshape's target, a Slice's bounds) are far smaller and keep their values
_SKELETON_LIMIT = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: its graph with every initializer over
    :data:`_SKELETON_LIMIT` bytes reduced to its name, type and dims. ``infer_shapes`` serializes
    the model it is given and parses the result back: with the weights, that is two copies of the
    file (most of the planning time on a 40 MB model); shapes never depend on a weight's values."""
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    graph, skeleton = model.graph, out.graph
    skeleton.name = graph.name
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(skeleton, field_name).extend(getattr(graph, field_name))
    for tensor in graph.initializer:
        if tensor.ByteSize() <= _SKELETON_LIMIT:
            skeleton.initializer.append(tensor)
        else:
            skeleton.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return out


def run_shapes(
    model: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
    source: Path | None,
) -> None:  # fmt: skip
    """Shapes inference left unknown (a reshape to a shape computed from ``Shape(x)``), from one
    float32 run of the original on the example inputs, where normfold's interpreter runs it."""
    from normfold.check.onnx_exact import Unsupported, initializer_tensors, run_graph

    known = set(shapes)
    if all(o in known for n in model.graph.node for o in n.output if o):
        return
    found: dict[str, tuple[int, ...]] = {}
    try:
        with torch.no_grad():
            tensors = initializer_tensors(model, base_dir=source.parent if source is not None else None)
            run_graph(model, feeds, torch.float32, shapes=found, initializers=tensors)
    except Unsupported:
        return
    for name, shape in found.items():
        shapes.setdefault(name, shape)
