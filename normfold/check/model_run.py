"""Running a model once for a check: eval mode, no gradients, the caller's tensors and RNG untouched.

:func:`run_model` clones every input (an in-place op inside the model cannot change the caller's
tensors), restores the global RNG state afterwards (a forward that draws random numbers leaves a
caller's seeded pipeline as it was) and restores every submodule's ``training`` flag when the last
of the forwards running the same model at once (:mod:`normfold.check.workers`) ends: the first one in
saves the flags, the last one out restores them (each saving its own would restore the eval mode a
sibling had set). A forward that raises becomes a :class:`~normfold.errors.TraceError` naming the
model's role and the input shapes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from normfold.check.workers import in_pool
from normfold.engine.probe import isolated_rng
from normfold.errors import TraceError, first_line

__all__ = ["describe_inputs", "run_model"]


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor], *, role: str = "model") -> Any:
    """Run ``model`` once in eval mode under ``torch.no_grad()``, restoring its training flags.

    Each input is cloned, so an in-place op inside the model cannot change the caller's tensors,
    and the global RNG state is restored afterwards (a forward that draws random numbers leaves
    a caller's seeded pipeline as it was). Raises :class:`TraceError` (naming ``role`` and the
    input shapes) when the forward raises.
    """
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    # in a verification pool's worker the pool restores the CPU RNG state for all of them: its
    # threads never touch it at once (normfold.check.workers)
    pooled = in_pool() and torch.device(device).type == "cpu"
    rng = contextlib.nullcontext() if pooled else isolated_rng(device)
    try:
        with _evaluating(model), torch.no_grad(), rng:
            return model(*(t.clone() for t in inputs))
    except Exception as e:
        raise TraceError(
            f"the {role} model ({type(model).__name__}) raised {type(e).__name__} during forward "
            f"on inputs of shape {describe_inputs(tuple(inputs))}: {first_line(e)}"
        ) from e


_running: dict[int, tuple[int, dict[nn.Module, bool]]] = {}  # id(model): (forwards in flight, flags)
_running_lock = threading.Lock()


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode; its training flags restored when the last of the forwards running
    it at once (:mod:`normfold.check.workers`) ends: the first one in saves them, the last one out
    restores them (each saving its own would restore the eval mode a sibling had set)."""
    with _running_lock:
        count, flags = _running.get(id(model), (0, {}))
        if count == 0:
            flags = {m: m.training for m in model.modules()}
            model.eval()
        _running[id(model)] = (count + 1, flags)
    try:
        yield
    finally:
        with _running_lock:
            count, flags = _running.pop(id(model))
            if count > 1:
                _running[id(model)] = (count - 1, flags)
            else:
                for module, training in flags.items():
                    module.training = training


def describe_inputs(args: tuple[torch.Tensor, ...]) -> str:
    """``[(shape) dtype, ...]``, one entry per input."""
    return "[" + ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in args) + "]"
