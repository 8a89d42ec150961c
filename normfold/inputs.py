"""Example inputs of a run: from tensors, a file, shapes or calibration batches, and the input
sets a dynamic axis adds.

The batch is at least 2 for parity (a batch of 1 can hide a wrong per-sample broadcast): a batch-1
input gets a second, seeded random sample appended (:func:`widen_batch`) unless the export fixes
the batch (``ExportOptions.static_batch``), in which case every check runs on exactly the given
batch. With dynamic axes besides the batch, one more input set has each of them at a second size
(:func:`resized_sets`), so the checks prove the written graph at a size it was not captured at.

Messages name the API's options (``InputSpec.shapes``, ``ExportOptions.dynamic_axes``); the CLI
shows its own options for them.
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import operator
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from normfold.check.reference import InputSet, random_inputs, run_model
from normfold.engine.capture import CaptureOptions, axis_names
from normfold.errors import TraceError, UsageError
from normfold.io.limits import MAX_INPUT_ELEMENTS, check_size, input_limit_rule
from normfold.io.load import LoadedModel, load_inputs
from normfold.options import InputSpec


def axes_by_index(
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None, loaded: LoadedModel
) -> dict[int, Mapping[int, str]]:
    """``dynamic_axes`` keyed by input position (argument names looked up in the forward)."""
    out: dict[int, Mapping[int, str]] = {}
    params = forward_params(loaded.model)
    for key, axes in (dynamic_axes or {}).items():
        if isinstance(key, str):
            if params is None or key not in params[0]:
                known = f"; it takes {', '.join(params[0])}" if params else ""
                raise UsageError(
                    f"ExportOptions.dynamic_axes[{key!r}]: {loaded.source}'s forward has no argument "
                    f"{key}{known}"
                )
            key = params[0].index(key)
        out[key] = axes
    return out


def resized_sets(
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
                    f"ExportOptions.dynamic_axes {name} (input {i}, axis {axis}): the model fails at sizes "
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


def example_inputs(
    loaded: LoadedModel,
    spec: InputSpec,
    *,
    optional: bool = False,
    batches: Sequence[tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """The run's example inputs, from the first of: ``spec.tensors``, ``spec.file``,
    ``spec.shapes`` (seeded random), the first of ``batches`` (calibration data: real inputs),
    the shapes the model's factory declares. None when there are none and ``optional``."""
    if spec.tensors is not None:
        return _follow_model_dtype(as_tensors(spec.tensors), loaded, "InputSpec.tensors")
    if spec.file is not None:
        return _follow_model_dtype(load_inputs(spec.file), loaded, spec.file)
    if not spec.shapes and batches:
        return _follow_model_dtype(tuple(batches[0]), loaded, "the first calibration batch")
    shapes = _in_order(spec.shapes, loaded) if spec.shapes else loaded.input_shapes
    if not shapes:
        if optional:
            return None
        raise UsageError(
            f"no input shape known for {loaded.source}: "
            "give InputSpec.shapes (e.g. 1,3,224,224) or InputSpec.file (a .pt of tensors)"
        )
    weights = _param_dtype(loaded.model)
    if (
        spec.dtype is not None
        and spec.dtype != weights
        and any(p.is_floating_point() for p in loaded.model.parameters())
    ):
        raise UsageError(
            f"InputSpec.dtype {str(spec.dtype).removeprefix('torch.')} differs from the weights' "
            f"{str(weights).removeprefix('torch.')}: inputs follow the weights (leave InputSpec.dtype out)"
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


def as_tensors(inputs: object) -> tuple[torch.Tensor, ...]:
    """``inputs`` (one tensor, or a sequence of them: one per positional input) as a tuple;
    anything else is a UsageError naming what was given."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    shown = type(inputs).__name__
    if isinstance(inputs, (list, tuple)):
        shown += " of " + ", ".join(sorted({type(t).__name__ for t in inputs})) if inputs else " (empty)"
    raise UsageError(
        f"inputs must be a tensor, a sequence of tensors (one per input of the forward) or an "
        f"InputSpec, got a {shown}"
    )


def _in_order(
    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]], loaded: LoadedModel
) -> list[Sequence[int]]:
    """The shapes as positional inputs of the model's forward: named ones put in its argument
    order, and either form checked against how many inputs it takes."""
    params = forward_params(loaded.model)
    if params is None:  # no signature to check (a builtin forward): take them as given
        return list(shapes.values()) if isinstance(shapes, Mapping) else list(shapes)
    names, required, varargs = params
    takes = f"{loaded.source}'s forward({', '.join(names)}{', *args' if varargs else ''})"
    if isinstance(shapes, Mapping):
        unknown = [n for n in shapes if n not in names]
        if unknown:
            raise UsageError(f"InputSpec.shapes names {', '.join(unknown)}: {takes} has no such argument")
        last = max(names.index(n) for n in shapes)
        missing = [n for n in names[: max(last + 1, required)] if n not in shapes]
        if missing:
            raise UsageError(f"InputSpec.shapes: {takes} needs a shape for {', '.join(missing)} too")
        return [shapes[n] for n in names[: last + 1]]
    if len(shapes) < required or (len(shapes) > len(names) and not varargs):
        count = f"{required}" if required == len(names) or varargs else f"{required} to {len(names)}"
        raise UsageError(
            f"{takes} takes {count} input(s), got {len(shapes)} InputSpec.shapes: "
            "give one shape per input, in order or by argument name"
        )
    return list(shapes)


def forward_params(model: nn.Module) -> tuple[list[str], int, bool] | None:
    """(positional argument names, how many are required, whether it takes ``*args``)."""
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


def widen_batch(inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """A batch of at least 2 for parity: append a seeded random sample to batch-1 inputs."""
    if not inputs or any(t.dim() == 0 or t.shape[0] != 1 for t in inputs):
        return inputs
    total = 2 * sum(t.numel() for t in inputs)
    if total > MAX_INPUT_ELEMENTS:  # before the widened copy is allocated
        shown = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise UsageError(
            f"inputs of shape {shown} are widened to a batch of 2 for a dynamic batch axis: "
            f"{total:,} elements, {input_limit_rule()}; set ExportOptions.static_batch=True or give "
            "smaller shapes"
        )
    gen = torch.Generator().manual_seed(seed + 1)
    widened = []
    for t in inputs:
        extra = torch.randn(t.shape, generator=gen).to(t.dtype) if t.is_floating_point() else t.clone()
        widened.append(torch.cat([t, extra]))
    return tuple(widened)


@contextlib.contextmanager
def widening_explained(given: tuple[torch.Tensor, ...], used: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """A trace error on inputs :func:`widen_batch` widened names the shapes the caller gave too
    (an error about a batch of 2 the user never gave would mislead)."""
    try:
        yield
    except TraceError as e:
        if [t.shape for t in given] == [t.shape for t in used]:
            raise
        shown = ", ".join(str(tuple(t.shape)) for t in given)
        raise TraceError(
            f"{e} (the inputs given, of shape {shown}, were widened to a batch of 2 for the dynamic "
            "batch axis; ExportOptions.static_batch=True keeps the batch as given)"
        ) from e
