"""Recalibrate BatchNorm running statistics: the exact statistics of what each norm sees in eval mode.

Running averages (an EMA with ``momentum``) only approximate the statistics of the data, and they
were measured in train mode, where every earlier norm normalized with *batch* statistics. A folded
model runs in eval mode, so each norm should hold the statistics of the input it gets in eval
mode, with the (recalibrated) norms before it in place. :func:`recalibrate` computes exactly that:

    mean_c = sum_i x_ic / n            var_c = sum_i (x_ic - mean_c)^2 / n

over every sample and every position of channel ``c`` (axis 1) on all the batches, accumulated in
float64 (per batch mean and sum of squared deviations, merged with Chan's parallel formula, so no
catastrophic cancellation). The **biased** variance (divided by ``n``) is stored: it is the exact
variance of the data given, which is what eval mode normalizes by; PyTorch's training updates
store an unbiased estimate because a batch is a sample of the data, but here the data is the whole
population the statistics are meant for (with ``n`` in the thousands the two differ by ``1/n``).

**Order and cost.** A norm's input depends on the norms upstream of it, so they must be final
first. The model is captured once with ``torch.export`` and each norm gets a *level*: 1 plus the
highest level of the norms upstream of it. All norms of one level are independent and are
recalibrated in the same pass over the data, so the cost is ``L`` passes for ``L`` levels (the
longest chain of norms, e.g. every norm of a plain sequential network, fewer where branches run
side by side). A model that cannot be captured falls back to one pass per norm, in execution
order. A norm called at several places accumulates over all its calls, at its highest level.

Each recalibrated norm reports its drift: ``mean_drift = max_c |mean_old - mean_new| / std_new``
and ``std_drift = max_c |std_old / std_new - 1|`` (``std = sqrt(var + eps)``), so stale statistics
show before they are folded in. Nothing but ``running_mean``/``running_var`` of the recalibrated
norms changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.errors import NormfoldError, UsageError
from normfold.folding import check_materialized, working_copy
from normfold.graph import CaptureOptions, bind, capture
from normfold.rules import BATCH_NORMS

logger = logging.getLogger(__name__)

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


@dataclass(frozen=True)
class Recalibrated:
    norm: str
    level: int
    values: int  # values per channel the statistics were computed from
    mean_drift: float  # max over channels of |old - new mean| in units of the new std
    std_drift: float  # max over channels of |old std / new std - 1|


@dataclass
class RecalibrateResult:
    model: nn.Module
    norms: list[Recalibrated] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # norm -> reason
    passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "norms": [asdict(n) for n in self.norms], "skipped": self.skipped}


class _Moments:
    """Per-channel count, mean and sum of squared deviations in float64 (Chan's merge)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, values)
        n = x.shape[1]
        mean = x.mean(1)
        m2 = ((x - mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total


def recalibrate(model: nn.Module, batches: Iterable[Batch], *, inplace: bool = False) -> RecalibrateResult:
    """Replace every tracked BatchNorm's running statistics by the exact eval-mode statistics of
    its input on ``batches`` (tensors or tuples of tensors; a DataLoader works)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"recalibrate() expects a torch.nn.Module, got {type(model).__name__}")
    batches = list(batches) if iter(batches) is batches else batches  # several passes are needed
    first = next(iter(batches), None)
    if first is None:
        raise UsageError("recalibrate() needs at least one batch")
    check_materialized(model)  # a meta or lazy model has no values to work on
    model = working_copy(model, "recalibrate", inplace=inplace)
    result = RecalibrateResult(model=model)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    for name, m in norms.items():
        if m.running_mean is None:
            result.skipped[name] = "no running statistics (track_running_stats=False)"
    modes = {m: m.training for m in model.modules()}
    try:
        levels = _levels(model, _as_tuple(first), {n for n in norms if n not in result.skipped})
        model.eval()
        for level in sorted(set(levels.values())):
            group = [n for n, lv in levels.items() if lv == level]
            moments = _one_pass(model, batches, {n: norms[n] for n in group})
            result.passes += 1
            for name in group:
                record = _store(name, norms[name], moments[name], level)
                if record is None:
                    result.skipped[name] = "never called as a module on the data"
                else:
                    result.norms.append(record)
    finally:
        for m, training in modes.items():
            m.training = training
    for name in norms:
        if name not in levels and name not in result.skipped:
            result.skipped[name] = "never called as a module on the data"
    logger.info("recalibrated %d norm(s) in %d pass(es)", len(result.norms), result.passes)
    return result


def _as_tuple(batch: Batch) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    raise UsageError(f"each batch must be a tensor or a tuple of tensors, got {type(batch).__name__}")


def _levels(model: nn.Module, inputs: tuple[torch.Tensor, ...], wanted: set[str]) -> dict[str, int]:
    """Norm module -> level (1 + the highest level upstream), from one torch.export capture."""
    try:
        graph = capture(model.eval(), inputs, CaptureOptions(dynamic_batch=False))
    except NormfoldError:
        order = _execution_order(model, inputs, wanted)
        logger.info("model cannot be captured: one pass per norm, %d passes", len(order))
        return {name: i + 1 for i, name in enumerate(order)}
    level: dict[Any, int] = {}
    out: dict[str, int] = {}
    for node in graph.graph.nodes:
        upstream = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        if node.op == "call_function" and node.target in BATCH_NORMS:
            fqn = graph.state_of(bind(node)["running_mean"]) or ""
            name = graph.canonical(fqn.rpartition(".")[0])
            if name in wanted:
                upstream += 1
                out[name] = max(out.get(name, 0), upstream)
        level[node] = upstream
    return out


def _execution_order(model: nn.Module, inputs: tuple[torch.Tensor, ...], wanted: set[str]) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order else None)
        for name, m in model.named_modules()
        if name in wanted
    ]
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def _one_pass(
    model: nn.Module, batches: Iterable[Batch], group: dict[str, _BatchNorm]
) -> dict[str, _Moments]:
    moments = {name: _Moments() for name in group}
    handles = [
        bn.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.add(args[0]))
        for name, bn in group.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*_as_tuple(batch))
    finally:
        for h in handles:
            h.remove()
    return moments


def _store(name: str, bn: _BatchNorm, acc: _Moments, level: int) -> Recalibrated | None:
    if acc.mean is None:
        return None
    var = acc.m2 / acc.n
    old_std = torch.sqrt(bn.running_var.detach().to(torch.float64).cpu() + bn.eps)
    new_std = torch.sqrt(var.cpu() + bn.eps)
    mean_drift = ((bn.running_mean.detach().to(torch.float64).cpu() - acc.mean.cpu()).abs() / new_std).max()
    std_drift = (old_std / new_std - 1).abs().max()
    # new tensors, never in place: the caller's model may share them
    bn.running_mean = acc.mean.to(bn.running_mean.device, bn.running_mean.dtype)
    bn.running_var = var.to(bn.running_var.device, bn.running_var.dtype)
    return Recalibrated(name, level, acc.n, float(mean_drift), float(std_drift))
