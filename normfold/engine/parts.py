"""Fallback when the whole model cannot be captured: fold inside the largest submodules that can be.

``torch.export`` refuses some forwards (data-dependent Python control flow such as
``if x.sum() > 0``). Rather than fail, :func:`fold_parts`:

1. runs the model once eagerly with forward pre-hooks that record each submodule's first
   positional tensor inputs and count every module's calls;
2. walks the module tree top-down: a submodule that captures on its recorded inputs is folded as a
   whole (the usual plan and eager apply); one that does not is split into its children;
3. refuses a part whose submodules are also called from outside it (its calls would not match the
   whole run's), since a fold there could change that outside call.

Every submodule that could not be captured is reported with the reason. There is no whole-model
exported program, so folds that exist only in an export are reported as kept (``no_export``).
Limitation: a parameter of a part read directly by code outside it is not seen.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from normfold.engine.analysis import analyse
from normfold.engine.apply import apply_module
from normfold.engine.capture import CaptureOptions
from normfold.engine.fold_records import FoldResult, Skipped, Uncaptured
from normfold.errors import TraceError

logger = logging.getLogger(__name__)

__all__ = ["Uncaptured", "fold_parts", "record_calls"]  # Uncaptured: its old import path


def record_calls(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[dict[str, tuple[torch.Tensor, ...]], Counter[str]]:
    """Run ``model`` once: each module's first tensor-only positional inputs, and its call count."""
    first: dict[str, tuple[torch.Tensor, ...]] = {}
    calls: Counter[str] = Counter()

    def hook(path: str):
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[path] += 1
            if path not in first and not kwargs and args and all(isinstance(a, torch.Tensor) for a in args):
                first[path] = tuple(a.detach() for a in args)

        return record

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True) for p, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return first, calls


def fold_parts(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], error: TraceError, options: CaptureOptions
) -> FoldResult:
    """Fold the capturable parts of ``model`` in place (``model`` is the caller's working copy)."""
    try:
        first, calls = record_calls(model, inputs)
    except Exception as e:
        raise error from e  # the model does not even run: the capture error says why
    whole = Uncaptured(type(model).__name__, "not_captured", str(error))
    result = FoldResult(model=model, uncaptured=[whole])
    result.params_before = sum(p.numel() for p in model.parameters())

    def visit(path: str, module: nn.Module) -> None:
        if path and path in first and any(True for _ in module.parameters()):
            reason = _outside_calls(module, path, first[path], calls)
            part = None
            if reason is not None:  # its children may still be captured, one by one
                result.uncaptured.append(Uncaptured(path, "called_outside", reason))
            else:
                try:
                    part = analyse(module, first[path], options)
                except TraceError as e:
                    result.uncaptured.append(Uncaptured(path, "not_captured", str(e)))
            if part is not None:
                apply_module(module, part.eager, part.plan.values(part.capture, part.eager.folds))
                for f in part.result.folded:
                    named = _prefixed(f, path)
                    if f.where == "export":
                        result.skipped.append(Skipped(named.norm, f.norm_type, "no_export", _no_export(f)))
                    else:
                        result.folded.append(named)
                result.skipped += [_prefixed(s, path) for s in part.result.skipped]
                return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    result.params_after = sum(p.numel() for p in model.parameters())
    logger.info("captured in parts: %d module(s) could not be captured", len(result.uncaptured))
    return result


def _outside_calls(
    module: nn.Module, path: str, inputs: tuple[torch.Tensor, ...], calls: Counter[str]
) -> str | None:
    """A reason when a module inside the part runs more often in the whole model than the part
    explains: then code outside the part calls it too."""
    _, inner = record_calls(module, inputs)
    for sub, n in inner.items():
        full = f"{path}.{sub}" if sub else path
        if calls[full] != n * calls[path]:
            return f"{full} is also called from outside {path}"
    return None


def _prefixed(record: Any, path: str) -> Any:
    """A part's record named from the whole model."""
    changes = {"norm": f"{path}.{record.norm}"}
    if getattr(record, "into", None):
        changes["into"] = ", ".join(f"{path}.{name}" for name in record.into.split(", "))
    return dataclasses.replace(record, **changes)


def _no_export(folded: Any) -> str:
    why = folded.note.removeprefix("folded in the export only: ")
    return f"{why}; there is no whole-model export to fold it in"
