"""Example inputs for an ONNX graph: given values, or generated ones at given or declared shapes.

A graph input's declared shape may have symbolic dims (``N``, ``batch``): a generated input takes
the size given for it (``input_shapes``: input name -> shape, or one shape per graph input in
order), else :data:`DEFAULT_DIM`. A given shape must have the declared rank and keep every fixed
dim: onnxruntime would refuse any other at the first run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch

from normfold.errors import UsageError

__all__ = ["DEFAULT_DIM", "Shapes", "example_feeds", "given_shapes", "graph_inputs"]

#: shapes of generated inputs: input name -> shape, or one shape per graph input, in order
Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]

#: the size a symbolic input dim takes in the example inputs when none is given
DEFAULT_DIM = 2
_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (initializers listed as inputs, IR < 4, are not)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def example_feeds(
    model: onnx.ModelProto, given: Sequence[Any] | Mapping[str, Any] | None, shapes: Shapes | None
) -> dict[str, torch.Tensor]:
    """Example inputs by graph input name: ``given`` as they are (in graph input order, or by
    name), else seeded standard-normal values of the graph's input types at ``shapes`` (a symbolic
    dim not given is :data:`DEFAULT_DIM`)."""
    specs = graph_inputs(model)
    if given is not None:
        items = (
            given if isinstance(given, Mapping) else dict(zip([s.name for s in specs], given, strict=False))
        )
        counted = isinstance(given, Mapping) or len(given) == len(specs)
        if set(items) != {s.name for s in specs} or not counted:
            shown = sorted(items) if isinstance(given, Mapping) else f"{len(given)} input(s)"
            raise UsageError(f"inputs= gives {shown}, the graph takes {[s.name for s in specs]}")
        return {k: torch.as_tensor(np.asarray(v)) for k, v in items.items()}
    sizes = given_shapes(specs, shapes)
    gen = torch.Generator().manual_seed(0)
    feeds = {}
    for spec in specs:
        t = spec.type.tensor_type
        dtype = _NP.get(t.elem_type)
        if dtype is None:
            kind = onnx.TensorProto.DataType.Name(t.elem_type)
            raise UsageError(f"input {spec.name}: cannot generate {kind} values; give inputs=")
        dims = sizes.get(spec.name) or [
            d.dim_value if d.HasField("dim_value") else DEFAULT_DIM for d in t.shape.dim
        ]
        x = torch.randn(list(dims), generator=gen, dtype=torch.float64)
        feeds[spec.name] = torch.from_numpy(x.numpy().astype(dtype))
    return feeds


def given_shapes(specs: Sequence[onnx.ValueInfoProto], shapes: Shapes | None) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` by input name, checked against the graph's inputs: known names, one shape
    per input when given in order, the declared rank, the declared fixed dims."""
    if shapes is None:
        return {}
    names = [s.name for s in specs]
    if isinstance(shapes, Mapping):
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise UsageError(
                f"input_shapes= names {', '.join(unknown)}; the graph's inputs are {', '.join(names)}"
            )
        by_name = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    else:
        if len(shapes) != len(names):
            raise UsageError(
                f"input_shapes= gives {len(shapes)} shape(s); the graph takes {len(names)} input(s): "
                + ", ".join(names)
            )
        by_name = {k: tuple(int(d) for d in v) for k, v in zip(names, shapes, strict=True)}
    for spec in specs:
        if spec.name not in by_name:
            continue
        dims = spec.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        given = by_name[spec.name]
        differ = any(isinstance(d, int) and d > 0 and d != g for d, g in zip(declared, given, strict=False))
        if len(given) != len(declared) or differ:
            shown = "[" + ", ".join(map(str, declared)) + "]"
            raise UsageError(
                f"input_shapes= gives {spec.name} the shape {list(given)}; the graph declares "
                f"{spec.name} {shown}"
            )
    return by_name
