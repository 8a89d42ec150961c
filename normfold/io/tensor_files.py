"""Tensor files: example inputs and calibration batches saved with ``torch.save``, read safely.

Read with ``torch.load(weights_only=True)`` only: plain tensors, tuples and lists; pickled objects
beyond those are never unpickled (that can run code from the file), whatever the caller trusts.
A file must be a regular file and no model archive (:mod:`normfold.io.sniff`, which also checks a zip
for decompression bombs). Limits, from shapes before anything is computed: example inputs hold at
most :data:`~normfold.io.limits.MAX_INPUT_ELEMENTS` (2**28) elements in total (an expanded, stride-0
tensor counts every element it shows); each calibration batch the same, and a data file may not
show more elements than it stores beyond that limit.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from normfold.errors import LoadError, first_line
from normfold.io.limits import MAX_INPUT_ELEMENTS, input_limit_rule
from normfold.io.sniff import check_regular_file, looks_like_torch_save, sniff

__all__ = ["load_batches", "load_inputs", "torch_error_reason"]


def _load_tensors(path: str | Path, what: str) -> tuple[Path, Any]:
    """Whatever a ``torch.save`` file holds, read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    check_regular_file(path, f"{what} file")
    if sniff(path) != "other":  # also checks a zip for decompression bombs
        raise LoadError(f"{path} is not a readable tensor file: it is a model, not torch.save'd tensors")
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is not a readable tensor file: it is empty")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if looks_like_torch_save(path):  # torch's own message advises an unsafe load: not ours
            raise LoadError(
                f"{path} is not a readable tensor file: it holds pickled Python objects beyond "
                f"tensors, which are never unpickled for {what} (that can run arbitrary code from "
                "the file); save plain tensors"
            ) from e
        raise LoadError(
            f"{path} is not a readable tensor file (truncated or corrupt?): it is neither a zip "
            "archive nor a pickle"
        ) from e
    except Exception as e:
        why = torch_error_reason(e)
        raise LoadError(f"{path} is not a readable tensor file (weights_only load): {why}") from e


def torch_error_reason(e: BaseException) -> str:
    """torch's error in one line, without terminal escapes or its advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))
    if "weights_only" in text.partition(": ")[2]:
        return f"{type(e).__name__}: the safe (weights_only) loader cannot read it"
    return text


def load_inputs(path: str | Path) -> tuple[torch.Tensor, ...]:
    """Example inputs saved with ``torch.save`` (a tensor or a tuple/list of tensors), read safely."""
    path, obj = _load_tensors(path, "inputs")
    if isinstance(obj, torch.Tensor):
        inputs: tuple[torch.Tensor, ...] = (obj,)
    elif isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        inputs = tuple(obj)
    else:
        raise LoadError(f"{path} holds a {type(obj).__name__}; expected a tensor or a tuple of tensors")
    total = _check_tensors(inputs, path)
    if total > MAX_INPUT_ELEMENTS:
        raise LoadError(
            f"{path}: its inputs have {total:,} elements in total (shapes "
            f"{', '.join(str(tuple(t.shape)) for t in inputs)}), {input_limit_rule()}"
        )
    return inputs


def _check_tensors(tensors: Sequence[torch.Tensor], path: Path) -> int:
    """Plain dense CPU tensors only; their total element count, from shapes (nothing is read)."""
    total = 0
    for i, t in enumerate(tensors):
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise LoadError(
                f"{path}: tensor {i} is a {t.layout} {t.dtype} tensor on {t.device}; "
                "expected a dense (strided) CPU tensor"
            )
        total += t.numel()
    return total


def load_batches(path: str | Path) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches saved with ``torch.save``, read safely: a list of batches, each a tensor
    or a tuple of tensors (one per model input); a single tensor is one batch."""
    path, obj = _load_tensors(path, "data")
    items = [obj] if isinstance(obj, torch.Tensor) else obj
    if not isinstance(items, (list, tuple)) or not items:
        raise LoadError(f"{path} holds a {type(obj).__name__}; expected a list of batches")
    batches = []
    shown = 0
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
        elements = _check_tensors(batch, path)
        if elements > MAX_INPUT_ELEMENTS:
            raise LoadError(f"{path}: batch {i} has {elements:,} elements, {input_limit_rule()}")
        shown += elements
    stored = sum(_storage_elements(batches).values())
    if shown > max(MAX_INPUT_ELEMENTS, stored):
        raise LoadError(
            f"{path}: its batches show {shown:,} elements in total but the file stores only {stored:,} "
            f"(tensors expanded from a smaller storage, stride 0?); beyond {MAX_INPUT_ELEMENTS:,} (2**28) "
            "elements, a data file may not show more elements than it stores"
        )
    return batches


def _storage_elements(batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[int, int]:
    """Elements each distinct storage of ``batches`` holds, keyed by its data pointer."""
    stored: dict[int, int] = {}
    for batch in batches:
        for t in batch:
            storage = t.untyped_storage()
            stored[storage.data_ptr()] = max(1, storage.nbytes() // max(1, t.element_size()))
    return stored
