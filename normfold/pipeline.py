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

import contextlib
import logging
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.calibration import RecalibrateResult, recalibrate
from normfold.errors import NotFoldedError, ParityError, TraceError, UsageError, first_line, printable
from normfold.export import (
    STATE_FORMATS,
    ExportResult,
    check_opset,
    commit_export,
    save_sets,
    stage_export,
    stage_state_dict,
)
from normfold.files import ANY_FORMATS, MODEL_FORMATS, OutputSet
from normfold.folding import FoldResult, capture_options, fold
from normfold.graph import CaptureOptions, axis_names
from normfold.limits import MAX_INPUT_ELEMENTS, check_size, input_limit_rule
from normfold.load import LoadedModel, load_batches, load_inputs, load_model
from normfold.parity import ParityReport, ParityRule, Tolerance
from normfold.reference import (
    InputSet,
    Reference,
    check,
    make_reference,
    parity_sets,
    random_inputs,
    run_model,
)
from normfold.report import RunRecord, StepHook, StepTimer, write_json

logger = logging.getLogger(__name__)


@dataclass
class InputSpec:
    """Where the example inputs come from (first given wins: file, shapes, the zoo's default).

    ``shapes``: one shape per positional input of the model's forward, in order, or a mapping
    of the forward's argument names to shapes. ``dtype``: of the generated floating inputs
    (default: the weights'); it must match the weights' floating dtype."""

    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None
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

    def summary(self) -> dict[str, Any]:
        """Counts a pipeline can check: norms folded and kept, ops before/after, the written file.

        ``exporter_removed_batchnorms``: BatchNormalization ops the folded graph still had that
        the written ONNX graph does not (the exporter fused them on its own); None without ONNX."""
        f, e = self.fold, self.export
        onnx_file = e is not None and e.format == "onnx"
        kept_bn = f.ops_after.get("BatchNormalization", 0)
        return {
            "norms": len(f.folded) + len(f.skipped),
            "folded": len(f.folded),
            "folded_in_export_only": len(f.export_only),
            "kept": len(f.skipped),
            "blocks_merged": len(f.merged),
            "blocks_not_merged": len(f.not_merged),
            "params_before": f.params_before,
            "params_after": f.params_after,
            "ops_original": f.ops_before,
            "ops_folded": f.ops_after,
            "ops_written": e.op_counts if onnx_file else None,
            "exporter_removed_batchnorms": max(kept_bn - e.batchnorm_nodes, 0) if onnx_file else None,
        }

    def to_dict(self) -> dict[str, Any]:
        fold = {k: v for k, v in self.fold.to_dict().items() if k not in ("ops_before", "ops_after")}
        return {
            "source": self.source,
            "input_shapes": [list(s) for s in self.input_shapes],
            "summary": self.summary(),
            "recalibration": self.recalibration.to_dict() if self.recalibration is not None else None,
            **fold,
            "notes": self.notes,
            "parity": {
                "pytorch": self.parity.to_dict() if self.parity is not None else None,
                **(
                    {k: v.to_dict() for k, v in self.export.parity.items()} if self.export is not None else {}
                ),
            },
            "export": self.export.to_dict(parity=False) if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def inspect(
    source: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
    inputs: InputSpec | None = None,
    static_batch: bool = False,
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None = None,
    require_all: bool = False,
    reparameterize: bool = True,
    report: str | Path | None = None,
    force: bool = False,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Dry run: what :func:`fold_and_export` would do to each norm op of ``source``, decided by
    the same engine on the same inputs (it folds a copy it then drops). Writes nothing but the
    ``report`` (JSON) when one is asked for. ``require_all``: raise
    :class:`~normfold.errors.NotFoldedError` when a norm would stay."""
    spec = inputs or InputSpec()
    options = dict(source=source, model=model, model_args=model_args, trust=trust, inputs=spec,
                   static_batch=static_batch, dynamic_axes=dynamic_axes, require_all=require_all,
                   reparameterize=reparameterize, report=report, force=force)  # fmt: skip
    with OutputSet({"--report": report}, inputs=[source, spec.file], force=force) as files:
        record = RunRecord("inspect", options, StepTimer(on_step), seed=spec.seed)
        with _reported(files, record):
            with record.steps("load"):
                loaded = _load(files, source, model=model, model_args=model_args, trust=trust)
                example = _example_inputs(loaded, spec, optional=False)
                primary = example if static_batch else _widen_batch(example, spec.seed)
            with record.steps("capture and fold"):
                result = fold(
                    loaded.model, primary, inplace=True, dynamic_batch=not static_batch,
                    dynamic_axes=_axes_by_index(dynamic_axes, loaded), reparameterize=reparameterize,
                )  # fmt: skip
            shapes = [tuple(t.shape) for t in example]
            record.run = run = FoldRun(loaded.source, shapes, result, _layers(result))
            run.notes = [*loaded.notes, *result.notes]
            if require_all:
                with record.steps("require all"):
                    _require_all(result)
            _commit(files, record)
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
    require_all: bool = False,
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None = None,
    reparameterize: bool = True,
    report: str | Path | None = None,
    save_inputs: str | Path | None = None,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Load ``source``, fold it, prove parity in PyTorch, export to ``out`` and prove parity there.

    ``calibrate``: a file of batches (see :func:`normfold.load.load_batches`); the BatchNorm
    statistics are recalibrated on it first (:func:`normfold.recalibrate`), and parity is then
    judged against the recalibrated model.
    Parity (PyTorch, then the written file) is judged by ``rule`` (default
    :class:`~normfold.ParityRule`, with ``tolerances``/``rtol``/``atol`` applied) on the input
    sets of :func:`normfold.reference.parity_sets`, against a float64 run of the original.
    ``require_all``: raise :class:`~normfold.errors.NotFoldedError` (nothing written but the
    report) when a norm stays. ``dynamic_axes``: ``{input (index or forward argument name):
    {axis: name}}`` axes the export keeps dynamic besides the batch (e.g. ``{0: {2: "height"}}``);
    every check then also runs on a set with those axes (and the batch) at a second size.
    ``save_inputs``: a ``.pt`` file of the parity input sets
    (``{set name: [tensors]}``, loadable with ``torch.load(weights_only=True)``), written also
    when the run fails, to reproduce it. ``reparameterize``: merge RepVGG-style branches into one
    conv too (:func:`normfold.reparameterize`; on by default here, as in ``normfold fold``).
    ``out``, ``report`` and ``save_inputs`` follow the rule of :mod:`normfold.files`: checked
    before any work, committed together at the end; a failed run commits only its report and
    saved inputs. Raises :class:`~normfold.errors.ParityError` when the folded model differs from
    the original, :class:`~normfold.errors.ExportError` when export or its check fails.
    """
    check_opset(opset)
    rule = ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol)
    spec = inputs or InputSpec()
    options = dict(source=source, out=out, model=model, model_args=model_args, trust=trust, inputs=spec,
                   static_batch=static_batch, opset=opset, force=force, rule=rule, calibrate=calibrate,
                   require_all=require_all, dynamic_axes=dynamic_axes, reparameterize=reparameterize,
                   report=report, save_inputs=save_inputs)  # fmt: skip
    outputs = {"--out": out, "--report": report, "--save-inputs": save_inputs}
    formats = {"--out": MODEL_FORMATS, "--save-inputs": (".pt",)}
    with OutputSet(outputs, inputs=[source, spec.file, calibrate], force=force, formats=formats) as files:
        record = RunRecord("fold", options, StepTimer(on_step), seed=spec.seed)
        with _reported(files, record):
            how = _How(static_batch, calibrate, require_all, dynamic_axes, reparameterize)
            run, reference, primary, capture = _fold_and_verify(
                source, spec, rule, record, files, how, model=model, model_args=model_args, trust=trust
            )
            if out is not None:
                run.export = stage_export(
                    run.fold.model,
                    primary,
                    files,
                    program=run.fold.program,  # the folded capture itself: no second torch.export
                    reference=reference,
                    capture=capture,
                    opset=opset,
                    rule=rule,
                    steps=record.steps,
                )
            run.timings = record.steps.timings
            _commit(files, record)
    return run


@dataclass(frozen=True)
class _How:
    """How :func:`fold_and_export` folds: its options past loading and parity."""

    static_batch: bool
    calibrate: str | Path | None
    require_all: bool
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None
    reparameterize: bool


def _fold_and_verify(
    source: str | Path,
    spec: InputSpec,
    rule: ParityRule,
    record: RunRecord,
    files: OutputSet,
    how: _How,
    **load: Any,
) -> tuple[FoldRun, Reference, tuple[torch.Tensor, ...], CaptureOptions]:
    """Load, recalibrate if asked, fold, and prove parity in PyTorch (raises ParityError)."""
    static_batch, calibrate, require_all = how.static_batch, how.calibrate, how.require_all
    steps = record.steps
    with steps("load"):
        loaded = _load(files, source, **load)
        example = _example_inputs(loaded, spec, optional=False)
        # captured at the parity batch: torch.export specializes a batch of 1
        primary = example if static_batch else _widen_batch(example, spec.seed)
        axes = _axes_by_index(how.dynamic_axes, loaded)
        capture = capture_options(primary, not static_batch, axes)
        sets = parity_sets(primary, rule, seed=spec.seed, given=spec.file is not None)
        sets += _resized_sets(loaded.model, primary, capture, spec.seed)
        if "--save-inputs" in files.paths:
            save_sets(files.staged("--save-inputs"), sets)
    recalibration = None
    if calibrate is not None:
        with steps("recalibrate"):
            recalibration = recalibrate(loaded.model, load_batches(calibrate), inplace=True)
    with steps("capture and fold"):
        result = fold(loaded.model, primary, dynamic_batch=not static_batch, dynamic_axes=axes,
                      reparameterize=how.reparameterize)  # fmt: skip
    record.run = run = FoldRun(loaded.source, [tuple(t.shape) for t in example], result, _layers(result))
    run.recalibration = recalibration
    run.notes = [*loaded.notes, *result.notes]
    if require_all:
        with steps("require all"):
            _require_all(result)
    with steps("verify (pytorch)"):
        reference = make_reference(loaded.model, sets, rule)
        run.parity = check(reference, lambda x: run_model(result.model, x, role="folded"), rule)
        if not run.parity.passed:
            raise ParityError(run.parity.verdict("folded model"))
    return run, reference, primary, capture


def _axes_by_index(
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None, loaded: LoadedModel
) -> dict[int, Mapping[int, str]]:
    """``dynamic_axes`` keyed by input position (argument names looked up in the forward)."""
    out: dict[int, Mapping[int, str]] = {}
    params = _forward_params(loaded.model)
    for key, axes in (dynamic_axes or {}).items():
        if isinstance(key, str):
            if params is None or key not in params[0]:
                known = f"; it takes {', '.join(params[0])}" if params else ""
                raise UsageError(f"--dynamic {key}: {loaded.source}'s forward has no argument {key}{known}")
            key = params[0].index(key)
        out[key] = axes
    return out


def _resized_sets(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], capture: CaptureOptions, seed: int
) -> list[InputSet]:
    """One more input set with every dynamic axis at a second size (the batch one more, another
    axis twice its size, else one more, whichever the original model accepts), so the checks prove
    the written graph right at a size it was not captured at. An axis at which the model accepts
    neither cannot vary: a UsageError names it. None without axes besides the batch (a dynamic
    batch alone is not worth a fourth set on every run)."""
    if not capture.axes:
        return []
    names = axis_names(inputs, capture)
    sizes: dict[str, int] = {}
    for i, axes in enumerate(names):
        for axis, name in axes.items():
            size = inputs[i].shape[axis]
            if name == "batch":
                sizes[name] = size + 1
                continue
            tried = [2 * size, size + 1]
            found = next((n for n in tried if _runs_at(model, inputs, {(i, axis): n}, seed)), None)
            if found is None:
                raise UsageError(
                    f"--dynamic {name} (input {i}, axis {axis}): the model fails at sizes "
                    f"{tried[0]} and {tried[1]}, so the axis cannot vary"
                )
            sizes[name] = found
    at = {(i, a): sizes[n] for i, axes in enumerate(names) for a, n in axes.items()}
    resized = _resized(model, inputs, at, seed)
    label = ",".join(f"{n}={v}" for n, v in sizes.items())
    return [InputSet(f"resized[{label}]", resized)]


def _resized(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], at: Mapping[tuple[int, int], int], seed: int
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs like ``inputs`` with the axes ``at`` (``(input, axis) -> size``) changed;
    non-floating inputs are repeated along them."""
    shapes = [tuple(at.get((i, a), d) for a, d in enumerate(t.shape)) for i, t in enumerate(inputs)]
    check_size(shapes)
    fresh = random_inputs(shapes, dtype=_param_dtype(model), seed=seed + 2)
    out = []
    for t, f, shape in zip(inputs, fresh, shapes, strict=True):
        if not t.is_floating_point():  # integer inputs keep their values: tile and cut to size
            reps = [-(-n // d) for n, d in zip(shape, t.shape, strict=True)]
            f = t.repeat(*reps)[tuple(slice(0, n) for n in shape)]
        out.append(f)
    return tuple(out)


def _runs_at(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], at: Mapping[tuple[int, int], int], seed: int
) -> bool:
    try:
        run_model(model, _resized(model, inputs, at, seed))
    except (UsageError, TraceError):
        return False
    return True


def _require_all(result: FoldResult) -> None:
    if result.skipped:
        # one line per norm: its names escaped, so the only line breaks are these
        kept = "".join(f"\n  {printable(f'{s.norm}: {s.code}: {s.reason}')}" for s in result.skipped)
        raise NotFoldedError(
            f"{len(result.skipped)} of {len(result.folded) + len(result.skipped)} norm ops stay, and every "
            f"one was required to fold:{kept}"
        )


@contextlib.contextmanager
def _reported(files: OutputSet, record: RunRecord) -> Iterator[None]:
    """A run that fails after its outputs were checked still commits its report (status
    ``failed``, the failing step and message) and its saved inputs, then the error goes on."""
    try:
        yield
    except Exception as e:
        try:
            if "--report" in files.paths:
                write_json(files.staged("--report"), record.to_dict(e))
            files.commit(["--report", "--save-inputs"])
        except Exception as failed:  # never hide the run's own error behind the report's
            logger.info("the report of the failed run was not written: %s", first_line(failed))
        raise


def _commit(files: OutputSet, record: RunRecord) -> None:
    """Write the report (if asked) into the set, then commit the set: data, model, report. A
    failure here (a full disk, no free inode) is the step ``write`` in a failed run's report."""
    with record.steps.untimed("write"):
        if "--report" in files.paths:
            write_json(files.staged("--report"), record.to_dict())
        export = getattr(record.run, "export", None)
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
        }


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
    options = dict(source=source, data=data, out=out, model=model, model_args=model_args, trust=trust,
                   force=force, report=report)  # fmt: skip
    with OutputSet(outputs, inputs=[source, data], force=force, formats=formats) as files:
        record = RunRecord("recalibrate", options, StepTimer(on_step))
        steps = record.steps
        with _reported(files, record):
            with steps("load"):
                loaded = _load(files, source, model=model, model_args=model_args, trust=trust)
                batches = load_batches(data)
            with steps("recalibrate"):
                result = recalibrate(loaded.model, batches, inplace=True)
            with steps("write"):
                stage_state_dict(result.model, files)
            record.run = run = WriteRun(loaded.source, result, Path(out), steps.timings, notes=loaded.notes)
            _commit(files, record)
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
    command: str = "transform",
) -> WriteRun:
    """Load ``source``, apply ``transform(model, example_inputs)`` (returning a result with
    ``.model``), write the model to ``out``: a state dict (``.pt``/``.pth``/``.safetensors``) that
    loads into the transformed architecture, or a ``.pt2``/``.onnx`` export checked against it."""
    spec = inputs or InputSpec()
    outputs, formats = {"--out": out, "--report": report}, {"--out": ANY_FORMATS}
    options = dict(source=source, out=out, model=model, model_args=model_args, trust=trust, inputs=spec,
                   force=force, report=report)  # fmt: skip
    with OutputSet(outputs, inputs=[source, spec.file], force=force, formats=formats) as files:
        record = RunRecord(command, options, StepTimer(on_step), seed=spec.seed)
        steps = record.steps
        with _reported(files, record):
            with steps("load"):
                loaded = _load(files, source, model=model, model_args=model_args, trust=trust)
                example = _example_inputs(loaded, spec, optional=False)
            with steps("transform"):
                result = transform(loaded.model, example)
            record.run = run = WriteRun(loaded.source, result, Path(out), steps.timings, notes=loaded.notes)
            if Path(out).suffix in STATE_FORMATS:
                with steps("write"):
                    stage_state_dict(result.model, files)
            else:
                run.export = stage_export(result.model, example, files, steps=steps)
            _commit(files, record)
    return run


def _load(files: OutputSet, source: str | Path, **options: Any) -> LoadedModel:
    """:func:`load_model`; the source files of the code it ran are inputs of the run too (a
    ``report`` over the factory's own module is refused like one over the weights)."""
    loaded = load_model(source, **options)
    files.add_inputs(loaded.code_files)
    return loaded


def _example_inputs(
    loaded: LoadedModel, spec: InputSpec, *, optional: bool
) -> tuple[torch.Tensor, ...] | None:
    if spec.file is not None:
        return _follow_model_dtype(load_inputs(spec.file), loaded, spec.file)
    shapes = _in_order(spec.shapes, loaded) if spec.shapes else loaded.input_shapes
    if not shapes:
        if optional:
            return None
        raise UsageError(
            f"no input shape known for {loaded.source}: "
            "pass --input-shape (e.g. 1,3,224,224) or --inputs file.pt"
        )
    weights = _param_dtype(loaded.model)
    if (
        spec.dtype is not None
        and spec.dtype != weights
        and any(p.is_floating_point() for p in loaded.model.parameters())
    ):
        raise UsageError(
            f"--input-dtype {str(spec.dtype).removeprefix('torch.')} differs from the weights' "
            f"{str(weights).removeprefix('torch.')}: inputs follow the weights (omit --input-dtype)"
        )
    for shape in shapes:
        try:
            dims = [operator.index(d) for d in shape if not isinstance(d, bool)]
        except TypeError:
            dims = []
        if not shape or len(dims) != len(shape) or min(dims) <= 0:
            raise UsageError(f"input shape {tuple(shape)} must have positive integer dimensions")
    # random_inputs checks the total size before it allocates
    return random_inputs(shapes, dtype=spec.dtype or weights, seed=spec.seed)


def _in_order(
    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]], loaded: LoadedModel
) -> list[Sequence[int]]:
    """The shapes as positional inputs of the model's forward: named ones put in its argument
    order, and either form checked against how many inputs it takes."""
    params = _forward_params(loaded.model)
    if params is None:  # no signature to check (a builtin forward): take them as given
        return list(shapes.values()) if isinstance(shapes, Mapping) else list(shapes)
    names, required, varargs = params
    takes = f"{loaded.source}'s forward({', '.join(names)}{', *args' if varargs else ''})"
    if isinstance(shapes, Mapping):
        unknown = [n for n in shapes if n not in names]
        if unknown:
            raise UsageError(f"--input-shape names {', '.join(unknown)}: {takes} has no such argument")
        last = max(names.index(n) for n in shapes)
        missing = [n for n in names[: max(last + 1, required)] if n not in shapes]
        if missing:
            raise UsageError(f"--input-shape: {takes} needs a shape for {', '.join(missing)} too")
        return [shapes[n] for n in names[: last + 1]]
    if len(shapes) < required or (len(shapes) > len(names) and not varargs):
        count = f"{required}" if required == len(names) or varargs else f"{required} to {len(names)}"
        raise UsageError(
            f"{takes} takes {count} input(s), got {len(shapes)} --input-shape: "
            "give one --input-shape per input, in order or as name:1,3,224,224"
        )
    return list(shapes)


def _forward_params(model: nn.Module) -> tuple[list[str], int, bool] | None:
    """(positional argument names, how many are required, whether it takes ``*args``)."""
    import inspect as pyinspect

    try:
        signature = pyinspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = (pyinspect.Parameter.POSITIONAL_ONLY, pyinspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in signature.parameters.values() if p.kind in kinds]
    required = sum(p.default is pyinspect.Parameter.empty for p in params)
    varargs = any(p.kind is pyinspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    return [p.name for p in params], required, varargs


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
