"""A weights file fitted into the architecture a factory spec builds.

* :func:`state_dict_of`: the state dict of what ``torch.load`` read: a mapping of names to tensors,
  or a checkpoint holding one under a ``state_dict``/``model_state_dict``/``model`` key.
* :func:`fit_weights`: ``load_state_dict(strict=True)`` after removing a DataParallel/DDP
  ``module.`` prefix, with the architecture cast to the weights' floating dtype when they all share
  one (an fp16 checkpoint is folded and exported in fp16, not silently in the factory's fp32). A
  mismatch names the first :data:`LISTED_KEYS` missing and unexpected keys (escaped: a key from a
  file may hold a terminal escape), the shapes that differ, and the one prefix whose removal or
  addition would make the keys match, when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.errors import LoadError, first_line, printable

__all__ = ["COMPUTE_DTYPES", "LISTED_KEYS", "fit_weights", "state_dict_of"]

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def state_dict_of(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
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


#: at most this many key names are listed in a message (the counts say how many there are)
LISTED_KEYS = 5


def _first(keys: list[str], n: int = LISTED_KEYS) -> str:
    """The first ``n`` names, escaped (a key from a file may hold a newline or a terminal escape)."""
    shown = ", ".join(printable(k) for k in keys[:n])
    return "" if not keys else f"({shown}{', ...' if len(keys) > n else ''})"


def _prefix_hint(found: set[str], expected: set[str]) -> str:
    """The likeliest fix for keys that differ by a prefix (a Lightning ``model.``, a wrapper's
    ``backbone.``): the one prefix whose removal from, or addition to, the file's keys matches
    the most model keys. Linear in the number of keys: a key starts with a one- or two-part
    prefix only if that prefix is its own, so each key counts for its own two at most."""
    best: tuple[int, str] = (0, "")
    for keys, other, verb in ((found, expected, "strip"), (expected, found, "add")):
        hits: dict[str, int] = {}
        for k in keys:
            parts = k.split(".", 2)
            for d in (1, 2):
                if len(parts) > d:
                    p = ".".join(parts[:d]) + "."
                    if k[len(p) :] in other:
                        hits[p] = hits.get(p, 0) + 1
        for p, n in sorted(hits.items(), key=lambda item: (-item[1], item[0])):
            if n > best[0]:
                where = "from" if verb == "strip" else "to"
                best = (n, f"{verb} the prefix {printable(repr(p))} {where} the file's keys")
            break
    if best[0] < max(1, len(expected) / 2, len(found & expected) + 1):  # a fix, not a coincidence
        return ""
    return f"; {best[1]} and {best[0]} of the model's {len(expected)} keys match"


#: the floating dtypes a model is folded, run and exported in
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _keep_weights_dtype(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: str
) -> tuple[list[str], torch.dtype | None]:
    """Cast the built architecture to the weights' floating dtype when they all share one, so an
    fp16 checkpoint is folded and exported in fp16, not silently in the factory's fp32."""
    file_dtypes = {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    own = {v.dtype for v in module.state_dict().values() if v.is_floating_point()}
    if not file_dtypes or file_dtypes == own:
        return [], None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in file_dtypes))
    own_names = ", ".join(sorted(str(d).removeprefix("torch.") for d in own)) or "no floating tensors"
    if len(file_dtypes) > 1:
        return [
            f"the weights in {path} mix floating dtypes ({names}); each was converted to the dtype "
            f"of its tensor in {spec} ({own_names})"
        ], None
    (dtype,) = file_dtypes
    if dtype not in COMPUTE_DTYPES:  # float8: a storage format, no kernels to fold, run or export
        raise LoadError(
            f"the weights in {path} are {names}, a storage dtype normfold cannot fold, run or export "
            f"in (it computes in {', '.join(str(d).removeprefix('torch.') for d in COMPUTE_DTYPES)}); "
            "convert them first, e.g. {k: v.float() for k, v in state.items()}"
        )
    module.to(dtype)
    note = f"the weights in {path} are {names}: {spec} ({own_names}) was cast to {names} to keep them"
    return [note], dtype


def fit_weights(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: str
) -> tuple[list[str], torch.dtype | None]:
    """Load ``state`` into ``module`` (built by ``spec``) strictly, in the weights' own dtype; the
    notes and the dtype cast to (:func:`_keep_weights_dtype`), or a :class:`LoadError` that says
    which keys are missing or unexpected, which shapes differ, and a prefix that would fix them."""
    expected = set(module.state_dict())
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    if not (set(state) & expected) and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    notes, dtype = _keep_weights_dtype(module, state, path, spec)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        detail = (
            f"{len(missing)} of the model's {len(expected)} keys are missing from the file "
            f"{_first(missing)}, {len(unexpected)} of the file's {len(state)} keys are unexpected "
            f"{_first(unexpected)}{_prefix_hint(set(state), expected)}"
        )
        if not (missing or unexpected):  # same keys, so a shape mismatch: name the tensors
            own = module.state_dict()
            mismatched = [
                f"{printable(k)} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items()
                if tuple(v.shape) != tuple(own[k].shape)
            ]
            detail = f"size mismatch: {'; '.join(mismatched[:LISTED_KEYS])}" if mismatched else first_line(e)
        raise LoadError(f"{path} does not fit {spec}: {detail}") from e
    return notes, dtype
