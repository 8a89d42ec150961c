"""The main job as one call: load -> fold -> verify in PyTorch -> export -> verify the export -> write.

Each CLI command makes exactly one call here and renders what comes back; nothing in this module
prints. ``on_step`` lets a caller show progress: it is called with a step name and must return a
context manager that wraps that step (the CLI shows a spinner). Each step's wall time lands in
``timings``.

Parity inputs: the batch is at least 2 (a batch of 1 can hide a wrong per-sample broadcast), so a
batch-1 input shape is widened to 2, and a batch-1 inputs file gets a second, seeded random sample
appended. With ``static_batch`` the exported graph is fixed to the given batch, and every check
runs on exactly that batch.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.calibration import RecalibrateResult, recalibrate
from normfold.errors import ParityError, UsageError
from normfold.export import (
    FORMATS,
    STATE_FORMATS,
    ExportResult,
    check_opset,
    commit_export,
    stage_export,
    stage_state_dict,
)
from normfold.files import OutputSet
from normfold.folding import FoldResult, analyse, fold
from normfold.graph import CaptureOptions
from normfold.load import LoadedModel, load_batches, load_inputs, load_model
from normfold.parity import ParityReport, ParityRule, Tolerance
from normfold.reference import (
    MAX_INPUT_ELEMENTS,
    Reference,
    check,
    input_limit_rule,
    make_reference,
    parity_sets,
    random_inputs,
    run_model,
)
from normfold.report import StepHook, StepTimer, versions, write_json

logger = logging.getLogger(__name__)


@dataclass
class InputSpec:
    """Where the example inputs come from (first given wins: file, shapes, the zoo's default)."""

    shapes: Sequence[Sequence[int]] | None = None
    dtype: torch.dtype | None = None
    file: str | Path | None = None
    seed: int = 0


@dataclass
class LayerRow:
    """One norm op as ``inspect`` and ``fold`` show it."""

    norm: str
    norm_type: str
    action: str  # "fold" (eager module and export), "fold (export)" or "keep"
    into: str | None
    pattern: str | None
    code: str | None
    reason: str | None  # why kept, or why folded in the export only


@dataclass
class FoldRun:
    """Everything the ``fold`` and ``inspect`` commands report."""

    source: str
    input_shapes: list[tuple[int, ...]]
    fold: FoldResult
    layers: list[LayerRow]
    parity: ParityReport | None = None  # folded vs original, in PyTorch
    export: ExportResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    recalibration: RecalibrateResult | None = None
    notes: list[str] = field(default_factory=list)  # how the model was taken (dtype, eval mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "recalibration": self.recalibration.to_dict() if self.recalibration is not None else None,
            "input_shapes": [list(s) for s in self.input_shapes],
            **self.fold.to_dict(),
            "notes": self.notes,
            "layers": [vars(r) for r in self.layers],
            "parity": {
                "pytorch": self.parity.to_dict() if self.parity is not None else None,
                **(
                    {k: v.to_dict() for k, v in self.export.parity.items()} if self.export is not None else {}
                ),
            },
            "export": self.export.to_dict() if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "versions": versions(),
        }


def inspect(
    source: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
    inputs: InputSpec | None = None,
    report: str | Path | None = None,
    force: bool = False,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Dry run: what :func:`fold` would do to each norm op of ``source``. Changes nothing and
    writes nothing but the ``report`` (JSON) when one is asked for."""
    spec = inputs or InputSpec()
    with OutputSet({"--report": report}, inputs=[source, spec.file], force=force) as files:
        steps = StepTimer(on_step)
        with steps("load"):
            loaded = load_model(source, model=model, model_args=model_args, trust=trust)
            example = _example_inputs(loaded, spec, optional=False)
        with steps("capture and plan"):
            result = analyse(loaded.model, example, CaptureOptions(dynamic_batch=False)).result
        shapes = [tuple(t.shape) for t in example]
        run = FoldRun(loaded.source, shapes, result, _layers(result), timings=steps.timings)
        run.notes = [*loaded.notes, *result.notes]
        _commit(files, run)
    return run


def fold_and_export(
    source: str | Path,
    out: str | Path | None = None,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
    inputs: InputSpec | None = None,
    static_batch: bool = False,
    opset: int | None = None,
    force: bool = False,
    rule: ParityRule | None = None,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    calibrate: str | Path | None = None,
    report: str | Path | None = None,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Load ``source``, fold it, prove parity in PyTorch, export to ``out`` and prove parity there.

    ``calibrate``: a file of batches (see :func:`normfold.load.load_batches`); the BatchNorm
    statistics are recalibrated on it first (:func:`normfold.recalibrate`), and parity is then
    judged against the recalibrated model.
    Parity (PyTorch, then the written file) is judged by ``rule`` (default
    :class:`~normfold.ParityRule`, with ``tolerances``/``rtol``/``atol`` applied) on the input
    sets of :func:`normfold.reference.parity_sets`, against a float64 run of the original.
    ``out`` and ``report`` follow the rule of :mod:`normfold.files`: checked before any work,
    committed together at the end. Raises :class:`~normfold.errors.ParityError` (nothing written)
    when the folded model differs from the original, :class:`~normfold.errors.ExportError` when
    export or its check fails.
    """
    check_opset(opset)
    rule = ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol)
    spec = inputs or InputSpec()
    outputs = {"--out": out, "--report": report}
    formats = {"--out": tuple(FORMATS)}
    with OutputSet(outputs, inputs=[source, spec.file, calibrate], force=force, formats=formats) as files:
        steps = StepTimer(on_step)
        run, reference, primary = _fold_and_verify(
            source, spec, rule, steps, model=model, model_args=model_args, trust=trust,
            static_batch=static_batch, calibrate=calibrate,
        )  # fmt: skip
        if out is not None:
            run.export = stage_export(
                run.fold.model,
                primary,
                files,
                program=run.fold.program,  # the folded capture itself: no second torch.export
                reference=reference,
                dynamic_batch=not static_batch,
                opset=opset,
                rule=rule,
                steps=steps,
            )
        run.timings = steps.timings
        _commit(files, run)
    return run


def _fold_and_verify(
    source: str | Path,
    spec: InputSpec,
    rule: ParityRule,
    steps: StepTimer,
    *,
    static_batch: bool,
    calibrate: str | Path | None,
    **load: Any,
) -> tuple[FoldRun, Reference, tuple[torch.Tensor, ...]]:
    """Load, recalibrate if asked, fold, and prove parity in PyTorch (raises ParityError)."""
    with steps("load"):
        loaded = load_model(source, **load)
        example = _example_inputs(loaded, spec, optional=False)
        # captured at the parity batch: torch.export specializes a batch of 1
        primary = example if static_batch else _widen_batch(example, spec.seed)
        sets = parity_sets(primary, rule, seed=spec.seed, given=spec.file is not None)
    recalibration = None
    if calibrate is not None:
        with steps("recalibrate"):
            recalibration = recalibrate(loaded.model, load_batches(calibrate), inplace=True)
    with steps("capture and fold"):
        result = fold(loaded.model, primary, dynamic_batch=not static_batch)
    run = FoldRun(loaded.source, [tuple(t.shape) for t in example], result, _layers(result))
    run.recalibration = recalibration
    run.notes = [*loaded.notes, *result.notes]
    with steps("verify (pytorch)"):
        reference = make_reference(loaded.model, sets, rule)
        run.parity = check(reference, lambda x: run_model(result.model, x, role="folded"), rule)
    if not run.parity.passed:
        raise ParityError(f"folded model differs from the original: {run.parity.failures()[0]}")
    return run, reference, primary


def _commit(files: OutputSet, run: FoldRun | WriteRun) -> None:
    """Write the report (if asked) into the set, then commit the set: data, report, model."""
    if "--report" in files.paths:
        write_json(files.staged("--report"), run.to_dict())
    export = getattr(run, "export", None)
    if export is not None:
        commit_export(files, export)
    else:
        files.commit()


@dataclass
class WriteRun:
    """What the ``recalibrate``, ``drop-bias`` and ``swap`` commands report: a transformed model
    written to ``out``."""

    source: str
    result: Any  # RecalibrateResult, BiasResult or SwapResult (each has to_dict)
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    export: ExportResult | None = None  # for a .pt2/.onnx out
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. a dtype kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": str(self.out),
            "notes": self.notes,
            **self.result.to_dict(),
            "export": self.export.to_dict() if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "versions": versions(),
        }


_WRITE_FORMATS = (*STATE_FORMATS, ".pt2", ".onnx")


def recalibrate_and_write(
    source: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
    force: bool = False,
    report: str | Path | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """Load ``source``, recalibrate its BatchNorm statistics on ``data``, write the state dict to
    ``out`` (``.pt``/``.pth``/``.safetensors``; it loads into the same architecture)."""
    outputs, formats = {"--out": out, "--report": report}, {"--out": STATE_FORMATS}
    with OutputSet(outputs, inputs=[source, data], force=force, formats=formats) as files:
        steps = StepTimer(on_step)
        with steps("load"):
            loaded = load_model(source, model=model, model_args=model_args, trust=trust)
            batches = load_batches(data)
        with steps("recalibrate"):
            result = recalibrate(loaded.model, batches, inplace=True)
        with steps("write"):
            stage_state_dict(result.model, files)
        run = WriteRun(loaded.source, result, Path(out), steps.timings, notes=loaded.notes)
        _commit(files, run)
    return run


def transform_and_write(
    source: str | Path,
    out: str | Path,
    transform: Callable[[nn.Module, tuple[torch.Tensor, ...]], Any],
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
    inputs: InputSpec | None = None,
    force: bool = False,
    report: str | Path | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """Load ``source``, apply ``transform(model, example_inputs)`` (returning a result with
    ``.model``), write the model to ``out``: a state dict (``.pt``/``.pth``/``.safetensors``) that
    loads into the transformed architecture, or a ``.pt2``/``.onnx`` export checked against it."""
    spec = inputs or InputSpec()
    outputs, formats = {"--out": out, "--report": report}, {"--out": _WRITE_FORMATS}
    with OutputSet(outputs, inputs=[source, spec.file], force=force, formats=formats) as files:
        steps = StepTimer(on_step)
        with steps("load"):
            loaded = load_model(source, model=model, model_args=model_args, trust=trust)
            example = _example_inputs(loaded, spec, optional=False)
        with steps("transform"):
            result = transform(loaded.model, example)
        run = WriteRun(loaded.source, result, Path(out), steps.timings, notes=loaded.notes)
        if Path(out).suffix in STATE_FORMATS:
            with steps("write"):
                stage_state_dict(result.model, files)
        else:
            run.export = stage_export(result.model, example, files, steps=steps)
        _commit(files, run)
    return run


def _example_inputs(
    loaded: LoadedModel, spec: InputSpec, *, optional: bool
) -> tuple[torch.Tensor, ...] | None:
    if spec.file is not None:
        return _follow_model_dtype(load_inputs(spec.file), loaded, spec.file)
    shapes = spec.shapes or loaded.input_shapes
    if not shapes:
        if optional:
            return None
        raise UsageError(
            f"no input shape known for {loaded.source}: "
            "pass --input-shape (e.g. 1,3,224,224) or --inputs file.pt"
        )
    for shape in shapes:
        try:
            dims = [operator.index(d) for d in shape if not isinstance(d, bool)]
        except TypeError:
            dims = []
        if not shape or len(dims) != len(shape) or min(dims) <= 0:
            raise UsageError(f"input shape {tuple(shape)} must have positive integer dimensions")
    # random_inputs checks the total size before it allocates
    return random_inputs(shapes, dtype=spec.dtype or _param_dtype(loaded.model), seed=spec.seed)


def _follow_model_dtype(
    inputs: tuple[torch.Tensor, ...], loaded: LoadedModel, file: str | Path
) -> tuple[torch.Tensor, ...]:
    """Given floating inputs follow a model the loader cast to its weights' dtype (noted)."""
    dtype = loaded.dtype
    if dtype is None or all(not t.is_floating_point() or t.dtype == dtype for t in inputs):
        return inputs
    was = sorted({str(t.dtype).removeprefix("torch.") for t in inputs if t.is_floating_point()})
    loaded.notes.append(
        f"the floating inputs in {file} ({', '.join(was)}) were cast to "
        f"{str(dtype).removeprefix('torch.')}, the dtype of the weights"
    )
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _widen_batch(inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """A batch of at least 2 for parity: append a seeded random sample to batch-1 inputs."""
    if not inputs or any(t.dim() == 0 or t.shape[0] != 1 for t in inputs):
        return inputs
    total = 2 * sum(t.numel() for t in inputs)
    if total > MAX_INPUT_ELEMENTS:  # before the widened copy is allocated
        shown = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise UsageError(
            f"inputs of shape {shown} are widened to a batch of 2 for a dynamic batch axis: "
            f"{total:,} elements, {input_limit_rule()}; pass --static-batch or smaller shapes"
        )
    gen = torch.Generator().manual_seed(seed + 1)
    widened = []
    for t in inputs:
        extra = torch.randn(t.shape, generator=gen).to(t.dtype) if t.is_floating_point() else t.clone()
        widened.append(torch.cat([t, extra]))
    return tuple(widened)


def _layers(result: FoldResult) -> list[LayerRow]:
    rows = [
        LayerRow(f.norm, f.norm_type, "fold" if f.where == "both" else "fold (export)", f.into, f.pattern,
                 None, f.note)
        for f in result.folded
    ]  # fmt: skip
    rows += [LayerRow(s.norm, s.norm_type, "keep", None, None, s.code, s.reason) for s in result.skipped]
    return rows
