"""``fold`` and ``inspect`` of an existing ``.onnx`` file, as one call each (what the CLI calls).

The ONNX counterparts of :func:`normfold.pipeline.fold_and_export` and
:func:`normfold.pipeline.inspect`, on the same skeleton (:func:`normfold.session.session`): the
outputs (``out``, the JSON report) checked before any work and committed as one set at the end, a
failed run committing only its report; the same option objects where they mean the same
(:class:`InputSpec`, :class:`FoldOptions`, :class:`normfold.ParityRule`, :class:`WriteOptions`);
the same records (one :class:`~normfold.runs.LayerRow` per norm) and the same
``FoldOptions.require_all`` rule (:class:`~normfold.errors.NotFoldedError` before any parity run,
nothing but the report written).

The work itself is :mod:`normfold.onnx_fold`'s: :func:`~normfold.onnx_fold.prepare` (the plan,
made once: ``require_all`` reads its records), then :func:`~normfold.onnx_fold.fold_planned`
(apply, ``onnx.checker``, write into the run's staging folder like an exported model:
:func:`normfold.io.onnx_file.write_onnx`, checked as written, weights over protobuf's 2 GB in a
sibling external-data file; then parity in onnxruntime of that file against the original). The
written file is described in an :class:`~normfold.io.export.ExportResult`. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from normfold.check.onnx_parity import onnx_sets
from normfold.check.parity import ParityReport, ParityRule
from normfold.errors import ParityError, UsageError
from normfold.io.export import ExportResult, owned_files, save_sets
from normfold.io.onnx_file import describe
from normfold.io.onnx_run import check_providers
from normfold.onnx_fold import OnnxFoldResult, fold_planned, load_onnx, prepare, records
from normfold.options import ExportOptions, FoldOptions, InputSpec, WriteOptions, check_lower_kept
from normfold.pipeline import require_all
from normfold.report import StepHook
from normfold.runs import LayerRow
from normfold.session import Session, session

__all__ = ["OnnxRun", "fold_onnx_file", "inspect_onnx"]

@dataclass
class OnnxRun:
    """Everything ``fold`` and ``inspect`` report for an ONNX model: the fields of
    :class:`~normfold.runs.FoldRun` that mean the same (``source``, ``layers``, ``export``,
    ``timings``, ``notes``, :meth:`summary`, :meth:`parity_reports`, :meth:`to_dict`), and the
    library's own :class:`~normfold.onnx_fold.OnnxFoldResult`."""

    source: str
    result: OnnxFoldResult
    layers: list[LayerRow]
    export: ExportResult | None = None  # the written file
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0  # initializer elements of the original graph

    @property
    def fold(self) -> OnnxFoldResult:
        """The records, under :class:`~normfold.runs.FoldRun`'s name (``merged``, ``not_merged``)."""
        return self.result

    @property
    def parity(self) -> ParityReport | None:
        """The folded model against the original, in onnxruntime (None for ``inspect``)."""
        return self.result.parity

    def parity_reports(self) -> dict[str, ParityReport]:
        return {"onnxruntime": self.parity} if self.parity is not None else {}

    def summary(self) -> dict[str, Any]:
        """:meth:`FoldRun.summary`'s keys; an ONNX graph has no MACs or exporter here."""
        r = self.result
        after = None if self.parity is None else _parameters(r.model)
        return {
            "source_format": "onnx",
            "norms": len(r.folded) + len(r.skipped),
            "folded": len(r.folded),
            "folded_in_export_only": 0,
            "kept": len(r.skipped),
            "blocks_merged": len(r.merged),
            "blocks_not_merged": len(r.not_merged),
            "params_before": self.params_before,
            "params_after": after,
            "macs_before": None,
            "macs_after": None,
            "ops_original": dict(r.ops_before),
            "ops_folded": dict(r.ops_after),
            "ops_written": None,
            "exporter_removed_batchnorms": None,
            "batchnorms_left": r.ops_after.get("BatchNormalization", 0) if r.ops_after else None,
        }

    def to_dict(self) -> dict[str, Any]:
        own = {k: v for k, v in self.result.to_dict().items() if k not in ("out", "parity", "notes")}
        return {
            "source": self.source,
            "summary": self.summary(),
            **own,
            "notes": self.notes,
            "parity": {k: v.to_dict() for k, v in self.parity_reports().items()},
            "export": self.export.to_dict(parity=False) if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def fold_onnx_file(
    source: str | Path,
    out: str | Path | None = None,
    *,
    inputs: InputSpec | None = None,
    folding: FoldOptions | None = None,
    rule: ParityRule | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> OnnxRun:
    """Fold the norms of the ONNX file ``source``, prove parity in onnxruntime against it, and
    write ``out`` (``.onnx``; None: write nothing but the report). ``inputs``: its shapes (by
    graph input name, or one per graph input in order), a file of tensors, or tensors.
    ``export``: only ``ExportOptions.lower_kept`` and ``providers`` apply (the file keeps the
    original's opset, names and shapes; the others are refused). Raises
    :class:`~normfold.errors.ParityError` (nothing but the report written) when the folded
    model differs, :class:`~normfold.errors.NotFoldedError` with ``FoldOptions.require_all``
    when a norm stays."""
    spec, folding, write = _checked(inputs, folding, write)
    export = _onnx_export(export)
    options = {"source": source, "out": out, "spec": spec, "folding": folding, "rule": rule, "write": write,
               "export": export}  # fmt: skip
    formats = {"out": (".onnx",), "save_inputs": (".pt",)}
    with session("fold", out, write, options=options, inputs=[source, spec.file], formats=formats,
                 on_step=on_step, seed=spec.seed) as run:  # fmt: skip
        with run.steps("load"):
            original, given = _load_source(source, spec)
        with run.steps("plan"):
            planned = prepare(original, given.get("inputs"), given.get("input_shapes"), Path(source),
                              reparameterize=folding.reparameterize)  # fmt: skip
        if "save_inputs" in run.files.paths:  # before the check: a failed run's inputs reproduce it
            sets = onnx_sets(planned.feeds, rule or ParityRule(), given="inputs" in given)
            save_sets(run.files.staged("save_inputs"), sets)
        if folding.require_all:
            with run.steps("require all"):
                require_all(records(original, planned))
        with run.steps("fold and verify (onnxruntime)"):
            staged = run.files.staged("out") if out is not None else None
            try:  # written into the run's staging folder first: parity is proved on that file
                result = fold_planned(original, planned, rule, given="inputs" in given, staged=staged,
                                      lower=export.lower_kept, providers=check_providers(export.providers))
            except ParityError as e:  # the failed run's report shows what was folded and how it compared
                if getattr(e, "result", None) is not None:
                    run.record.run = _run(source, original, e.result)
                raise
        run.record.run = folded = _run(source, original, result)
        if out is not None:  # the lowering's notes go with the file, as on the PyTorch path
            folded.export = _described(run, result)
            folded.notes = [n for n in folded.notes if n not in folded.export.notes]
        folded.timings = run.steps.timings
    return folded


def inspect_onnx(
    source: str | Path,
    *,
    inputs: InputSpec | None = None,
    folding: FoldOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> OnnxRun:
    """Dry run: what :func:`fold_onnx_file` would fold and keep (the same planner on the same
    inputs); nothing is applied, run or written but the report."""
    spec, folding, write = _checked(inputs, folding, write)
    options = {"source": source, "spec": spec, "folding": folding, "write": write}
    with session("inspect", None, write, options=options, inputs=[source, spec.file], formats={},
                 on_step=on_step, seed=spec.seed) as run:  # fmt: skip
        with run.steps("load"):
            original, given = _load_source(source, spec)
        with run.steps("plan"):  # its external data read beside the file
            planned = prepare(original, given.get("inputs"), given.get("input_shapes"), Path(source),
                              reparameterize=folding.reparameterize)  # fmt: skip
            result = records(original, planned)
        run.record.run = found = _run(source, original, result)
        if folding.require_all:
            with run.steps("require all"):
                require_all(result)
        found.timings = run.steps.timings
    return found


def _checked(
    inputs: InputSpec | None, folding: FoldOptions | None, write: WriteOptions | None
) -> tuple[InputSpec, FoldOptions, WriteOptions]:
    """The options, refusing those that need a PyTorch model."""
    spec, folding = inputs or InputSpec(), folding or FoldOptions()
    if spec.dtype is not None:
        raise UsageError(
            "InputSpec.dtype does not apply to an ONNX model: its graph declares its inputs' types"
        )
    if folding.calibrate is not None:
        raise UsageError(
            "FoldOptions.calibrate does not apply to an ONNX model: recalibrating BatchNorm statistics "
            "needs the PyTorch model"
        )
    return spec, folding, write or WriteOptions()


def _onnx_export(export: ExportOptions | None) -> ExportOptions:
    """``export`` checked for an ONNX model: ``lower_kept`` and ``providers`` apply, every other
    option set is refused by name."""
    export = export or ExportOptions()
    for f in dataclasses.fields(ExportOptions):
        if f.name not in ("lower_kept", "providers") and getattr(export, f.name) != f.default:
            raise UsageError(
                f"ExportOptions.{f.name} does not apply to an ONNX model: the folded file keeps the "
                "original's opset, names and input shapes"
            )
    check_lower_kept(export.lower_kept)
    check_providers(export.providers)
    return export


def _load_source(source: str | Path, spec: InputSpec) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model (sniffed, then parsed) and :func:`fold_onnx`'s input arguments from ``spec``."""
    original, _ = load_onnx(source)
    if spec.tensors is not None:
        return original, {"inputs": list(spec.tensors)}
    if spec.file is not None:
        from normfold.io.tensor_files import load_inputs

        return original, {"inputs": list(load_inputs(spec.file))}
    shapes = spec.shapes
    if shapes is not None and not isinstance(shapes, dict):
        shapes = [tuple(s) for s in shapes]
    return original, {"input_shapes": shapes}


def _run(source: str | Path, original: onnx.ModelProto, result: OnnxFoldResult) -> OnnxRun:
    rows = [LayerRow(f.norm, f.norm_type, "fold", f.into, f.pattern, None, None) for f in result.folded]
    rows += [LayerRow(s.norm, s.norm_type, "keep", None, None, s.code, s.reason) for s in result.skipped]
    shown = result.parity.notes if result.parity is not None else ()  # rendered with the parity table
    notes = [n for n in result.notes if n not in shown]
    return OnnxRun(str(source), result, rows, notes=notes, params_before=_parameters(original))


def _described(run: Session, result: OnnxFoldResult) -> ExportResult:
    """The folded model, already written into the run's staging folder (committed with the
    report), described as an export."""
    out = run.files.paths["out"]
    described = describe(result.model)
    first = described["inputs"][0].shape if described["inputs"] else []
    written = ExportResult(out, "onnx", dynamic_batch=bool(first) and isinstance(first[0], str), **described)
    written.parity = {"onnxruntime": result.parity} if result.parity is not None else {}
    written.lowered = list(result.lowered)
    shown = result.parity.notes if result.parity is not None else ()
    written.notes = [n for n in result.notes if n not in shown]  # the rest are the lowering's (fold_planned)
    written.files, written.size_bytes = owned_files(run.files.staged("out"), out)
    return written


def _parameters(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer)
