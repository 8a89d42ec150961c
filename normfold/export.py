"""Export a (folded) model to ONNX or a ``torch.export`` program, check the file, write it atomically.

* ``.onnx``: ``torch.onnx.export(dynamo=True)``; the written file is checked with
  ``onnx.checker.check_model(path, full_check=True)`` and run in onnxruntime (CPU, and CUDA when
  available) **with graph optimizations disabled**: onnxruntime's ConvBNFusion runs at its basic
  level and would refold an unfolded BatchNorm, hiding a wrong fold. Models over 2 GB keep their
  weights in a sibling ``<name>.data`` file (ONNX external data).
* ``.pt2``: ``torch.export.save``; the file is loaded back and run.

Either way the outputs are compared with the *reference* (the original model's outputs, by the
parity rule of :mod:`normfold.parity`), and any failed check raises before anything is written:
files follow the one rule of :mod:`normfold.files` (staged beside the destination, committed as a
set after every check passed, never overwritten without ``force``).

External data is named after its content, ``<name>.<hash>.data``, so a new ``.onnx`` never lands
beside an old data file of the same name: the data is committed first under its new name, then the
model; the data files the replaced model used and the new one does not are removed afterwards.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from normfold.errors import ExportError, NormfoldError, UsageError, first_line, plain
from normfold.files import STATE_FORMATS, OutputSet, content_digest
from normfold.graph import CaptureOptions, axis_names, dynamic_shapes, quiet_exporter, static_axes
from normfold.parity import ParityReport, ParityRule, Tolerance
from normfold.reference import InputSet, Reference, check, make_reference, parity_sets
from normfold.report import StepTimer

logger = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
_ONNX_MAX_PROTO = 2 * 1024**3  # protobuf's 2 GB limit: above it weights go to external data


@dataclass
class TensorInfo:
    """An ONNX graph input or output: name, element type, shape (a named dynamic axis is a str)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class ExportResult:
    """What was written and how it compared with the reference outputs."""

    path: Path
    format: str
    parity: dict[str, ParityReport] = field(default_factory=dict)  # runtime -> report
    files: list[Path] = field(default_factory=list)
    opset: int | None = None
    batchnorm_nodes: int | None = None  # BatchNormalization nodes left in the ONNX graph
    dynamic_batch: bool = True
    size_bytes: int = 0  # of every file written (model and external data)
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX op type -> nodes (main graph)
    parameters: int | None = None  # elements of every ONNX initializer
    inputs: list[TensorInfo] = field(default_factory=list)  # the ONNX graph's inputs
    outputs: list[TensorInfo] = field(default_factory=list)

    def to_dict(self, *, parity: bool = True) -> dict[str, Any]:
        """As JSON; ``parity=False`` leaves the parity reports out (a run's report has them once)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "batchnorm_nodes": self.batchnorm_nodes,
            "dynamic_batch": self.dynamic_batch,
            "op_counts": self.op_counts,
            "parameters": self.parameters,
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            **({"parity": {k: v.to_dict() for k, v in self.parity.items()}} if parity else {}),
        }


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot give exactly, before any work is done."""
    if opset is None:
        return
    import onnx

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise UsageError(f"opset {opset!r} is not supported: choose {MIN_OPSET} to {top}")


MIN_OPSET = 18  # the torch.onnx (dynamo) exporter's own opsets; older ones go through a converter


def export_model(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out: str | Path,
    *,
    reference: Reference | None = None,
    program: torch.export.ExportedProgram | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    force: bool = False,
    rule: ParityRule | None = None,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    steps: StepTimer | None = None,
) -> ExportResult:
    """Export ``model`` to ``out`` (``.onnx`` or ``.pt2``), check it, then move it into place.

    The exported program must match ``reference`` (the original model's outputs, see
    :func:`normfold.reference.make_reference`) by the parity rule (``rule`` with
    ``tolerances``/``rtol``/``atol`` applied); without ``reference`` it is checked against
    ``model`` itself on the input sets of ``example_inputs``. ``program``, when given, is the
    already captured (and folded) program of ``model`` (see :attr:`normfold.FoldResult.program`):
    it is written as is, without a second capture. Raises :class:`ExportError` and writes nothing
    when any step or check fails. ``steps`` times the export and the check.
    """
    check_opset(opset)
    with OutputSet({"--out": out}, force=force, formats={"--out": tuple(FORMATS)}) as files:
        result = stage_export(
            model, example_inputs, files, reference=reference, program=program,
            capture=CaptureOptions(dynamic_batch=dynamic_batch), opset=opset,
            rule=ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol), steps=steps,
        )  # fmt: skip
        commit_export(files, result)
    return result


def stage_export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    files: OutputSet,
    *,
    reference: Reference | None = None,
    program: torch.export.ExportedProgram | None = None,
    capture: CaptureOptions | None = None,
    opset: int | None = None,
    rule: ParityRule | None = None,
    steps: StepTimer | None = None,
) -> ExportResult:
    """Write ``files``' ``--out`` into its staging folder and check it (:func:`export_model`
    without the commit, for a run that commits several files as one set). ``capture``: the
    dynamic axes (default: a dynamic batch); one the program fixed to a size is a UsageError."""
    options = capture or CaptureOptions()
    steps = steps or StepTimer()
    rule = rule or ParityRule()
    example_inputs = tuple(example_inputs)
    if reference is None:
        reference = make_reference(model, parity_sets(example_inputs, rule), rule)
    out = files.paths["--out"]
    staged = files.staged("--out")
    if FORMATS[out.suffix] == "onnx" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ExportError(
            f"--out {out}: the model's weights are bfloat16, which ONNX Conv and Gemm do not accept; "
            "write a .pt2 instead, or cast the weights to float16 or float32"
        )
    if FORMATS[out.suffix] == "onnx":
        with steps("export (onnx)"):
            program = _dynamic_program(program or _export_program(model, example_inputs, options), options)
            result = _export_onnx(program, example_inputs, staged, options=options, opset=opset)
        with steps("check (onnxruntime)"):  # a failed check fails inside its step (the report names it)
            result.parity = _passed(_check_onnx(staged, reference, rule))
    else:
        with steps("export (torch.export)"):
            program = _dynamic_program(program or _export_program(model, example_inputs, options), options)
            result = _export_pt2(program, staged, dynamic_batch=options.dynamic_batch)
        with steps("check (torch.export.load)"):
            result.parity = _passed(_check_pt2(staged, reference, rule))
    result.path = out
    owned = [f for f in staged.parent.iterdir() if f == staged or _is_data_of(f.name, out.name)]
    result.files = [out.parent / f.name for f in sorted(owned, key=lambda f: f == staged)]
    result.size_bytes = sum(f.stat().st_size for f in owned)
    return result


def _passed(parity: dict[str, ParityReport]) -> dict[str, ParityReport]:
    for runtime, report in parity.items():
        if not report.passed:
            raise ExportError(report.verdict(f"{runtime} output"))
    return parity


def _is_data_of(name: str, model_name: str) -> bool:
    return name.startswith(model_name + ".") and name.endswith(".data")


def commit_export(files: OutputSet, result: ExportResult) -> None:
    """Commit ``files`` (the export and whatever else the run staged); then remove the external
    data files the replaced ``.onnx`` used that the new one does not, only those normfold
    provably wrote and nothing else uses (:meth:`OutputSet.remove_replaced`)."""
    out = files.paths["--out"]
    old = _external_files(out) if out.suffix == ".onnx" and out.is_file() and not out.is_symlink() else set()
    written = set(files.commit())
    files.remove_replaced("--out", old - written)


def _external_files(path: Path) -> set[Path]:
    """The external data files an ``.onnx`` file refers to, in its own folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ours to judge: an unreadable old file simply has no data to clean
        return set()
    names = {
        entry.value
        for t in _get_all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return {path.parent / n for n in names if n == Path(n).name}  # never outside its folder


def write_state_dict(model: nn.Module, out: str | Path, *, force: bool = False) -> Path:
    """Write ``model.state_dict()`` to ``out`` (``.pt``/``.pth`` or ``.safetensors``) atomically."""
    with OutputSet({"--out": out}, force=force, formats={"--out": STATE_FORMATS}) as files:
        stage_state_dict(model, files)
        files.commit()
    return Path(out)


def stage_state_dict(model: nn.Module, files: OutputSet) -> None:
    """Write ``model.state_dict()`` into ``files``' staged ``--out``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    staged = files.staged("--out")
    try:
        if staged.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.clone() for k, v in state.items()}, str(staged))  # no shared storage
        else:
            _write_via_memory(staged, lambda f: torch.save(state, f))
    except NormfoldError:
        raise
    except Exception as e:
        raise ExportError(f"writing {files.paths['--out']} failed: {first_line(e)}") from e


def export_onnx(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], out: str | Path, **kwargs: Any
) -> ExportResult:
    """:func:`export_model` for an ``.onnx`` destination (checked in onnxruntime)."""
    if Path(out).suffix != ".onnx":
        raise UsageError(f"export_onnx writes .onnx files, got {out}")
    return export_model(model, example_inputs, out, **kwargs)


def _export_program(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], options: CaptureOptions
) -> torch.export.ExportedProgram:
    try:
        with quiet_exporter():
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(inputs, options))
    except Exception as e:
        hint = " (try --static-batch)" if options.dynamic_batch else ""
        raise ExportError(f"torch.export failed for {type(model).__name__}{hint}: {first_line(e)}") from e


def _dynamic_program(
    program: torch.export.ExportedProgram, options: CaptureOptions
) -> torch.export.ExportedProgram:
    """``program``, refused when it fixed an axis asked to be dynamic to one size."""
    fixed = static_axes(program, options)
    if fixed:
        shown = ", ".join(f"{name} (input {i}, axis {axis}) at {size}" for i, axis, name, size in fixed)
        raise UsageError(f"--dynamic {shown}: the model fixes it to that size, so it cannot vary")
    return program


def _export_onnx(
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    options: CaptureOptions,
    opset: int | None,
) -> ExportResult:
    import onnx

    try:
        with quiet_exporter():
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, opset_version=opset, verbose=False)
            size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
            onnx_program.save(path, external_data=size >= _ONNX_MAX_PROTO)
    except Exception as e:
        raise ExportError(f"ONNX export failed{_exporter_failure(e)}") from e
    try:
        _name_axes(path, axis_names(inputs, options))
        _name_data_by_content(path)
    except OSError as e:
        raise ExportError(f"writing {path.name}'s external data failed: {e.strerror or e}") from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"exported ONNX file fails onnx.checker: {first_line(e)}") from e
    proto = onnx.load(str(path), load_external_data=False)
    return _describe_onnx(ExportResult(path, "onnx", dynamic_batch=options.dynamic_batch), proto)


def _exporter_failure(e: Exception) -> str:
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


def _name_axes(path: Path, names: Sequence[Mapping[int, str]]) -> None:
    """Give the exporter's symbolic sizes (``s77``) the names of the dynamic axes (``batch``),
    in the graph's inputs, outputs and value infos (derived sizes such as ``2*s77`` too)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    rename: dict[str, str] = {}
    for v, axes in zip(inputs, names, strict=False):
        dims = v.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims) and dims[axis].HasField("dim_param"):
                rename[dims[axis].dim_param] = name
    if not rename:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for v in (*graph.input, *graph.output, *graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = symbol.sub(lambda m: rename[m.group(1)], d.dim_param)
    onnx.save(proto, str(path))


def _describe_onnx(result: ExportResult, proto: Any) -> ExportResult:
    """Fill in what the written ONNX graph holds: opset, op counts, parameters, inputs, outputs."""
    import onnx

    graph = proto.graph
    result.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    result.op_counts = dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))
    result.batchnorm_nodes = result.op_counts.get("BatchNormalization", 0)
    result.parameters = sum(math.prod(t.dims) for t in graph.initializer)
    initializers = {t.name for t in graph.initializer}

    def info(v: Any) -> TensorInfo:
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
        return TensorInfo(v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), dims)

    result.inputs = [info(v) for v in graph.input if v.name not in initializers]
    result.outputs = [info(v) for v in graph.output]
    return result


def _name_data_by_content(path: Path) -> None:
    """Rename the exporter's ``<name>.data`` to ``<name>.<hash>.data`` and point the model at it."""
    data = path.with_name(path.name + ".data")
    if not data.exists():
        return
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    named = path.with_name(f"{path.name}.{content_digest(data)}.data")  # files.py proves it by this
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data.name:
                entry.value = named.name
    os.replace(data, named)
    onnx.save(proto, str(path))


def onnx_providers() -> list[str]:
    """CPU always; CUDA too when this onnxruntime build can use it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ["CPUExecutionProvider"] + [p for p in ("CUDAExecutionProvider",) if p in available]


def run_onnx(path: str | Path, inputs: tuple[torch.Tensor, ...], provider: str) -> list[torch.Tensor]:
    """Run an ONNX file in onnxruntime with graph optimizations disabled; outputs as CPU tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ExportError(f"ONNX graph takes {len(names)} inputs, {len(inputs)} given")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
        return [torch.from_numpy(a) for a in session.run(None, feed)]
    except ExportError:
        raise
    except Exception as e:
        hint = ""
        if "NOT_IMPLEMENTED" in str(e):
            hint = (
                " (onnxruntime has no kernel for that op in the model's dtype: write a .pt2 instead, "
                "or cast the weights to float32)"
            )
        name = Path(path).name
        raise ExportError(f"onnxruntime ({provider}) failed to run {name}: {first_line(e)}{hint}") from e


def _check_onnx(path: Path, reference: Reference, rule: ParityRule) -> dict[str, ParityReport]:
    _, spec = pytree.tree_flatten(reference.outputs[0])
    n_outputs = spec.num_leaves
    reports = {}
    for provider in onnx_providers():

        def run(inputs: tuple[torch.Tensor, ...], provider: str = provider) -> Any:
            flat = run_onnx(path, inputs, provider)
            if len(flat) != n_outputs:
                raise ExportError(f"ONNX graph has {len(flat)} outputs, the model returns {n_outputs}")
            return pytree.tree_unflatten(flat, spec)

        name = "onnxruntime-" + provider.removesuffix("ExecutionProvider").lower()
        reports[name] = check(reference, run, rule)
    return reports


def _export_pt2(program: torch.export.ExportedProgram, path: Path, *, dynamic_batch: bool) -> ExportResult:
    try:
        _write_via_memory(path, lambda f: torch.export.save(program, f))
    except NormfoldError:
        raise
    except Exception as e:
        raise ExportError(f"torch.export.save failed: {first_line(e)}") from e
    return ExportResult(path, "pt2", dynamic_batch=dynamic_batch)


def save_sets(path: Path, sets: Sequence[InputSet]) -> None:
    """Write parity input sets as ``{set name: [tensors]}`` (``torch.save``, CPU tensors; loads
    with ``torch.load(path, weights_only=True)``)."""
    data = {s.name: [t.detach().cpu() for t in s.inputs] for s in sets}
    _write_via_memory(path, lambda f: torch.save(data, f))


def _write_via_memory(path: Path, save: Callable[[io.BytesIO], None]) -> None:
    """Serialize in memory, then write with Python's I/O: torch's zip writer aborts the whole
    process (or fails cryptically) on a full disk; Python raises an OSError we can report."""
    buffer = io.BytesIO()
    save(buffer)
    try:
        path.write_bytes(buffer.getbuffer())
    except OSError as e:
        raise ExportError(f"writing {path.name} failed: {e.strerror or e}") from e


def _check_pt2(path: Path, reference: Reference, rule: ParityRule) -> dict[str, ParityReport]:
    try:
        # Our own file, written a moment ago into a private temporary folder: not a user's file.
        with quiet_exporter():
            loaded = torch.export.load(path).module()
    except Exception as e:
        raise ExportError(f"the written .pt2 does not load: {first_line(e)}") from e

    def run(inputs: tuple[torch.Tensor, ...]) -> Any:
        try:
            with torch.no_grad():
                return loaded(*inputs)
        except Exception as e:
            raise ExportError(f"the written .pt2 does not run: {first_line(e)}") from e

    return {"torch.export": check(reference, run, rule)}
