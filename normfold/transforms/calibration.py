"""Recalibrate BatchNorm running statistics: the exact statistics of what each batch-norm op
normalizes in eval mode.

Running averages (an EMA with ``momentum``) only approximate the statistics of the data, and they
were measured in train mode, where every earlier norm normalized with *batch* statistics. A folded
model runs in eval mode, so each norm should hold the statistics of the tensor its batch-norm op
normalizes in eval mode, with the (recalibrated) norms before it in place. :func:`recalibrate`
computes exactly that. With ``x`` the op's actual input on every batch (caught at the ATen op,
:mod:`normfold.transforms.calibration_capture`: after whatever the module's ``forward`` does to its own input
first, e.g. a subclass's ``super().forward(x * 3)`` or a channels-last transpose; ``F.batch_norm``
calls with a module's buffers count as that module's norm):

    mean_c = sum_i x_ic / n            var_c = sum_i (x_ic - mean_c)^2 / n

over every sample and every position of channel ``c`` (axis 1 of the op's input), ``n`` values per
channel on all the batches, accumulated in float64 (per call mean and sum of squared deviations,
merged with Chan's parallel formula, so no catastrophic cancellation). The **biased** variance
(divided by ``n``) is stored: it is the exact variance of the data given, which is what eval mode
normalizes by; PyTorch's training updates store an unbiased estimate because a batch is a sample
of the data, but here the data is the whole population the statistics are meant for (with ``n`` in
the thousands the two differ by ``1/n``).

**Order and cost.** A norm's input depends on the norms upstream of it, so they must be final
first. A first pass over the data finds every batch-norm op and its statistics and measures them
all; the model is captured once with ``torch.export`` and each norm gets a *level*: 1 plus the
highest level of the norms upstream of it. Level 1 is stored from the first pass; all norms of one
later level are independent and are measured in the same pass, so the cost is ``L`` passes for
``L`` levels (the longest chain of norms, fewer where branches run side by side). A model that
cannot be captured (or whose capture misses a norm the data reached) falls back to one pass per
norm, in the order their ops first run: an op can only depend on ops that ran before it.

**Exact or left unchanged, with a code** (:data:`CODES`). Statistics are stored only where they are
exact: an op that runs several times in one forward (a module called at several places,
``multiple_calls``) sees inputs from several call sites, so no one set of statistics is exact for
every call (pooled ones would even move again on a second pass): it is left unchanged and
reported, as is an op that normalizes with batch statistics in eval mode (``batch_statistics``),
a norm whose op never ran (``unused``) or saw no values (``no_values``), and statistics its
buffers' dtype cannot hold (``bad_statistics``).

**Refused data.** An empty batch or input, or a non-finite value in the data, makes the
statistics NaN: :class:`~normfold.errors.UsageError` naming the batch and input. A forward that
fails on a batch (wrong channel count, a dtype other than the weights'), or a norm's input that
is not finite although the data is, is a :class:`~normfold.errors.TraceError` naming the batch.
Either way nothing has changed: data is checked before the model is touched, and any later error
puts every replaced buffer back. Each forward gets copies of its batch, so a forward that changes
its input in place changes neither the caller's data nor what a later pass sees.

Each recalibrated norm reports its drift: ``mean_drift = max_c |mean_old - mean_new| / std_new``
and ``std_drift = max_c |std_old / std_new - 1|`` (``std = sqrt(var + eps)``, with the op's own
``eps``), so stale statistics show before they are folded in. Nothing but ``running_mean``/
``running_var`` of the recalibrated norms changes (new tensors, set wherever the old ones were
registered, so tied buffers stay tied).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.codes.kept import Kept
from normfold.engine.capture import CaptureOptions, bind, capture
from normfold.errors import NormfoldError, UsageError
from normfold.prepare import check_materialized, working_copy
from normfold.transforms.calibration_capture import (
    BATCH_NORM_OPS,
    BufferIndex,
    Moments,
    Norm,
    OpCalls,
    check_batches,
    run_batch,
)

logger = logging.getLogger(__name__)

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]

#: every code a norm left unchanged gets
CODES = {
    "multiple_calls": "its batch-norm op runs several times in one forward: the call sites' inputs mix",
    "batch_statistics": "no running statistics, or its op normalizes with batch statistics in eval mode",
    "unused": "no batch-norm op ran with its statistics on the data",
    "no_values": "its batch-norm op's input has no values",
    "bad_statistics": "the statistics do not fit the buffers' dtype",
}


@dataclass(frozen=True)
class Recalibrated:
    norm: str
    level: int
    values: int  # values per channel the statistics were computed from
    mean_drift: float  # max over channels of |old - new mean| in units of the new std
    std_drift: float  # max over channels of |old std / new std - 1|


@dataclass(frozen=True)
class NotRecalibrated(Kept):
    """A norm whose statistics were left unchanged, with a stable code and a readable reason."""

    norm: str
    code: str
    reason: str
    subject_field = "norm"

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


@dataclass
class RecalibrateResult:
    model: nn.Module
    norms: list[Recalibrated] = field(default_factory=list)
    skipped: dict[str, NotRecalibrated] = field(default_factory=dict)  # norm -> code and reason
    passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "norms": [asdict(n) for n in self.norms],
            "skipped": [asdict(s) for s in self.skipped.values()],
        }

    def _skip(self, norm: str, code: str, reason: str) -> None:
        self.skipped.setdefault(norm, NotRecalibrated(norm, code, reason))


def recalibrate(model: nn.Module, batches: Iterable[Batch], *, inplace: bool = False) -> RecalibrateResult:
    """Replace the running statistics of every norm (BatchNorm modules, subclasses, functional
    ``F.batch_norm`` calls with a module's buffers) by the exact eval-mode statistics of what its
    batch-norm op normalizes on ``batches`` (tensors or tuples of tensors; a DataLoader works).
    Norms whose statistics cannot be exact stay unchanged, listed in ``skipped`` with a code."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"recalibrate() expects a torch.nn.Module, got {type(model).__name__}")
    data = [_as_tuple(b) for b in batches]  # several passes are needed: read a generator once
    if not data:
        raise UsageError("recalibrate() needs at least one batch")
    check_batches(data)
    check_materialized(model)  # a meta or lazy model has no values to work on
    model = working_copy(model, "recalibrate", inplace=inplace)
    result = RecalibrateResult(model=model)
    modes = {m: m.training for m in model.modules()}
    replaced: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        model.eval()
        _recalibrate(model, data, result, replaced)
    except BaseException:
        for module, name, old in reversed(replaced):  # nothing changed unless everything did
            module._buffers[name] = old
        raise
    finally:
        for m, training in modes.items():
            m.training = training
    logger.info("recalibrated %d norm(s) in %d pass(es)", len(result.norms), result.passes)
    return result


def _recalibrate(
    model: nn.Module,
    data: list[tuple[torch.Tensor, ...]],
    result: RecalibrateResult,
    replaced: list[tuple[nn.Module, str, torch.Tensor]],
) -> None:
    index = BufferIndex(model)
    calls = found = _measure(model, data, index, None)  # finds every norm and measures all of them
    result.passes = 1
    wanted = [norm for norm in found.order if not _kept(norm, found, result)]
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            if m.running_mean is None or m.running_var is None:
                result._skip(name, "batch_statistics", "no running statistics (track_running_stats=False)")
            elif index.norm(m.running_mean, m.running_var) not in found.seen:  # by identity: tied ones ran
                result._skip(name, "unused", "no batch-norm op ran with its statistics on the data")
    levels = _levels(model, data[0], wanted, index) if wanted else {}
    for level in sorted(set(levels.values())):
        group = [norm for norm in wanted if levels[norm] == level]
        if level > 1:
            index.refresh()  # the previous level's stores are new tensors
            calls = _measure(model, data, index, group)
            result.passes += 1
        for norm in group:
            if not _kept(norm, calls, result):
                _store(model, norm, calls.moments[norm], found.eps[norm], level, result, replaced)


def _measure(
    model: nn.Module, data: list[tuple[torch.Tensor, ...]], index: BufferIndex, group: list[Norm] | None
) -> OpCalls:
    """One pass over the data, measuring the op inputs of ``group`` (all norms when None)."""
    calls = OpCalls(index, group)
    for i, batch in enumerate(data):
        run_batch(model, calls, batch, i)
    return calls


def _kept(norm: Norm, calls: OpCalls, result: RecalibrateResult) -> bool:
    """Whether ``norm`` stays unchanged (recorded in ``result.skipped`` with its code)."""
    if norm.name in result.skipped:
        return True
    if norm in calls.batch_statistics:
        result._skip(
            norm.name,
            "batch_statistics",
            "its batch-norm op normalizes with each batch's own statistics in eval mode (training=True), "
            "not with the running statistics: left unchanged",
        )
    elif calls.most_calls[norm] > 1:
        result._skip(
            norm.name,
            "multiple_calls",
            f"its batch-norm op runs {calls.most_calls[norm]} times in one forward (a module called at "
            "several places): its inputs mix the call sites, so no one set of statistics is exact for "
            "every call: left unchanged",
        )
    elif norm in calls.moments and calls.moments[norm].n == 0:
        result._skip(norm.name, "no_values", "its batch-norm op's input has no values: left unchanged")
    return norm.name in result.skipped


def _as_tuple(batch: Batch) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    raise UsageError(f"each batch must be a tensor or a tuple of tensors, got {type(batch).__name__}")


def _levels(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], wanted: list[Norm], index: BufferIndex
) -> dict[Norm, int]:
    """Norm -> level (1 + the highest level upstream), from one torch.export capture; in the
    order the ops first ran (one level each) when the model cannot be captured, or the capture
    does not show every norm (a path the first batch did not take)."""
    try:
        graph = capture(model, inputs, CaptureOptions(dynamic_batch=False))
    except NormfoldError:
        logger.info("model cannot be captured: one pass per norm, %d passes", len(wanted))
        return {norm: i + 1 for i, norm in enumerate(wanted)}
    level: dict[Any, int] = {}
    out: dict[Norm, int] = {}
    for node in graph.graph.nodes:
        upstream = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in BATCH_NORM_OPS:
            args = bind(node)
            stats = (_buffer(model, graph.state_of(args.get(k))) for k in ("running_mean", "running_var"))
            norm = index.norm(*stats)
            if norm in wanted:
                upstream += 1
                out[norm] = max(out.get(norm, 0), upstream)
        level[node] = upstream
    if len(out) < len(wanted):
        logger.info("the capture misses %d norm(s): one pass per norm", len(wanted) - len(out))
        return {norm: i + 1 for i, norm in enumerate(wanted)}
    return out


def _buffer(model: nn.Module, fqn: str | None) -> torch.Tensor | None:
    try:
        return model.get_buffer(fqn) if fqn else None
    except AttributeError:
        return None


def _store(
    model: nn.Module,
    norm: Norm,
    acc: Moments,
    eps: float,
    level: int,
    result: RecalibrateResult,
    replaced: list[tuple[nn.Module, str, torch.Tensor]],
) -> None:
    assert acc.mean is not None and acc.m2 is not None
    old_mean, old_var = model.get_buffer(norm.mean), model.get_buffer(norm.var)
    var = acc.m2 / acc.n
    new_mean, new_var = acc.mean.to(old_mean.device, old_mean.dtype), var.to(old_var.device, old_var.dtype)
    if not (bool(torch.isfinite(new_mean).all()) and bool(torch.isfinite(new_var).all())):
        result._skip(
            norm.name,
            "bad_statistics",
            f"its statistics (largest |mean| {float(acc.mean.abs().max()):.3g}, largest variance "
            f"{float(var.max()):.3g}) do not fit its {str(old_var.dtype).removeprefix('torch.')} buffers: "
            "left unchanged",
        )
        return
    old_std = torch.sqrt(old_var.detach().to(torch.float64).cpu() + eps)
    new_std = torch.sqrt(var.cpu() + eps)
    mean_drift = ((old_mean.detach().to(torch.float64).cpu() - acc.mean.cpu()).abs() / new_std).max()
    std_drift = (old_std / new_std - 1).abs().max()
    # new tensors, never in place: the caller's model may share them; set in every slot that
    # holds the old one, so buffers tied between modules stay tied
    for old, new in ((old_mean, new_mean), (old_var, new_var)):
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is old:
                    replaced.append((module, name, old))
                    module._buffers[name] = new
    result.norms.append(Recalibrated(norm.name, level, acc.n, float(mean_drift), float(std_drift)))
