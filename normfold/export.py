"""Export a (folded) model to ONNX or a ``torch.export`` program, check the file, write it atomically.

* ``.onnx``: ``torch.onnx.export(dynamo=True)``; the written file is checked with
  ``onnx.checker.check_model(path, full_check=True)`` and run in onnxruntime (CPU, and CUDA when
  available) **with graph optimizations disabled**: onnxruntime's ConvBNFusion runs at its basic
  level and would refold an unfolded BatchNorm, hiding a wrong fold. Models over 2 GB keep their
  weights in a sibling ``<name>.data`` file (ONNX external data).
* ``.pt2``: ``torch.export.save``; the file is loaded back and run.

Either way the outputs are compared with the *reference* outputs (the original model's), and any
failed check raises before anything is written: files are produced in a temporary folder next to
the destination and moved into place (``os.replace``) only after every check passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from normfold.errors import ExportError, UsageError, first_line
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "size_bytes": sum(f.stat().st_size for f in self.files if f.exists()),
            "opset": self.opset,
            "batchnorm_nodes": self.batchnorm_nodes,
            "dynamic_batch": self.dynamic_batch,
            "parity": {k: v.to_dict() for k, v in self.parity.items()},
        }


STATE_FORMATS = (".pt", ".pth", ".safetensors")


def check_destination(
    out: str | Path, *, force: bool = False, formats: Sequence[str] = tuple(FORMATS)
) -> Path:
    """Validate an output path (one of ``formats``) before any work is done."""
    out = Path(out)
    if out.suffix not in formats:
        raise UsageError(f"--out {out}: unknown format {out.suffix or '(none)'}; use {' or '.join(formats)}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    return out


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
    steps = steps or StepTimer()
    out = check_destination(out, force=force)
    example_inputs = tuple(example_inputs)
    rule = ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol)
    if reference is None:
        reference = make_reference(model, parity_sets(example_inputs, rule), rule)
    with _staging(out) as stage:
        staged = stage / out.name
        if FORMATS[out.suffix] == "onnx":
            with steps("export (onnx)"):
                program = program or _export_program(model, example_inputs, dynamic_batch)
                result = _export_onnx(
                    program, example_inputs, staged, dynamic_batch=dynamic_batch, opset=opset
                )
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
        # Weights files first, the model file last: a reader never sees a model without its data.
        for f in sorted(stage.iterdir(), key=lambda p: p.name == out.name):
            os.replace(f, out.parent / f.name)
            result.files.append(out.parent / f.name)
        result.path = out
    return result


def write_state_dict(model: nn.Module, out: str | Path, *, force: bool = False) -> Path:
    """Write ``model.state_dict()`` to ``out`` (``.pt``/``.pth`` or ``.safetensors``) atomically."""
    out = check_destination(out, force=force, formats=STATE_FORMATS)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with _staging(out) as stage:
        staged = stage / out.name
        try:
            if out.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.clone() for k, v in state.items()}, str(staged))  # no shared storage
            else:
                torch.save(state, staged)
        except Exception as e:
            raise ExportError(f"writing {out} failed: {first_line(e)}") from e
        os.replace(staged, out)
    return out


def export_onnx(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], out: str | Path, **kwargs: Any
) -> ExportResult:
    """:func:`export_model` for an ``.onnx`` destination (checked in onnxruntime)."""
    if Path(out).suffix != ".onnx":
        raise UsageError(f"export_onnx writes .onnx files, got {out}")
    return export_model(model, example_inputs, out, **kwargs)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (same filesystem, so ``os.replace`` is atomic), always removed."""
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"exported ONNX file fails onnx.checker: {first_line(e)}") from e
    proto = onnx.load(str(path), load_external_data=False)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    return ExportResult(path, "onnx", opset=opset_used, batchnorm_nodes=bn_nodes, dynamic_batch=dynamic_batch)


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
        raise ExportError(f"onnxruntime ({provider}) failed to run {path}: {first_line(e)}") from e


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
        torch.export.save(program, path)
    except Exception as e:
        raise ExportError(f"torch.export.save failed: {first_line(e)}") from e
    return ExportResult(path, "pt2", dynamic_batch=dynamic_batch)


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
