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
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.errors import LoadError, UsageError, first_line

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
_SAFE_ALTERNATIVE = (
    "save the weights instead with torch.save(model.state_dict(), 'weights.pt') and pass the "
    "architecture with --model package.module:callable"
)


@dataclass
class LoadedModel:
    """A model ready to fold, and what is known about its inputs."""

    model: nn.Module
    source: str  # what was loaded, e.g. "factory normfold.models:resnet"
    input_shapes: list[tuple[int, ...]] | None = None  # default example input shapes, if known
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. a dtype kept)


def is_factory_spec(text: str) -> bool:
    return bool(_SPEC.match(text)) and not Path(text).exists()


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``package.module:callable``.

    Installed modules come first; a module found only in the current directory is importable too
    (as with ``python -m``), but the directory is searched *after* everything installed and only
    during that one import, so a file there never shadows an installed package (onnx, sympy, ...)
    then or later.
    """
    if not _SPEC.match(spec):
        raise UsageError(f"{spec!r} is not a factory spec of the form package.module:callable")
    module_name, _, attr = spec.partition(":")
    saved = list(sys.path)
    # the script's folder or '' (python -c, -m) would put the working directory first
    sys.path[:] = [p for p in saved if p not in ("", os.getcwd())] + [os.getcwd()]
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise LoadError(f"cannot import {module_name!r} for factory {spec!r}: {e}") from e
    except Exception as e:  # the module itself raised (SyntaxError, an error in its top-level code)
        raise LoadError(f"importing {module_name!r} for factory {spec!r} failed: {first_line(e)}") from e
    finally:
        sys.path[:] = saved
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise LoadError(f"{module_name!r} has no attribute {attr!r} (factory {spec!r})") from e
    if not callable(obj):
        raise LoadError(f"factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(
    spec: str, model_args: Mapping[str, Any] | None = None
) -> tuple[nn.Module, list[tuple[int, ...]] | None]:
    """Call a factory spec; return the module and the zoo's default input shape if it is a zoo model."""
    factory = resolve_factory(spec)
    try:
        model = factory(**dict(model_args or {}))
    except Exception as e:
        raise LoadError(f"factory {spec!r} failed with arguments {dict(model_args or {})}: {e}") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    from normfold.models import spec_of

    entry = spec_of(factory)
    return model, ([tuple(entry.input_shape)] if entry is not None else None)


def parse_model_args(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-args is not valid JSON ({e.msg} at column {e.colno}): {text}") from e
    if not isinstance(value, dict):
        raise UsageError(f"--model-args must be a JSON object of keyword arguments, got {text}")
    return value


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
            raise UsageError(f"{text} is already a factory spec; --model is only for weights files")
        module, shapes = build(text, model_args)
        return LoadedModel(module, f"factory {text}", shapes)

    path = Path(text)
    if not path.exists():
        raise LoadError(f"{path}: no such file (and not a factory spec like package.module:callable)")
    if not path.is_file():
        raise LoadError(f"{path}: not a file")
    kind = _sniff(path)
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive: it is compiled code (loading it runs that code) with no "
            f"module structure left to fold; {_SAFE_ALTERNATIVE}"
        )
    if kind == "exported program":
        raise LoadError(
            f"{path} is a torch.export program (.pt2): it is already lowered to aten operators with "
            f"no module structure left to fold; {_SAFE_ALTERNATIVE}"
        )
    if path.suffix == ".safetensors":
        return _with_architecture(_load_safetensors(path), path, model, model_args, "safetensors")

    obj = _torch_load(path, trust=trust)
    if isinstance(obj, nn.Module):
        if model is not None:
            raise UsageError(f"{path} holds a whole module; --model is only for weights files")
        return LoadedModel(obj.cpu(), f"pickled module {path} (trusted)")
    state = _state_dict_of(obj, path)
    return _with_architecture(state, path, model, model_args, "state_dict")


def _sniff(path: Path) -> str:
    """Tell TorchScript and torch.export archives from plain torch.save zips by their entries."""
    if not zipfile.is_zipfile(path):
        return "other"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "other"
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "exported program"
    return "other"


def _torch_load(path: Path, *, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_save(path):
            # weights_only reports any non-pickle bytes (text, ONNX, ...) as an UnpicklingError too
            raise LoadError(
                f"{path} is not a readable torch.save file (truncated or corrupt?): "
                "it is neither a zip archive nor a pickle"
            ) from e
        if not trust:
            raise LoadError(
                f"{path} holds pickled Python objects beyond tensors (a whole nn.Module?); unpickling "
                f"them can run arbitrary code, so it is refused without --trust. Safer: {_SAFE_ALTERNATIVE}"
            ) from e
        logger.warning("loading %s with weights_only=False because trust=True", path)
        try:
            # Reached only with the explicit trust opt-in.
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise LoadError(f"{path}: trusted load failed: {first_line(e2)}") from e2
    except Exception as e:
        raise LoadError(
            f"{path} is not a readable torch.save file (truncated or corrupt?): {first_line(e)}"
        ) from e


def _looks_like_torch_save(path: Path) -> bool:
    """A torch.save file is a zip archive (the default since torch 1.6) or a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors) "
        f"or a checkpoint with a {'/'.join(_CHECKPOINT_KEYS)} key"
    )


def _with_architecture(
    state: Mapping[str, torch.Tensor],
    path: Path,
    spec: str | None,
    model_args: Mapping[str, Any] | None,
    what: str,
) -> LoadedModel:
    if spec is None:
        raise UsageError(
            f"{path} holds weights only ({what}); pass the architecture with --model package.module:callable"
        )
    module, shapes = build(spec, model_args)
    expected = set(module.state_dict())
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    if not (set(state) & expected) and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        detail = f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        if not (missing or unexpected):  # same keys, so a shape mismatch: name the tensors
            own = module.state_dict()
            mismatched = [
                f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items()
                if tuple(v.shape) != tuple(own[k].shape)
            ]
            detail = f"size mismatch: {'; '.join(mismatched[:5])}" if mismatched else first_line(e)
        raise LoadError(f"{path} does not fit {spec}: {detail}") from e
    return LoadedModel(module, f"{what} {path} into {spec}", shapes)


def _load_tensors(path: str | Path, what: str) -> tuple[Path, Any]:
    """Whatever a ``torch.save`` file holds, read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such {what} file")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path} is not a readable tensor file (weights_only load): {first_line(e)}") from e


def load_inputs(path: str | Path) -> tuple[torch.Tensor, ...]:
    """Example inputs saved with ``torch.save`` (a tensor or a tuple/list of tensors), read safely."""
    path, obj = _load_tensors(path, "inputs")
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(obj)
    raise LoadError(f"{path} holds a {type(obj).__name__}; expected a tensor or a tuple of tensors")


def load_batches(path: str | Path) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches saved with ``torch.save``, read safely: a list of batches, each a tensor
    or a tuple of tensors (one per model input); a single tensor is one batch."""
    path, obj = _load_tensors(path, "data")
    items = [obj] if isinstance(obj, torch.Tensor) else obj
    if not isinstance(items, (list, tuple)) or not items:
        raise LoadError(f"{path} holds a {type(obj).__name__}; expected a list of batches")
    batches = []
    for i, item in enumerate(items):
        batch = (item,) if isinstance(item, torch.Tensor) else item
        if (
            not isinstance(batch, (list, tuple))
            or not batch
            or not all(isinstance(t, torch.Tensor) for t in batch)
        ):
            raise LoadError(
                f"{path}: batch {i} is a {type(item).__name__}, not a tensor or a tuple of tensors"
            )
        batches.append(tuple(batch))
    return batches
