"""The exact reference and the model's noise: one float64 run of the original per input set, and
a fixed number of runs in the model's own dtype with its parameters perturbed by one rounding.

**Exact run.** A float64 copy of the original runs on each set (floating inputs cast to float64),
once. The copy is made only when its size is at most the rule's ``exact_limit_bytes`` (default
4 GiB, i.e. fp32 models up to 2 GiB of parameters and buffers) and freed when its outputs are
computed. When it is too large, or the model cannot run in float64 (it casts internally, or an op
lacks a float64 kernel), a note says so and the fixed floor alone applies.

**Perturbed runs** (``rule.perturbations``, default 4, a fixed count, all made at once when a
candidate first needs them: :func:`normfold.check.reference.check`). Run ``k`` is a copy of the
original *in its own dtype* (float32 for a float16/bfloat16 model, whose own forward rounding would
swamp the perturbation, as in a float64 run: a float32 forward costs no more than theirs on CPU)
whose every floating parameter and buffer ``t`` is replaced by ``round(t * (1 + d))``, ``d`` uniform
in ``(-u, u)`` (``u`` the unit roundoff of ``t``'s dtype, seeded by ``k``; ``round`` to nearest in
that dtype, so about a third of the entries move by one ulp): the rounding a fold applies to its
new parameters. Its distance from
the exact run, ``|pert_k - exact|``, holds both that parameter sensitivity and the forward's own
rounding (a fresh sample of it, the kind of error the original's own run shows once), so it is
a noise estimate at least of the order of either alone, for the price of a forward in the
model's dtype (a float64 forward costs about 2.5 of those on CPU: measured on a resnet50-like
model at 224 px, one thread).

The runs are independent tasks (:func:`normfold.check.workers.run_all`): the exact run of each set, and
each perturbed run over every set (one copy of the model per worker thread, perturbed anew for
each run and freed at the end).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normfold.dtypes import LOW_PRECISION
from normfold.errors import first_line

if TYPE_CHECKING:
    from normfold.check.input_sets import InputSet
    from normfold.check.parity_rule import ParityRule

__all__ = ["as_plain", "exact_like", "exact_outputs", "perturb", "perturbed_noise"]

_WIDE = "float64 copy of the original"


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def floating(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in _tensors(model) if t.is_floating_point()]


def as_float64(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return _as(inputs, torch.float64)


def _as(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


#: dtypes whose own forward rounding would swamp a one-rounding parameter perturbation: their
#: perturbed runs compute in float32 (differential fuzz seed 5: a bfloat16 norm of mean 30 under
#: variance 1e-5, whose bfloat16 perturbed runs made a check the float64 truth decides undecidable)


def perturb(copy_: nn.Module, model: nn.Module, seed: int) -> None:
    """Set each floating tensor of ``copy_`` (a copy of ``model``, same dtypes) to ``model``'s
    value times ``1 + d`` rounded to its dtype, ``d`` uniform in ``(-u, u)``, ``u`` the unit
    roundoff of that dtype (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w, t in zip(_tensors(copy_), _tensors(model), strict=True):
            if not (w.is_floating_point() and t.is_floating_point()):
                continue
            u = torch.finfo(t.dtype).eps / 2
            # t + t * d in float32 (float64 for float64 tensors) is t * (1 + d) to far below one
            # rounding of t's dtype, at a fraction of the cost of a float64 draw for every entry
            wide = torch.float64 if t.dtype == torch.float64 else torch.float32
            d = torch.rand(t.shape, generator=gen, dtype=wide).mul_(2).sub_(1).mul_(u).to(t.device)
            if t.dtype == wide == w.dtype:
                w.copy_(t).addcmul_(w, d)  # in place on the copy, rounded once to its dtype
            else:  # rounded to t's dtype, then held in w's (float32 for a float16 model's run)
                exact = t.to(wide, copy=True)
                w.copy_(exact.addcmul_(exact, d).to(t.dtype))


def exact_outputs(
    model: nn.Module,
    sets: Sequence[InputSet],
    rule: ParityRule,
    notes: list[str],
    run: Callable[[nn.Module, tuple[torch.Tensor, ...], str], Any],
    run_all: Callable[[list[Callable[[], Any]]], list[Any]],
    exact: Callable[[], Callable[[tuple[torch.Tensor, ...]], Any]] | None = None,
) -> tuple[list[Any] | None, Callable[[], list[list[Any]]]]:
    """The float64 copy's outputs per set (None: no exact reference, ``notes`` say why), and a
    function that makes, when first called, per set the perturbed runs' outputs (a failure of theirs
    noted in ``notes``). ``run(model, inputs, role)`` runs one forward; ``run_all`` runs the tasks
    (:func:`normfold.check.workers.run_all`). ``exact()``, when given, builds the exact reference's
    runner (``runner(float64 inputs)``, e.g. a widened captured graph) in place of a float64 copy
    of ``model``; it is built only within ``rule.exact_limit_bytes``, as the copy."""
    tensors = floating(model)
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return None, _no_runs  # already float64: the original's outputs are the exact reference
    size = sum(t.numel() for t in tensors) * 8
    if size > rule.exact_limit_bytes:
        notes.append(
            f"no float64 reference: a float64 copy of the model needs {size:,} bytes, over the limit "
            f"of {rule.exact_limit_bytes:,} ({rule.exact_limit_bytes / 2**30:.1f} GiB); judged by the "
            "fixed tolerance alone"
        )
        return None, _no_runs
    try:
        exact_run = _float64_copy(model, run) if exact is None else exact()
    except Exception as e:
        notes.append(f"no float64 reference ({first_line(e)}); judged by the fixed tolerance alone")
        return None, _no_runs
    count = rule.perturbations if tensors else 0

    local = threading.local()  # one perturbed copy per worker thread, perturbed anew per task
    low = any(t.dtype in LOW_PRECISION for t in tensors)

    def perturbed(seed: int) -> list[Any]:
        noisy = getattr(local, "copy", None)
        if noisy is None:
            noisy = local.copy = copy.deepcopy(model).to(torch.float32) if low else copy.deepcopy(model)
        perturb(noisy, model, seed)  # sets every floating tensor: nothing of the last seed stays
        role = "perturbed copy of the original"
        return [run(noisy, _as(s.inputs, torch.float32) if low else s.inputs, role) for s in sets]

    exact_tasks = [lambda s=s: _attempt(lambda: exact_run(as_float64(s.inputs))) for s in sets]
    found = run_all(exact_tasks)
    failed = next((r for r in found if isinstance(r, Exception)), None)
    if failed is not None:  # a model that casts internally, or an op without a float64 kernel
        notes.append(f"no float64 reference ({first_line(failed)}); judged by the fixed tolerance alone")
        return None, _no_runs

    def perturbed_runs() -> list[list[Any]]:
        runs = run_all([lambda k=k: _attempt(lambda: perturbed(k)) for k in range(count)])
        failed = next((r for r in runs if isinstance(r, Exception)), None)
        if failed is not None:  # e.g. a buffer used as an exact constant: its own noise alone then
            notes.append(f"no perturbed run ({first_line(failed)}); the model's own error alone")
            runs = []
        return [[r[i] for r in runs] for i in range(len(sets))]

    return found, perturbed_runs


def _no_runs() -> list[list[Any]]:
    return []


def _float64_copy(
    model: nn.Module, run: Callable[[nn.Module, tuple[torch.Tensor, ...], str], Any]
) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    """The default exact reference: a float64 copy of ``model``, run by ``run``."""
    wide = copy.deepcopy(model).to(torch.float64)
    return lambda x: run(wide, x, _WIDE)


def _attempt(task: Callable[[], Any]) -> Any:
    """``task()``, or the exception it raised: a note, not an error (the floor still judges)."""
    try:
        return task()
    except Exception as e:
        return e


def perturbed_noise(
    perturbed: tuple[Any, ...], e: torch.Tensor, where: torch.Tensor, own: torch.Tensor
) -> torch.Tensor:
    """Per element, the largest distance from the exact run of the original (``own``) and of each
    perturbed run (elements finite in both; elsewhere 0)."""
    noise = torch.where(where, own, torch.zeros((), dtype=own.dtype))
    for p in perturbed:
        p = exact_like(p, e)
        if p is not None:
            ok = where & torch.isfinite(p)
            noise = torch.maximum(noise, torch.where(ok, (p - e).abs(), torch.zeros((), dtype=own.dtype)))
    return noise


def exact_like(exact: Any, r: torch.Tensor) -> torch.Tensor | None:
    """The exact reference leaf as ``r``'s wide dtype, or None when there is none that fits."""
    if not isinstance(exact, torch.Tensor) or exact.shape != r.shape:
        return None
    return as_plain(exact).to(device=r.device, dtype=r.dtype)


def as_plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t


def perturbed_tensor(t: torch.Tensor, gen: torch.Generator, into: torch.dtype) -> torch.Tensor:
    """One tensor by :func:`perturb`'s rule: ``t * (1 + d)`` rounded to ``t``'s dtype, ``d``
    uniform in ``(-u, u)`` (``u``: that dtype's unit roundoff) drawn from ``gen`` in float32
    (float64 for a float64 tensor), then held in ``into`` (a new tensor; ``t`` is unchanged)."""
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    u = torch.finfo(t.dtype).eps / 2
    d = torch.rand(t.shape, generator=gen, dtype=wide).mul_(2).sub_(1).mul_(u).to(t.device)
    exact = t.to(wide, copy=True)
    return exact.addcmul_(exact, d).to(t.dtype).to(into)
