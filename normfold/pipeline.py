"""The main jobs as one call each: load -> transform -> verify -> export -> write.

Each CLI command makes exactly one call here and renders what comes back; nothing in this module
prints. Every entry point runs the skeleton of :mod:`normfold.session` and takes the same few
option objects (:mod:`normfold.options`): where the model comes from (``source`` and
:class:`LoadOptions`), its example inputs (:class:`InputSpec`, or tensors), the parity rule
(:class:`normfold.ParityRule`), the export (:class:`ExportOptions`) and the files besides ``out``
(:class:`WriteOptions`). ``on_step`` lets a caller show progress: it is called with a step name
and must return a context manager that wraps that step (the CLI shows a spinner); each step's wall
time lands in the result's ``timings``.

Parity inputs (:mod:`normfold.inputs`): the batch is at least 2 (a batch of 1 can hide a wrong
per-sample broadcast), so a batch-1 input gets a second, seeded random sample, unless the export
fixes the batch (``ExportOptions.static_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normfold.check.parity import ParityRule
from normfold.check.reference import check, make_reference, parity_sets, run_model
from normfold.errors import NotFoldedError, ParityError, printable
from normfold.folding import FoldResult, capture_options
from normfold.folding import fold as fold_model
from normfold.inputs import axes_by_index, example_inputs, resized_sets, widen_batch, widening_explained
from normfold.io.export import check_for_out, check_options, save_sets
from normfold.io.files import ANY_FORMATS, MODEL_FORMATS, STATE_FORMATS
from normfold.io.load import load_batches
from normfold.options import ExportOptions, FoldOptions, InputSpec, LoadOptions, WriteOptions
from normfold.report import StepHook
from normfold.runs import FoldRun, LayerRow, WriteRun, layer_rows
from normfold.session import Session, Source, session
from normfold.transforms.calibration import recalibrate

if TYPE_CHECKING:
    from normfold.onnx_fold import OnnxFoldResult

__all__ = [
    "ExportOptions",
    "FoldOptions",
    "FoldRun",
    "InputSpec",
    "LayerRow",
    "LoadOptions",
    "WriteOptions",
    "WriteRun",
    "drop_bias_and_write",
    "fold_and_export",
    "fold_norms_and_write",
    "inspect",
    "recalibrate_and_write",
    "swap_and_write",
    "transform_and_write",
]

Inputs = InputSpec | torch.Tensor | Sequence[torch.Tensor] | None


def inspect(
    source: Source,
    *,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    folding: FoldOptions | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Dry run: what :func:`fold_and_export` would do to each norm op of ``source``, decided by
    the same engine on the same inputs (it folds a copy it then drops). Writes nothing but the
    report (``WriteOptions.report``, JSON) when one is asked for. ``FoldOptions.require_all``:
    raise :class:`~normfold.errors.NotFoldedError` when a norm would stay."""
    spec, load, folding, export, write = _defaults(inputs, load, folding, export, write)
    options = _asked(source, spec=spec, load=load, folding=folding, export=export, write=write)
    with session("inspect", None, write, options=options, inputs=[source, spec.file], formats={},
                 on_step=on_step, seed=spec.seed) as run:  # fmt: skip
        with run.steps("load"):
            loaded = run.load(source, load)
            example = example_inputs(loaded, spec)
            primary = example if export.static_batch else widen_batch(example, spec.seed)
        with run.steps("capture and fold"), widening_explained(example, primary):
            result = fold_model(
                loaded.model, primary, inplace=True, dynamic_batch=not export.static_batch,
                dynamic_axes=axes_by_index(export.dynamic_axes, loaded),
                reparameterize=folding.reparameterize,
            )  # fmt: skip
        run.record.run = found = FoldRun(
            loaded.source, [tuple(t.shape) for t in example], result, layer_rows(result)
        )
        found.notes = [*loaded.notes, *result.notes]
        if folding.require_all:
            with run.steps("require all"):
                require_all(result)
    return found


def fold_and_export(
    source: Source,
    out: str | Path | None = None,
    *,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    folding: FoldOptions | None = None,
    rule: ParityRule | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> FoldRun:
    """Load ``source`` (an ``nn.Module``, a file, or a factory spec ``package.module:callable``),
    fold it, prove parity in PyTorch, export to ``out`` (``.onnx`` or ``.pt2``; None: no export)
    and prove parity there, against the original model each time.

    ``inputs``: the example inputs (a tensor, one tensor per input of the forward, or an
    :class:`InputSpec`). Parity (PyTorch, then the written file) is judged by ``rule`` (default
    :class:`~normfold.ParityRule`) on the input sets of :func:`normfold.check.reference.parity_sets`,
    against a float64 run of the original (recalibrated first with ``FoldOptions.calibrate``).
    ``out`` and ``write``'s files follow the rule of :mod:`normfold.io.files`: checked before any
    work, committed together at the end; a failed run commits only its report and saved inputs.
    Raises :class:`~normfold.errors.ParityError` when the folded model differs from the original,
    :class:`~normfold.errors.ExportError` when export or its check fails,
    :class:`~normfold.errors.NotFoldedError` with ``FoldOptions.require_all`` when a norm stays.
    """
    spec, load, folding, export, write = _defaults(inputs, load, folding, export, write)
    check_options(export)
    check_for_out(export, out)  # before any work, as the file rules are
    rule = ParityRule.of(rule)
    options = _asked(source, out=out, spec=spec, load=load, folding=folding, rule=rule, export=export,
                     write=write)  # fmt: skip
    formats = {"out": MODEL_FORMATS, "save_inputs": (".pt",)}
    used = [source, spec.file, folding.calibrate]
    with session("fold", out, write, options=options, inputs=used, formats=formats, on_step=on_step,
                 seed=spec.seed) as run:  # fmt: skip
        folded, reference, primary, capture = _fold_and_verify(run, source, spec, load, folding, rule, export)
        if out is not None:
            folded.export = run.export(  # the folded capture itself: no second torch.export
                folded.fold.model, primary, program=folded.fold.program,
                reference=reference, capture=capture, options=export, rule=rule,
            )  # fmt: skip
        folded.timings = run.steps.timings
    return folded


def _fold_and_verify(
    run: Session,
    source: Source,
    spec: InputSpec,
    load: LoadOptions,
    folding: FoldOptions,
    rule: ParityRule,
    export: ExportOptions,
) -> tuple[FoldRun, Any, tuple[torch.Tensor, ...], Any]:
    """Load, recalibrate if asked, fold, and prove parity in PyTorch (raises ParityError)."""
    steps = run.steps
    with steps("load"):
        loaded = run.load(source, load)
        batches = load_batches(folding.calibrate) if folding.calibrate is not None else None
        example = example_inputs(loaded, spec, batches=batches)
        # captured at the parity batch: torch.export specializes a batch of 1
        primary = example if export.static_batch else widen_batch(example, spec.seed)
        axes = axes_by_index(export.dynamic_axes, loaded)
        capture = capture_options(primary, not export.static_batch, axes)
        given = spec.file is not None or spec.tensors is not None or (batches is not None and not spec.shapes)
        sets = parity_sets(primary, rule, seed=spec.seed, given=given)
        sets += resized_sets(loaded.model, primary, capture, spec.seed)
        if "save_inputs" in run.files.paths:
            save_sets(run.files.staged("save_inputs"), sets)
    recalibration = None
    if batches is not None:
        with steps("recalibrate"):
            recalibration = recalibrate(loaded.model, batches, inplace=True)
    with steps("capture and fold"), widening_explained(example, primary):
        result = fold_model(loaded.model, primary, dynamic_batch=not export.static_batch, dynamic_axes=axes,
                            reparameterize=folding.reparameterize)  # fmt: skip
    shapes = [tuple(t.shape) for t in example]
    run.record.run = folded = FoldRun(loaded.source, shapes, result, layer_rows(result))
    folded.recalibration = recalibration
    folded.notes = [*loaded.notes, *result.notes]
    if folding.require_all:
        with steps("require all"):
            require_all(result)
    with steps("verify (pytorch)"):
        reference = make_reference(loaded.model, sets, rule)
        folded.parity = check(reference, lambda x: run_model(result.model, x, role="folded"), rule)
        if not folded.parity.passed:
            raise ParityError(folded.parity.verdict("folded model"))
    return folded, reference, primary, capture


def recalibrate_and_write(
    source: Source,
    data: str | Path,
    out: str | Path,
    *,
    load: LoadOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """Load ``source``, recalibrate its BatchNorm statistics on the batches in ``data`` (see
    :func:`normfold.io.load.load_batches`), write the state dict to ``out``
    (``.pt``/``.pth``/``.safetensors``; it loads into the same architecture)."""
    _, load, _, _, write = _defaults(None, load, None, None, write)
    options = _asked(source, data=data, out=out, load=load, write=write)
    with session("recalibrate", out, write, options=options, inputs=[source, data],
                 formats={"out": STATE_FORMATS}, on_step=on_step) as run:  # fmt: skip
        with run.steps("load"):
            loaded = run.load(source, load)
            batches = load_batches(data)
        with run.steps("recalibrate"):
            result = recalibrate(loaded.model, batches, inplace=True)
        run.record.run = written = WriteRun(
            loaded.source, result, Path(out), run.steps.timings, notes=loaded.notes
        )
        run.export(result.model, batches[0], reference=None, capture=None, options=ExportOptions(),
                   rule=ParityRule())  # fmt: skip
    return written


def drop_bias_and_write(
    source: Source,
    out: str | Path,
    *,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """:func:`transform_and_write` with :func:`normfold.drop_redundant_biases` (outputs unchanged)."""
    from normfold.transforms.bias import drop_redundant_biases

    def transform(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Any:
        return drop_redundant_biases(model, x, inplace=True)

    return transform_and_write(source, out, transform, inputs=inputs, load=load, export=export, write=write,
                               on_step=on_step, command="drop-bias")  # fmt: skip


def swap_and_write(
    source: Source,
    out: str | Path,
    to: str,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """:func:`transform_and_write` with :func:`normfold.swap_norms` (``to``: ``group``, ``layer``,
    ``frozen`` or ``batch``; ``num_groups``/``group_size`` for GroupNorm)."""
    from normfold.transforms.swap import swap_norms

    def transform(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Any:
        return swap_norms(
            model, to, num_groups=num_groups, group_size=group_size, example_inputs=x, inplace=True
        )

    return transform_and_write(source, out, transform, inputs=inputs, load=load, export=export, write=write,
                               on_step=on_step, command="swap", needs_inputs=False)  # fmt: skip


def fold_norms_and_write(
    source: Source,
    out: str | Path,
    *,
    new_biases: bool = False,
    untie: bool = False,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
) -> WriteRun:
    """:func:`transform_and_write` with :func:`normfold.fold_norm_affine` (LayerNorm/RMSNorm/GroupNorm
    scale and shift into the Linear layers they feed; proved against the loaded model)."""
    from normfold.norm_affine import fold_norm_affine

    def transform(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Any:
        return fold_norm_affine(model, x, inplace=True, new_biases=new_biases, untie=untie)

    return transform_and_write(source, out, transform, inputs=inputs, load=load, export=export, write=write,
                               on_step=on_step, command="fold-norms")  # fmt: skip


def transform_and_write(
    source: Source,
    out: str | Path,
    transform: Callable[[nn.Module, tuple[torch.Tensor, ...]], Any],
    *,
    inputs: Inputs = None,
    load: LoadOptions | None = None,
    export: ExportOptions | None = None,
    write: WriteOptions | None = None,
    on_step: StepHook | None = None,
    command: str = "transform",
    needs_inputs: bool = True,
) -> WriteRun:
    """Load ``source``, apply ``transform(model, example_inputs)`` (returning a result with
    ``.model``), write the model to ``out``: a state dict (``.pt``/``.pth``/``.safetensors``) that
    loads into the transformed architecture, or a ``.pt2``/``.onnx`` export (a dynamic batch
    unless ``ExportOptions.static_batch``) checked against the transformed model. Without
    ``needs_inputs``, a state-dict output needs no example inputs (``transform`` gets None when
    none are known)."""
    spec, load, _, export, write = _defaults(inputs, load, None, export, write)
    check_options(export)
    options = _asked(source, out=out, spec=spec, load=load, export=export, write=write)
    with session(command, out, write, options=options, inputs=[source, spec.file],
                 formats={"out": ANY_FORMATS}, on_step=on_step, seed=spec.seed) as run:  # fmt: skip
        with run.steps("load"):
            loaded = run.load(source, load)
            optional = Path(out).suffix in STATE_FORMATS and not needs_inputs
            example = example_inputs(loaded, spec, optional=optional)
            primary = capture = None  # a state dict from a transform that needs no inputs
            if example is not None:
                primary = example if export.static_batch else widen_batch(example, spec.seed)
                axes = axes_by_index(export.dynamic_axes, loaded)
                capture = capture_options(primary, not export.static_batch, axes)
        with run.steps("transform"), widening_explained(example or (), primary or ()):
            result = transform(loaded.model, primary)
        run.record.run = written = WriteRun(
            loaded.source, result, Path(out), run.steps.timings, notes=loaded.notes
        )
        written.export = run.export(
            result.model, primary, reference=None, capture=capture, options=export, rule=ParityRule()
        )
    return written


def _defaults(
    inputs: Inputs,
    load: LoadOptions | None,
    folding: FoldOptions | None,
    export: ExportOptions | None,
    write: WriteOptions | None,
) -> tuple[InputSpec, LoadOptions, FoldOptions, ExportOptions, WriteOptions]:
    """The option objects, defaults for those not given; tensors given as ``inputs`` become an
    :class:`InputSpec` (checked: a tensor or a sequence of tensors)."""
    if inputs is None:
        spec = InputSpec()
    elif isinstance(inputs, InputSpec):
        spec = inputs
    else:
        from normfold.inputs import as_tensors

        spec = InputSpec(tensors=as_tensors(inputs))
    return (
        spec,
        load or LoadOptions(),
        folding or FoldOptions(),
        export or ExportOptions(),
        write or WriteOptions(),
    )


def _asked(source: Source, **options: Any) -> dict[str, Any]:
    """What the run was asked, for its report (a module given as is shows as its class)."""
    shown = f"module {type(source).__name__}" if isinstance(source, nn.Module) else source
    return {"source": shown, **options}


def require_all(result: FoldResult | OnnxFoldResult) -> None:
    """``FoldOptions.require_all``: a NotFoldedError listing every norm that stays, if one does."""
    if result.skipped:
        # one line per norm: its names escaped, so the only line breaks are these
        kept = "".join(f"\n  {printable(f'{s.norm}: {s.code}: {s.reason}')}" for s in result.skipped)
        raise NotFoldedError(
            f"{len(result.skipped)} of {len(result.folded) + len(result.skipped)} norm ops stay, and every "
            f"one was required to fold:{kept}"
        )
