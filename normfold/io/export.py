"""Export a (folded) model to ONNX or a ``torch.export`` program, check the file, write it atomically.

* ``.onnx`` (:mod:`normfold.io.onnx_file`): the captured program translated by ``torch.onnx.export``
  once, its dynamic axes, inputs and outputs named in memory, written once and checked by
  ``onnx.checker.check_model(full_check=True)``, then run in onnxruntime
  (:mod:`normfold.io.onnx_run`: graph optimizations disabled, on ``ExportOptions.providers``, the CPU
  by default). Models over 2 GB keep their weights in a sibling ``<name>.<hash>.data`` file.
* ``.pt2``: ``torch.export.save``; the file is loaded back and run.

Either way the outputs are compared with the *reference*: the original model's outputs (pass
``original=``, the model before folding or its :class:`~normfold.check.reference.Reference`), by the
parity rule of :mod:`normfold.check.parity`; without it the file is checked against the exported model
itself. Any failed check raises before anything is written: files follow the one rule of
:mod:`normfold.io.files` (staged beside the destination, committed as a set after every check
passed, never overwritten without ``force``).

External data is named after its content, so a new ``.onnx`` never lands beside an old data file
of the same name: the data is committed first under its new name, then the model; the data files
the replaced model used and the new one does not are removed afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from normfold.check.parity import ParityReport, ParityRule
from normfold.check.reference import Reference, check, make_reference, parity_sets
from normfold.engine.capture import CaptureOptions, axis_names, dynamic_shapes, quiet_exporter, static_axes
from normfold.engine.onnx_lower import Lowered, lower_kept
from normfold.engine.onnx_view import OnnxView
from normfold.errors import ExportError, NormfoldError, UsageError, first_line
from normfold.io.files import OutputSet
from normfold.io.onnx_file import (
    TensorInfo,
    check_names,
    describe,
    external_files,
    io_names,
    name_graph,
    to_onnx,
    write_onnx,
)
from normfold.io.onnx_file import exporter_failure as _exporter_failure  # noqa: F401  (tests read it here)
from normfold.io.onnx_run import check_providers, open_session, run_onnx, runtime_name
from normfold.io.state_files import save_sets, stage_state_dict, write_state_dict, write_via_memory
from normfold.options import ExportOptions, check_lower_kept
from normfold.prepare import capture_options
from normfold.report import StepTimer

__all__ = [  # the state-dict writers keep their import path here
    "ExportOptions",
    "ExportResult",
    "TensorInfo",
    "export_model",
    "export_onnx",
    "run_onnx",
    "save_sets",
    "stage_state_dict",
    "write_state_dict",
]

logger = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
_ONNX_MAX_PROTO = 2 * 1024**3  # protobuf's 2 GB limit: weights of this size or more go to external data


@dataclass
class ExportResult:
    """What was written, what the written graph holds, and how it compared with the reference."""

    path: Path
    format: str
    parity: dict[str, ParityReport] = field(default_factory=dict)  # runtime -> report
    files: list[Path] = field(default_factory=list)
    opset: int | None = None
    ir_version: int | None = None  # of the ONNX file
    producer: str | None = None  # e.g. "pytorch 2.13.0"
    batchnorm_nodes: int | None = None  # BatchNormalization nodes left in the ONNX graph
    dynamic_batch: bool = True
    size_bytes: int = 0  # of every file written (model and external data)
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX op type -> nodes (main graph)
    parameters: int | None = None  # elements of every ONNX initializer
    inputs: list[TensorInfo] = field(default_factory=list)  # the ONNX graph's inputs
    outputs: list[TensorInfo] = field(default_factory=list)
    lowered: list[Lowered] = field(default_factory=list)  # BatchNormalizations written as other ops
    notes: list[str] = field(default_factory=list)  # e.g. why a BatchNormalization was not lowered

    def to_dict(self, *, parity: bool = True) -> dict[str, Any]:
        """As JSON; ``parity=False`` leaves the parity reports out (a run's report has them once)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "batchnorm_nodes": self.batchnorm_nodes,
            "dynamic_batch": self.dynamic_batch,
            "op_counts": self.op_counts,
            "parameters": self.parameters,
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            "lowered": [vars(low) for low in self.lowered],
            "notes": list(self.notes),
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


def check_for_out(options: ExportOptions, out: str | Path | None) -> None:
    """Refuse the options that only an ``.onnx`` file takes (its names, the providers that check it,
    the form of the norms that stay) for another ``out``, or for none: never ignored silently."""
    for name in ("input_names", "output_names", "providers", "lower_kept"):
        value = getattr(options, name)
        if value is not None and out is None:
            raise UsageError(f"{name}={value!r} applies to the .onnx file written, and no out= was given")
        if value is not None and FORMATS.get(Path(out).suffix, "onnx") != "onnx":  # unknown: the file rules
            raise UsageError(f"{name}={value!r} applies to an .onnx file, not out={out}")


def check_options(options: ExportOptions) -> None:
    """What can be refused in ``options`` before any work: the opset, the names, the providers, the
    form of the norms that stay."""
    check_lower_kept(options.lower_kept)
    check_opset(options.opset)
    check_names(options.input_names, options.output_names)
    check_providers(options.providers)


def export_model(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out: str | Path,
    *,
    original: nn.Module | Reference | None = None,
    program: torch.export.ExportedProgram | None = None,
    options: ExportOptions | None = None,
    rule: ParityRule | None = None,
    force: bool = False,
    steps: StepTimer | None = None,
) -> ExportResult:
    """Export ``model`` to ``out`` (``.onnx`` or ``.pt2``), check it, then move it into place.

    The written file must match ``original`` by the parity ``rule`` (default
    :class:`~normfold.ParityRule`) on the input sets of ``example_inputs``
    (:func:`normfold.check.reference.parity_sets`): ``original`` is the model before folding (its
    outputs, and its float64 run, are the reference) or a :class:`~normfold.check.reference.Reference`
    already made from it; without it the file is checked against ``model`` itself. ``program``,
    when given, is the already captured (and folded) program of ``model``
    (:attr:`normfold.FoldResult.program`): it is written as is, without a second capture.
    ``options``: the opset, dynamic axes, input/output names and onnxruntime providers
    (:class:`ExportOptions`). Raises :class:`UsageError` for options that cannot apply and
    :class:`ExportError` when any step or check fails, and writes nothing then. ``steps`` times
    the export and the check.
    """
    options = options or ExportOptions()
    check_options(options)
    rule = rule or ParityRule()
    with OutputSet({"out": out}, force=force, formats={"out": tuple(FORMATS)}) as files:
        inputs = tuple(example_inputs)
        if isinstance(original, nn.Module):
            original = make_reference(original, parity_sets(inputs, rule), rule)
        result = stage_export(
            model, inputs, files, reference=original, program=program, options=options, rule=rule, steps=steps
        )
        commit_export(files, result)
    return result


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out: str | Path,
    *,
    original: nn.Module | Reference | None = None,
    program: torch.export.ExportedProgram | None = None,
    options: ExportOptions | None = None,
    rule: ParityRule | None = None,
    force: bool = False,
    steps: StepTimer | None = None,
) -> ExportResult:
    """:func:`export_model` for an ``.onnx`` destination (checked in onnxruntime)."""
    if Path(out).suffix != ".onnx":
        raise UsageError(f"export_onnx writes .onnx files, got out={out}")
    return export_model(model, example_inputs, out, original=original, program=program, options=options,
                        rule=rule, force=force, steps=steps)  # fmt: skip


def stage_export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    files: OutputSet,
    *,
    reference: Reference | None = None,
    program: torch.export.ExportedProgram | None = None,
    capture: CaptureOptions | None = None,
    options: ExportOptions | None = None,
    rule: ParityRule | None = None,
    steps: StepTimer | None = None,
    opset: int | None = None,
) -> ExportResult:
    """Write ``files``' ``out`` into its staging folder and check it against ``reference``
    (:func:`export_model` without the commit, for a run that commits several files as one set).
    ``capture``: the dynamic axes already resolved by input index (default: those of
    ``options``). ``opset``: the former keyword for ``options.opset``."""
    options = options or ExportOptions()
    if opset is not None:
        options = dataclasses.replace(options, opset=opset)
    check_options(options)
    out = files.paths["out"]
    check_for_out(options, out)
    steps = steps or StepTimer()
    rule = rule or ParityRule()
    inputs = tuple(example_inputs)
    capture = capture or _capture_options(model, inputs, options)
    if reference is None:
        reference = make_reference(model, parity_sets(inputs, rule), rule)
    staged = files.staged("out")
    if FORMATS[out.suffix] == "onnx" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ExportError(
            f"out={out}: the model's weights are bfloat16, which ONNX Conv and Gemm do not accept; "
            "write a .pt2 instead, or cast the weights to float16 or float32"
        )
    if FORMATS[out.suffix] == "onnx":
        n_outputs = pytree.tree_structure(reference.outputs[0]).num_leaves
        names = io_names(model, len(inputs), n_outputs, options.input_names, options.output_names)
        providers = check_providers(options.providers)
        with steps("export (onnx)"):
            program = _dynamic_program(program or _export_program(model, inputs, capture), capture)
            onnx_model = to_onnx(program, inputs, options.opset)
            name_graph(onnx_model, axis_names(inputs, capture), *names)
            lowered, notes = lower_kept(OnnxView(onnx_model, {}), options.lower_kept) if options.lower_kept \
                else ([], [])  # fmt: skip
            proto = write_onnx(onnx_model, staged, inline_limit=_ONNX_MAX_PROTO)
            result = ExportResult(staged, "onnx", dynamic_batch=capture.dynamic_batch, **describe(proto))
            result.lowered, result.notes = lowered, notes
        with steps("check (onnxruntime)"):  # a failed check fails inside its step (the report names it)
            result.parity = _passed(_check_onnx(staged, reference, rule, providers))
    else:
        with steps("export (torch.export)"):
            program = _dynamic_program(program or _export_program(model, inputs, capture), capture)
            result = _export_pt2(program, staged, dynamic_batch=capture.dynamic_batch)
        with steps("check (torch.export.load)"):
            result.parity = _passed(_check_pt2(staged, reference, rule))
    result.path = out
    result.files, result.size_bytes = owned_files(staged, out)
    return result


def _capture_options(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], options: ExportOptions
) -> CaptureOptions:
    """``options``' batch and dynamic axes, an axis given by the forward's argument name
    looked up by position."""
    from normfold.inputs import forward_params

    axes = {}
    for key, spec in (options.dynamic_axes or {}).items():
        if isinstance(key, str):
            params = forward_params(model)
            if params is None or key not in params[0]:
                known = f"; it takes {', '.join(params[0])}" if params else ""
                raise UsageError(
                    f"ExportOptions.dynamic_axes[{key!r}]: {type(model).__name__}'s forward has no argument "
                    f"{key}{known}"
                )
            key = params[0].index(key)
        axes[key] = spec
    return capture_options(inputs, not options.static_batch, axes)


def _passed(parity: dict[str, ParityReport]) -> dict[str, ParityReport]:
    for runtime, report in parity.items():
        if not report.passed:
            raise ExportError(report.verdict(f"{runtime} output"))
    return parity


def _is_data_of(name: str, model_name: str) -> bool:
    return name.startswith(model_name + ".") and name.endswith(".data")


def onnx_inline_limit() -> int:
    """Weights of this many bytes or more go to external data (protobuf's 2 GB limit)."""
    return _ONNX_MAX_PROTO


def owned_files(staged: Path, out: Path) -> tuple[list[Path], int]:
    """The files of the ``.onnx`` staged at ``staged`` (it and its external data), as they will be
    named beside ``out`` once committed (the model last), and their size in bytes."""
    owned = [f for f in staged.parent.iterdir() if f == staged or _is_data_of(f.name, out.name)]
    return [out.parent / f.name for f in sorted(owned, key=lambda f: f == staged)], sum(
        f.stat().st_size for f in owned
    )


def commit_export(files: OutputSet, result: ExportResult | None = None) -> None:
    """Commit ``files`` (the export and whatever else the run staged); then remove the external
    data files the replaced ``.onnx`` used that the new one does not, only those normfold
    provably wrote and nothing else uses (:meth:`OutputSet.remove_replaced`)."""
    out = files.paths["out"]
    old = external_files(out) if out.suffix == ".onnx" and out.is_file() and not out.is_symlink() else set()
    written = set(files.commit())
    files.remove_replaced("out", old - written)


def _export_program(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], options: CaptureOptions
) -> torch.export.ExportedProgram:
    try:
        with quiet_exporter():
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(inputs, options))
    except Exception as e:
        hint = " (set ExportOptions.static_batch=True)" if options.dynamic_batch else ""
        raise ExportError(f"torch.export failed for {type(model).__name__}{hint}: {first_line(e)}") from e


def _dynamic_program(
    program: torch.export.ExportedProgram, options: CaptureOptions
) -> torch.export.ExportedProgram:
    """``program``, refused when it fixed an axis asked to be dynamic to one size."""
    for index, axis, name, size in static_axes(program, options):
        raise UsageError(
            f"ExportOptions.dynamic_axes[{index}]: the model fixes axis {axis} ({name}) at {size}, "
            "so it cannot vary"
        )
    return program


def _check_onnx(
    path: Path, reference: Reference, rule: ParityRule, providers: Sequence[str]
) -> dict[str, ParityReport]:
    """The written file run on each provider (one session each) and judged against ``reference``."""
    spec = pytree.tree_structure(reference.outputs[0])
    n_outputs = spec.num_leaves
    reports = {}
    for provider in providers:
        session = open_session(path, provider)

        def run(inputs: tuple[torch.Tensor, ...], session: Any = session, provider: str = provider) -> Any:
            flat = run_onnx(session, inputs, provider)  # looked up here: a test may wrap it
            if len(flat) != n_outputs:
                raise ExportError(f"ONNX graph has {len(flat)} outputs, the model returns {n_outputs}")
            return pytree.tree_unflatten(flat, spec)

        reports[runtime_name(provider)] = check(reference, run, rule)
    return reports


def _export_pt2(program: torch.export.ExportedProgram, path: Path, *, dynamic_batch: bool) -> ExportResult:
    try:
        write_via_memory(path, lambda f: torch.export.save(program, f))
    except NormfoldError:
        raise
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
