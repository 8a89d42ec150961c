"""The inputs a check runs on: the caller's, and seeded generated ones.

**Input sets** (:func:`parity_sets`). Standard-normal inputs alone hide changes that only show at
other scales (a clamp inside a BN subclass never triggers on N(0, 1)), so every check runs on:

* ``given``: the caller's own inputs, when given (real data);
* ``normal``: seeded standard-normal inputs of the same shapes and dtypes;
* ``uniform[lo,hi]``: seeded uniform inputs over the rule's ``value_range`` (default 0..255, the
  range of raw image bytes), as polygraphy's ``--val-range``.

Only floating inputs are generated; integer and bool inputs are used as given in every set. Values
are drawn on the CPU in float64 from a seeded ``torch.Generator``, then cast and moved, so the same
seed gives the same inputs on every device (:func:`random_inputs`). Shapes are checked against
the input size limit (:func:`normfold.io.limits.check_size`) before anything is drawn.

:func:`verify_inputs` turns :func:`normfold.verify`'s ``inputs``/``input_shapes``/``input_dtype``
arguments into one tuple of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normfold.check.parity_rule import ParityRule
from normfold.errors import UsageError
from normfold.io.limits import check_size

__all__ = ["InputSet", "Inputs", "parity_sets", "random_inputs", "verify_inputs"]

Inputs = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class InputSet:
    """One batch of positional inputs the models are compared on, and its name in reports."""

    name: str
    inputs: tuple[torch.Tensor, ...]


def parity_sets(
    inputs: Sequence[torch.Tensor], rule: ParityRule, *, seed: int = 0, given: bool = True
) -> list[InputSet]:
    """The input sets of a check (module docstring). ``given=False`` says ``inputs`` are themselves
    the seeded standard-normal set (generated from shapes), so they are not repeated."""
    inputs = tuple(inputs)
    shapes = [tuple(t.shape) for t in inputs]
    check_size(shapes)
    sets = [InputSet("given" if given else "normal", inputs)]
    if not any(t.is_floating_point() for t in inputs):
        return sets
    gen = torch.Generator().manual_seed(seed + 7919)
    if given:
        sets.append(
            InputSet("normal", _like(inputs, lambda s: torch.randn(s, generator=gen, dtype=torch.float64)))
        )
    low, high = rule.value_range
    sets.append(
        InputSet(
            f"uniform[{low:g},{high:g}]",
            _like(inputs, lambda s: torch.rand(s, generator=gen, dtype=torch.float64) * (high - low) + low),
        )
    )
    return sets


def _like(
    inputs: tuple[torch.Tensor, ...], draw: Callable[[tuple[int, ...]], torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """New values for the floating inputs (same shape, dtype, device); the others as they are."""
    return tuple(
        draw(tuple(t.shape)).to(device=t.device, dtype=t.dtype) if t.is_floating_point() else t
        for t in inputs
    )


def random_inputs(
    input_shapes: Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs, one per shape, drawn on the CPU in float64 so the same seed
    gives the same values on every device, then cast to ``dtype`` and moved to ``device``."""
    shapes = _check_shapes(input_shapes)
    if not (dtype.is_floating_point or dtype.is_complex):
        raise UsageError(
            f"random inputs need a floating input dtype, got {dtype}; pass integer inputs explicitly"
        )
    draw_dtype = torch.complex128 if dtype.is_complex else torch.float64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=draw_dtype).to(device=device or "cpu", dtype=dtype)
        for shape in shapes
    )


def _check_shapes(input_shapes: Any) -> list[tuple[int, ...]]:
    if isinstance(input_shapes, (str, bytes)) or not isinstance(input_shapes, Sequence):
        raise UsageError(f"input_shapes must be a sequence of shapes, got {type(input_shapes).__name__}")
    if input_shapes and all(isinstance(d, int) for d in input_shapes):
        raise UsageError(
            f"input_shapes is a sequence of shapes, one per input: wrap a single shape, e.g. "
            f"input_shapes=[{tuple(input_shapes)}]"
        )
    shapes: list[tuple[int, ...]] = []
    for i, shape in enumerate(input_shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise UsageError(f"input_shapes[{i}] must be a sequence of ints, got {shape!r}")
        dims = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise UsageError(f"input_shapes[{i}] must contain non-negative ints, got {dims!r}")
        shapes.append(dims)
    check_size(shapes)
    return shapes


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def _default_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def verify_inputs(
    reference: nn.Module,
    inputs: Inputs | None,
    input_shapes: Sequence[Sequence[int]] | None,
    input_dtype: torch.dtype | None,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    if inputs is not None and input_shapes is not None:
        raise UsageError("pass either inputs or input_shapes to verify(), not both")
    if inputs is None and input_shapes is None:
        raise UsageError(
            "verify() needs inputs to run the models on: pass `inputs` (a tensor or a sequence of "
            "tensors, one per forward argument) or `input_shapes` (e.g. input_shapes=[(1, 3, 224, 224)]) "
            "to generate seeded random inputs"
        )
    if inputs is not None:
        args = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise UsageError(f"inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
        out: list[torch.Tensor] = []
        for i, t in enumerate(args):
            if not isinstance(t, torch.Tensor):
                raise UsageError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if input_dtype is not None and (t.is_floating_point() or t.is_complex()):
                t = t.to(input_dtype)
            out.append(t)
        return tuple(out)

    first = _first_tensor(reference)
    return random_inputs(
        input_shapes,
        dtype=input_dtype if input_dtype is not None else _default_dtype(reference),
        seed=seed,
        device=first.device if first is not None else None,
    )
