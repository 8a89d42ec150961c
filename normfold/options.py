"""The few option objects a run takes, from the CLI down to the library (no torch import here).

A run is ``source -> load -> transform -> verify -> export -> write``; each object holds the
options of one of those concerns, so that an entry point takes a handful of them instead of a
keyword per option:

* :class:`LoadOptions`: how ``source`` becomes a module (the architecture for a weights file,
  its keyword arguments, whether unpickling a whole module is trusted);
* :class:`InputSpec`: where the example inputs come from (tensors, a file, or shapes);
* :class:`FoldOptions`: what ``fold`` does beyond folding (merge branches, recalibrate first,
  require every norm to fold);
* :class:`ExportOptions`: the exported graph (opset, dynamic axes, input/output names, the
  onnxruntime providers that check it, the form of the BatchNormalizations that stay);
* :class:`WriteOptions`: the files besides ``out`` (the JSON report, the parity inputs) and
  whether existing files may be replaced.

The parity rule is :class:`normfold.ParityRule` itself (tolerances included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoadOptions:
    """How a ``source`` path or factory spec becomes a module (:func:`normfold.load_model`).

    ``model``: the factory spec (``package.module:callable``) that builds the architecture of a
    weights file; ``model_args``: its keyword arguments; ``trust``: allow unpickling a whole
    ``nn.Module`` (it runs code from the file)."""

    model: str | None = None
    model_args: Mapping[str, Any] | None = None
    trust: bool = False


@dataclass(frozen=True)
class InputSpec:
    """Where the example inputs come from (first given wins: ``tensors``, ``file``, ``shapes``,
    the calibration batches' shapes, the zoo's default).

    ``tensors``: the inputs themselves (one tensor or one per positional input of the forward).
    ``shapes``: one shape per positional input of the model's forward, in order, or a mapping
    of the forward's argument names to shapes. ``dtype``: of the generated floating inputs
    (default: the weights'); it must match the weights' floating dtype. ``seed``: of every
    generated input."""

    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None
    dtype: torch.dtype | None = None
    file: str | Path | None = None
    seed: int = 0
    tensors: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class FoldOptions:
    """What :func:`normfold.fold_and_export` does besides folding.

    ``reparameterize``: merge RepVGG-style parallel branches into one conv as well (on by default,
    as in :func:`normfold.fold` and ``normfold fold``). ``calibrate``: a file of batches on which
    the BatchNorm statistics are recalibrated first (parity is then judged against the
    recalibrated model). ``require_all``: fail (:class:`~normfold.errors.NotFoldedError`) when a
    norm stays."""

    reparameterize: bool = True
    calibrate: str | Path | None = None
    require_all: bool = False


@dataclass(frozen=True)
class ExportOptions:
    """The exported graph.

    ``opset``: the ONNX opset (default: the exporter's). ``static_batch``: fix the batch to the
    example's (default: a dynamic batch axis named ``batch``). ``dynamic_axes``: ``{input (index or
    forward argument name): {axis: name}}`` more axes kept dynamic (e.g. ``{0: {2: "height"}}``).
    ``input_names``/``output_names``: the ONNX graph's names (default: the forward's argument
    names; ``output``, ``output_1``, ...). ``providers``: the onnxruntime execution providers the
    written file is checked with (default: the CPU one). ``lower_kept``: ``"mul-add"`` or ``"conv"``
    writes every BatchNormalization left in an ``.onnx`` file as ``Mul`` + ``Add`` or as a depthwise
    1x1 ``Conv``, for runtimes without that op (checked with the rest of the file; default: as is)."""

    opset: int | None = None
    static_batch: bool = False
    dynamic_axes: Mapping[int | str, Mapping[int, str]] | None = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    providers: Sequence[str] | None = None
    lower_kept: str | None = None


#: the forms ``ExportOptions.lower_kept`` takes (:mod:`normfold.engine.onnx_lower`)
LOWER_FORMS = ("mul-add", "conv")


def check_lower_kept(form: str | None) -> None:
    """Refuse a ``lower_kept`` that names no form (torch-free: the CLI checks it before torch loads)."""
    if form is not None and form not in LOWER_FORMS:
        from normfold.errors import UsageError

        raise UsageError(f"lower_kept must be {' or '.join(map(repr, LOWER_FORMS))}, got {form!r}")


@dataclass(frozen=True)
class WriteOptions:
    """The files a run writes besides ``out``, and whether existing ones may be replaced.

    ``report``: a JSON report of the run (written also when it fails). ``save_inputs``: a ``.pt``
    file of the parity input sets (``{set name: [tensors]}``, loadable with
    ``torch.load(weights_only=True)``), written also when the run fails, to reproduce it.
    ``force``: replace existing files (only regular files; never through a symbolic link)."""

    report: str | Path | None = None
    save_inputs: str | Path | None = None
    force: bool = False
