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

import hashlib
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from normfold.errors import ExportError, NormfoldError, UsageError, first_line
from normfold.files import OutputSet
from normfold.graph import CaptureOptions, dynamic_shapes, quiet_exporter
from normfold.parity import ParityReport, ParityRule, Tolerance
from normfold.reference import Reference, check, make_reference, parity_sets
from normfold.report import StepTimer

logger = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
_ONNX_MAX_PROTO = 2 * 1024**3  # protobuf's 2 GB limit: above it weights go to external data


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "batchnorm_nodes": self.batchnorm_nodes,
            "dynamic_batch": self.dynamic_batch,
            "parity": {k: v.to_dict() for k, v in self.parity.items()},
        }


STATE_FORMATS = (".pt", ".pth", ".safetensors")


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
            dynamic_batch=dynamic_batch, opset=opset,
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
    dynamic_batch: bool = True,
    opset: int | None = None,
    rule: ParityRule | None = None,
    steps: StepTimer | None = None,
) -> ExportResult:
    """Write ``files``' ``--out`` into its staging folder and check it (:func:`export_model`
    without the commit, for a run that commits several files as one set)."""
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
            program = program or _export_program(model, example_inputs, dynamic_batch)
            result = _export_onnx(program, example_inputs, staged, dynamic_batch=dynamic_batch, opset=opset)
        with steps("check (onnxruntime)"):
            result.parity = _check_onnx(staged, reference, rule)
    else:
        with steps("export (torch.export)"):
            program = program or _export_program(model, example_inputs, dynamic_batch)
            result = _export_pt2(program, staged, dynamic_batch=dynamic_batch)
        with steps("check (torch.export.load)"):
            result.parity = _check_pt2(staged, reference, rule)
    for runtime, report in result.parity.items():
        if not report.passed:
            raise ExportError(f"{runtime} output differs from the original model: {report.failures()[0]}")
    result.path = out
    owned = [f for f in staged.parent.iterdir() if f == staged or _is_data_of(f.name, out.name)]
    result.files = [out.parent / f.name for f in sorted(owned, key=lambda f: f == staged)]
    result.size_bytes = sum(f.stat().st_size for f in owned)
    return result


def _is_data_of(name: str, model_name: str) -> bool:
    return name.startswith(model_name + ".") and name.endswith(".data")


def commit_export(files: OutputSet, result: ExportResult) -> None:
    """Commit ``files`` (the export and whatever else the run staged); then remove the external
    data files the replaced ``.onnx`` used that the new one does not. Only those: another file
    beside it may belong to a copy of an earlier model."""
    out = files.paths["--out"]
    old = _external_files(out) if out.suffix == ".onnx" and out.is_file() and not out.is_symlink() else set()
    written = set(files.commit())
    for stale in old - written:
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
            logger.info("removed %s: the replaced %s used it, the new one does not", stale, out)


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
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> torch.export.ExportedProgram:
    try:
        with quiet_exporter():
            options = CaptureOptions(dynamic_batch=dynamic_batch)
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(inputs, options))
    except Exception as e:
        hint = " (try --static-batch)" if dynamic_batch else ""
        raise ExportError(f"torch.export failed for {type(model).__name__}{hint}: {first_line(e)}") from e


def _export_onnx(
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    dynamic_batch: bool,
    opset: int | None,
) -> ExportResult:
    import onnx

    try:
        with quiet_exporter():
            onnx_program = torch.onnx.export(program, inputs, dynamo=True, opset_version=opset, verbose=False)
            size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
            onnx_program.save(path, external_data=size >= _ONNX_MAX_PROTO)
    except Exception as e:
        raise ExportError(f"ONNX export failed: {first_line(e)}") from e
    try:
        _name_data_by_content(path)
    except OSError as e:
        raise ExportError(f"writing {path.name}'s external data failed: {e.strerror or e}") from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"exported ONNX file fails onnx.checker: {first_line(e)}") from e
    proto = onnx.load(str(path), load_external_data=False)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    return ExportResult(path, "onnx", opset=opset_used, batchnorm_nodes=bn_nodes, dynamic_batch=dynamic_batch)


def _name_data_by_content(path: Path) -> None:
    """Rename the exporter's ``<name>.data`` to ``<name>.<hash>.data`` and point the model at it."""
    data = path.with_name(path.name + ".data")
    if not data.exists():
        return
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    digest = hashlib.blake2b(digest_size=6)
    with open(data, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    named = path.with_name(f"{path.name}.{digest.hexdigest()}.data")
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
