"""The ``.onnx`` file: translated from the captured program, named, written once, checked, described.

1. **Translate** (:func:`to_onnx`): ``torch.onnx.export`` of the already captured (folded)
   ``ExportedProgram``. The exporter always runs ``ExportedProgram.run_decompositions`` on a
   program (a retrace with its own decomposition table) and exposes no public way to skip it:
   a program decomposed beforehand is retraced all the same (measured: ~70% of the first pass's
   time on a ResNet-50), so normfold hands it the captured program once and does not decompose
   anything itself. A bare ``torch.onnx.export(module)`` pays the same retrace after its own
   capture.
2. **Name** (:func:`name_graph`), in memory on the exporter's ``onnx_ir`` model: the symbolic
   sizes of the dynamic axes (``s77``) take their names (``batch``) wherever they appear, in
   derived sizes too (``2*s77`` -> ``2*batch``); the graph's inputs and outputs take the names
   of :func:`io_names` (an internal value that already holds one of those names is renamed
   first, so names stay unique, as ONNX requires).
3. **Write** (:func:`write_onnx`) once. Below protobuf's 2 GB limit the serialized bytes are
   checked by ``onnx.checker.check_model(full_check=True)`` in memory and written as they are.
   Above it the weights go to external data first, which is named by its content,
   ``<name>.<hash>.data`` (:func:`normfold.io.files.content_digest`: a new model never lands beside
   an old data file of the same name), then the small model proto, then the file is checked by
   path (the checker reads the external data's locations from the folder).
4. **Describe** (:func:`describe`): opset, IR version, producer, op counts, parameters, and every
   input and output with its element type and shape (a dynamic axis by its name), read off the
   proto already in memory: the file is never loaded again to be described.
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from normfold.engine.capture import quiet_exporter
from normfold.errors import ExportError, UsageError, first_line, plain
from normfold.io.files import content_digest

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir
    from torch import nn

_NAME = re.compile(r"[A-Za-z_][\w.:/-]*", re.ASCII)
_NAME_RULE = "a letter or _ followed by letters, digits and _ . : / -"
_SIZE_THRESHOLD = 256  # bytes: smaller initializers stay in the model proto (as ONNXProgram.save does)


@dataclass
class TensorInfo:
    """An ONNX graph input or output: name, element type, shape (a named dynamic axis is a str)."""

    name: str
    dtype: str
    shape: list[int | str]


# --- 1. translate --------------------------------------------------------------------------------


def to_onnx(
    program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], opset: int | None
) -> ir.Model:
    """The exporter's ``onnx_ir`` model of ``program`` (ExportError naming the failing op)."""
    try:
        with quiet_exporter():
            return torch.onnx.export(program, inputs, dynamo=True, opset_version=opset, verbose=False).model
    except Exception as e:
        raise ExportError(f"ONNX export failed{exporter_failure(e)}") from e


def exporter_failure(e: Exception) -> str:
    """`` at <op> (node <name>): <the exporter's own summary line>``, without its escape codes
    and boilerplate (the torch.onnx message opens with next steps and ends with "see above")."""
    text = plain(str(e))
    op = re.search(r"target=torch\.ops\.([\w.]+)", text)
    if op is None and (m := re.search(r"op='([\w.]+)', overload='(\w+)'", text)):
        op = m
        where = f"{m.group(1)}.{m.group(2)}"
    else:
        where = op.group(1) if op else None
    node = re.search(r"translating node %(\w+)", text)
    summary = text.split("## Exception summary", 1)[-1]
    lines = [ln.strip() for ln in summary.splitlines() if ln.strip() and not ln.startswith("\u2b06")]
    detail = re.sub(r"^<class '[\w.]+\.(\w+)'>: ", r"\1: ", lines[0]) if lines else first_line(e)
    at = f" at {where}" + (f" (node {node.group(1)})" if node else "") if where else ""
    return f"{at}: {detail}"


# --- 2. name ------------------------------------------------------------------------------------


def check_names(input_names: Sequence[str] | None, output_names: Sequence[str] | None) -> None:
    """Refuse names that cannot name ONNX graph inputs/outputs, before any work: each a string
    of :data:`_NAME_RULE`, none twice across inputs and outputs."""
    seen: dict[str, str] = {}
    for role, names in (("input_names", input_names), ("output_names", output_names)):
        if names is None:
            continue
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise UsageError(f"{role}={names!r}: give a list of names, one per {role.split('_')[0]}")
        for name in names:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise UsageError(f"{role}={list(names)!r}: {name!r} is not a name ({_NAME_RULE})")
            if name in seen:
                both = "names both an input and an output"
                twice = f"is given twice in {role}" if seen[name] == role else both
                raise UsageError(f"{role}={list(names)!r}: {name!r} {twice}")
            seen[name] = role


def io_names(
    model: nn.Module,
    n_inputs: int,
    n_outputs: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The graph's input and output names: those given (checked by :func:`check_names`, and one
    per input / output of the model), else the forward's positional parameter names (``input``,
    ``input_1``, ... when the forward does not name as many) and ``output``, ``output_1``, ...
    (skipping an input's name)."""
    check_names(input_names, output_names)
    for role, names, n, what in (("input_names", input_names, n_inputs, "takes"),
                                 ("output_names", output_names, n_outputs, "returns")):  # fmt: skip
        if names is not None and len(names) != n:
            kind = role.split("_")[0]
            raise UsageError(
                f"{role}={list(names)!r}: {len(names)} name{'s' * (len(names) != 1)} for {n} "
                f"{kind}{'s' * (n != 1)} (the model {what} {n} tensor{'s' * (n != 1)})"
            )
    inputs = list(input_names) if input_names is not None else _forward_names(model, n_inputs)
    if output_names is not None:
        return inputs, list(output_names)
    candidates = ("output" if i == 0 else f"output_{i}" for i in range(n_outputs + len(inputs) + 1))
    return inputs, [c for c in candidates if c not in inputs][:n_outputs]


def _forward_names(model: nn.Module, n: int) -> list[str]:
    from normfold.inputs import forward_params

    params = forward_params(model)
    names = params[0] if params is not None else []
    if len(names) >= n and all(_NAME.fullmatch(name) for name in names[:n]):
        return names[:n]
    return ["input" if i == 0 else f"input_{i}" for i in range(n)]


def name_graph(
    model: ir.Model,
    axes: Sequence[Mapping[int, str]],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> None:
    """Name, in place, the dynamic axes (``axes``: per input, ``{axis: name}``) and the graph's
    inputs and outputs (module docstring, step 2)."""
    import onnx_ir as ir

    graph = model.graph
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        raise ExportError(
            f"the ONNX graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, the model "
            f"{len(input_names)} and {len(output_names)}"
        )
    rename = {}
    for value, spec in zip(graph.inputs, axes, strict=False):
        for axis, name in spec.items():
            dim = value.shape[axis] if value.shape is not None and axis < len(value.shape) else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                rename[dim.value] = name
    if rename:
        longest_first = sorted(rename, key=len, reverse=True)
        symbol = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, longest_first)) + r")(?!\w)")
        for value in _all_values(graph):
            if value.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in value.shape):
                value.shape = ir.Shape([_renamed(d, symbol, rename) for d in value.shape])
    wanted: dict[ir.Value, str] = dict(zip(graph.inputs, input_names, strict=True))
    for i, name in enumerate(output_names):
        value = graph.outputs[i]
        if value in wanted:  # returned twice, or an input returned as is: the output is its copy
            value = _identity(graph, value, i)
        wanted[value] = name
    values = _all_values(graph)
    taken = {v.name for v in values} | set(wanted.values())
    for value in values:
        if value not in wanted and value.name in wanted.values():
            value.name = _fresh(value.name, taken)
    for i, value in enumerate(wanted):  # through unique temporary names: two targets may swap names
        value.name = _fresh(f"normfold_tmp_{i}", taken)
    for value, name in wanted.items():
        value.name = name


def _renamed(dim: Any, symbol: re.Pattern[str], rename: Mapping[str, str]) -> Any:
    import onnx_ir as ir

    if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
        return ir.SymbolicDim(symbol.sub(lambda m: rename[m.group(1)], dim.value))
    return dim


def _identity(graph: ir.Graph, value: ir.Value, index: int) -> ir.Value:
    import onnx_ir as ir

    node = ir.Node("", "Identity", inputs=[value], num_outputs=1)
    graph.append(node)
    copy = node.outputs[0]
    copy.shape, copy.type = value.shape, value.type
    graph.outputs[index] = copy
    return copy


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    import onnx_ir as ir

    values = [*graph.inputs, *graph.initializers.values()]
    values += [v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs]
    return list(dict.fromkeys(values))


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# --- 3. write -----------------------------------------------------------------------------------


def write_onnx(model: ir.Model, path: Path, *, inline_limit: int) -> onnx.ModelProto:
    """Write ``model`` to ``path`` once and check it (module docstring, step 3); returns the
    written proto (external data not loaded). Weights of ``inline_limit`` bytes or more go to
    external data."""
    import onnx
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    try:
        if size < inline_limit:
            proto = ir.serde.serialize_model(ir.external_data.load_to_model(model))  # weights read from disk
            try:
                data = proto.SerializeToString()
            except ValueError:  # weights under the limit, but with the graph over protobuf's 2 GB
                data = None
            if data is not None:
                _check(lambda: onnx.checker.check_model(data, full_check=True))
                path.write_bytes(data)
                return proto
        proto = _with_external_data(model, path)
        path.write_bytes(proto.SerializeToString())
    except OSError as e:
        raise ExportError(f"writing {path.name} failed: {e.strerror or e}") from e
    _check(lambda: onnx.checker.check_model(str(path), full_check=True))
    return proto


def _with_external_data(model: ir.Model, path: Path) -> onnx.ModelProto:
    """Write the initializers of ``model`` to ``<name>.<hash>.data`` beside ``path``; returns the
    model proto that refers to it."""
    import onnx_ir as ir

    staged = f"{path.name}.data"
    ir.external_data.unload_from_model(model, path.parent, staged, size_threshold_bytes=_SIZE_THRESHOLD)
    named = f"{path.name}.{content_digest(path.parent / staged)}.data"  # files.py proves it by this
    os.replace(path.parent / staged, path.parent / named)
    proto = ir.serde.serialize_model(model)  # refers to the data by location: nothing is read
    for tensor in _external_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == staged:
                entry.value = named
    return proto


def external_files(path: Path) -> set[Path]:
    """The external data files an ``.onnx`` file refers to, in its own folder."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ours to judge: an unreadable old file simply has no data to clean
        return set()
    entries = [entry for t in _external_tensors(proto) for entry in t.external_data]
    names = {entry.value for entry in entries if entry.key == "location"}
    return {path.parent / n for n in names if n == Path(n).name}  # never outside its folder


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]


def _check(run: Any) -> None:
    try:
        run()
    except Exception as e:
        raise ExportError(f"exported ONNX file fails onnx.checker: {first_line(e)}") from e


# --- 4. describe --------------------------------------------------------------------------------


def _batchnorms(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes of ``graph`` and of the bodies of its control-flow nodes."""
    import onnx

    count = 0
    for node in graph.node:
        count += node.op_type == "BatchNormalization"
        for a in node.attribute:
            count += sum(_batchnorms(g) for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs))
    return count


def describe(proto: onnx.ModelProto) -> dict[str, Any]:
    """What the written graph holds, as :class:`normfold.io.export.ExportResult` fields."""
    import onnx

    graph = proto.graph
    counts = dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))
    initializers = {t.name for t in graph.initializer}

    def info(v: Any) -> TensorInfo:
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
        return TensorInfo(v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), dims)

    return {
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": proto.ir_version,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip() or None,
        "op_counts": counts,
        "batchnorm_nodes": _batchnorms(graph),  # control-flow bodies included
        "parameters": sum(math.prod(t.dims) for t in graph.initializer),
        "inputs": [info(v) for v in graph.input if v.name not in initializers],
        "outputs": [info(v) for v in graph.output],
    }
