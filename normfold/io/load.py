"""Loading a model and its example inputs, safely.

Accepted sources, tried in this order:

* a factory spec ``package.module:callable`` (``normfold.models:resnet``) called with JSON keyword
  arguments. Importing it runs the named module's code, which the user chose explicitly.
* a ``.safetensors`` file, or a ``torch.save`` file (``.pt``/``.pth``/``.bin``/...) read with
  ``torch.load(weights_only=True)``, holding a state_dict or a checkpoint dict with a
  ``state_dict``/``model``/``model_state_dict`` key; the architecture comes from a factory spec.
* a whole pickled ``nn.Module`` (``torch.save(model)``): unpickling it can run arbitrary code,
  so it is refused unless ``trust=True``.
* TorchScript archives and ``torch.export`` programs are recognised and refused with a message
  naming the format: both are compiled graphs with no module structure left to fold, and loading
  either can run code from the file.

Nothing here ever falls back to an unsafe load silently.

The parts: factory specs and the working directory's modules (:mod:`normfold.io.factory`), a file's
kind from its bytes (:mod:`normfold.io.sniff`), weights fitted into the architecture
(:mod:`normfold.io.weights_fit`), example inputs and calibration batches (:mod:`normfold.io.tensor_files`).

Limits, checked before anything is allocated (a file or option over one is refused with one line):

* a model or tensor file must be a regular file (not a FIFO, device, directory or dangling link);
* a zip checkpoint's members may declare at most ``max(16 x file size, 64 MiB)`` uncompressed
  bytes in total (torch.save stores them uncompressed: a higher ratio is a decompression bomb);
* a safetensors header may be at most 100 MiB and must fit in the file (safetensors then checks
  every offset, dtype and shape against the byte ranges);
* example inputs hold at most :data:`~normfold.io.limits.MAX_INPUT_ELEMENTS` (2**28) elements in
  total, counted from their shapes (an expanded, stride-0 tensor counts every element it shows);
  each calibration batch the same, and a data file may not show more elements than it stores
  beyond that limit;
* ``model_args`` JSON text is at most 65,536 characters, nested at most 32 levels deep.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.errors import LoadError, UsageError, first_line
from normfold.io.factory import build, is_factory_spec, resolve_factory, working_dir_importable
from normfold.io.sniff import (
    ZIP_MAX_RATIO,
    ZIP_MIN_ALLOWANCE,
    check_regular_file,
    looks_like_torch_save,
    read_head,
    refuse_compiled,
    refuse_pickled_object_for_model,
    sniff,
)
from normfold.io.sniff import check_regular_file as _check_regular_file  # its old name (roundtrip)
from normfold.io.sniff import pickled_top_level as _pickled_top_level  # its old name (tests)
from normfold.io.sniff import sniff as _sniff  # its old name (tests)
from normfold.io.tensor_files import load_batches, load_inputs, torch_error_reason
from normfold.io.weights_fit import COMPUTE_DTYPES, LISTED_KEYS, fit_weights, state_dict_of

logger = logging.getLogger(__name__)

__all__ = [  # with the names of the modules it was split into, at their old import path
    "COMPUTE_DTYPES",
    "LISTED_KEYS",
    "SAFETENSORS_MAX_HEADER",
    "ZIP_MAX_RATIO",
    "ZIP_MIN_ALLOWANCE",
    "LoadedModel",
    "_check_regular_file",
    "_load_safetensors",
    "_pickled_top_level",
    "_sniff",
    "_torch_load",
    "build",
    "is_factory_spec",
    "load_batches",
    "load_inputs",
    "load_model",
    "resolve_factory",
]

#: The safetensors library's own header limit, checked here before it reads anything.
SAFETENSORS_MAX_HEADER = 100 * 2**20
_SAFE_ALTERNATIVE = (
    "save the weights instead with torch.save(model.state_dict(), 'weights.pt') and pass the "
    "architecture with model=package.module:callable"
)


@dataclass
class LoadedModel:
    """A model ready to fold, and what is known about its inputs."""

    model: nn.Module
    source: str  # what was loaded, e.g. "factory normfold.models:resnet"
    input_shapes: list[tuple[int, ...]] | None = None  # default example input shapes, if known
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. a dtype kept)
    dtype: torch.dtype | None = None  # the weights' floating dtype the architecture was cast to
    #: source files of the code the load ran (the factory's module, modules found in the working
    #: directory): inputs of the run like the weights, so never an output (a ``report`` over them
    #: would replace the user's code)
    code_files: list[Path] = field(default_factory=list)


def load_model(
    source: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load ``source`` (a factory spec or a file) as described in the module docstring.

    ``model`` is the factory spec that builds the architecture for a weights file; ``trust``
    allows unpickling a whole ``nn.Module``, which runs code from the file.
    """
    text = str(source)
    if is_factory_spec(text):
        if model is not None:
            raise UsageError(f"{text} is already a factory spec; model= is only for weights files")
        code: list[Path] = []
        module, shapes = build(text, model_args, code)
        return LoadedModel(module, f"factory {text}", shapes, code_files=code)

    path = Path(text)
    check_regular_file(path, "file (and not a factory spec like package.module:callable)")
    refuse_compiled(path, sniff(path), onnx_fold="fold_onnx_file", alternative=_SAFE_ALTERNATIVE)
    if path.suffix == ".safetensors":
        return _with_architecture(_load_safetensors(path), path, model, model_args, "safetensors")

    if model is not None and trust:
        # model= takes weights: decide from the pickle's opcodes (nothing is run) before any
        # trusted load, so a whole pickled module given with model= is never unpickled
        refuse_pickled_object_for_model(path)
    obj = _torch_load(path, trust=trust)
    if isinstance(obj, nn.Module):
        if model is not None:
            raise UsageError(f"{path} holds a whole module; model= is only for weights files")
        cls_file = getattr(sys.modules.get(type(obj).__module__), "__file__", None)
        code = [Path(cls_file)] if cls_file else []  # the class's code ran: an input too
        return LoadedModel(obj.cpu(), f"pickled module {path} (trusted)", code_files=code)
    state = state_dict_of(obj, path)
    return _with_architecture(state, path, model, model_args, "state_dict")


def _torch_load(path: Path, *, trust: bool) -> Any:
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is not a readable torch.save file (truncated or corrupt?): it is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not looks_like_torch_save(path):
            # weights_only reports any non-pickle bytes (text, ONNX, ...) as an UnpicklingError too
            raise LoadError(
                f"{path} is not a readable torch.save file (truncated or corrupt?): "
                "it is neither a zip archive nor a pickle"
            ) from e
        if not trust:
            raise LoadError(
                f"{path} holds pickled Python objects beyond tensors (a whole nn.Module?); unpickling "
                "them can run arbitrary code, so it is refused without trust=True. "
                f"Safer: {_SAFE_ALTERNATIVE}"
            ) from e
        logger.warning("loading %s with weights_only=False because trust=True", path)
        try:
            # Reached only with the explicit trust opt-in. The pickle's classes are imported like
            # a factory's module: the working directory's modules too (after everything installed)
            with working_dir_importable():
                return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise LoadError(f"{path}: trusted load failed: {first_line(e2)}") from e2
    except Exception as e:
        raise LoadError(
            f"{path} is not a readable torch.save file (truncated or corrupt?): {torch_error_reason(e)}"
        ) from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    head, size = read_head(path, 8), path.stat().st_size
    header = int.from_bytes(head, "little") if len(head) == 8 else None
    if header is None or header > min(size - 8, SAFETENSORS_MAX_HEADER):
        why = (
            f"only {size} bytes long" if header is None
            else f"declares a header of {header:,} bytes in a file of {size:,} bytes (at most "
            f"{SAFETENSORS_MAX_HEADER // 2**20} MiB and within the file)"
        )  # fmt: skip
        raise LoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): it {why}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _with_architecture(
    state: Mapping[str, torch.Tensor],
    path: Path,
    spec: str | None,
    model_args: Mapping[str, Any] | None,
    what: str,
) -> LoadedModel:
    if spec is None:
        raise UsageError(
            f"{path} holds weights only ({what}); pass the architecture with model=package.module:callable"
        )
    code: list[Path] = []
    module, shapes = build(spec, model_args, code)
    notes, dtype = fit_weights(module, state, path, spec)
    return LoadedModel(module, f"{what} {path} into {spec}", shapes, notes, dtype, code)
