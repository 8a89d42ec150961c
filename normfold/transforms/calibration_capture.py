"""What each batch-norm op normalizes: its actual input, caught at the ATen op.

A norm's statistics must be those of the tensor its batch-norm *op* normalizes, which need not be
the input of the module that owns them: a subclass may transform it first
(``super().forward(x * 3.0)``), a channels-last ``BatchNorm1d`` transposes it (``(N, L, C)`` ->
``(N, C, L)``), and ``F.batch_norm(x, self.rm, self.rv, ...)`` in any module's ``forward``
normalizes with that module's buffers. So no module hook is used: the model runs under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, which sees every ATen op after autograd,
and every batch-norm op (``native_batch_norm`` on CPU, ``cudnn_batch_norm``/``miopen_batch_norm``
on GPUs, the ``_native_batch_norm_legit*`` and ``_batch_norm_*_update`` forms, and the composite
``batch_norm``/``_batch_norm_impl_index`` should one ever reach the mode) is read through its
schema by argument name: ``input`` is what it normalizes, over every axis but axis 1.

A call is attributed to a pair of the model's buffers by the identity of the ``running_mean`` and
``running_var`` tensors passed to it (the same tensor object, or a tensor with the same memory,
dtype, shape and strides): a call whose statistics are not the model's buffers (a clone, a
computed tensor, ``None``) belongs to no norm. A call that normalizes with batch statistics
(``training=True``) gets copies of the buffers, so that its in-place running-average update
cannot change the model while it is measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from normfold.errors import NormfoldError, TraceError, UsageError, first_line

aten = torch.ops.aten

#: batch-norm op packets -> whether one without a ``training`` argument normalizes with batch
#: statistics (the ``_no_training``/``_no_update`` forms use the running statistics)
BATCH_NORM_OPS: dict[Any, bool] = {
    aten.native_batch_norm: False,
    aten._native_batch_norm_legit: False,
    aten._native_batch_norm_legit_functional: False,
    aten._native_batch_norm_legit_no_training: False,
    aten.cudnn_batch_norm: False,
    aten.miopen_batch_norm: False,
    aten.batch_norm: False,
    aten._batch_norm_impl_index: False,
    aten._batch_norm_with_update: True,
    aten._batch_norm_with_update_functional: True,
    aten._batch_norm_no_update: False,
}


@dataclass(frozen=True)
class Norm:
    """A pair of the model's buffers that some batch-norm op normalizes with."""

    name: str  # the module owning running_mean (its buffer name when that is the root)
    mean: str  # running_mean's fully qualified name
    var: str  # running_var's fully qualified name


class Moments:
    """Per-channel count, mean and sum of squared deviations in float64 (Chan's merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> bool:
        """Merge ``x``'s values in; False (nothing merged) when they are not all finite."""
        n = x.numel() // x.shape[1] if x.shape[1] else 0  # values per channel: all axes but 1
        if n == 0:
            return True
        # one float64 reduction over every axis but the channel axis (no transposed copy); a
        # non-finite value makes its channel's mean or variance non-finite (float32 squares fit)
        var, mean = torch.var_mean(x.detach().to(torch.float64), dim=[0, *range(2, x.dim())], correction=0)
        if not bool(torch.isfinite(var).all()) or not bool(torch.isfinite(mean).all()):
            return False
        m2 = var * n
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return True
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total
        return True


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of a tensor's values: its memory, dtype, shape and strides (None for a tensor
    without storage of its own, e.g. a wrapper subclass)."""
    try:
        return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
    except RuntimeError:
        return None


class BufferIndex:
    """The model's buffers, to tell which pair a batch-norm op's statistics are."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: dict[tuple[str, str], str] = {}  # (mean, var) -> norm name, fixed at first sight
        self.refresh()

    def refresh(self) -> None:
        """Re-read the buffers (after a store replaced some)."""
        self.by_id: dict[int, str] = {}
        self.by_key: dict[tuple[Any, ...], str] = {}
        for fqn, t in self.model.named_buffers():
            self.by_id.setdefault(id(t), fqn)
            key = _key(t) if t.numel() > 0 else None
            if key is not None:
                self.by_key.setdefault(key, fqn)

    def name(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        fqn = self.by_id.get(id(t))
        if fqn is None and t.numel() > 0:
            key = _key(t)
            fqn = self.by_key.get(key) if key is not None else None
        return fqn

    def norm(self, mean: Any, var: Any) -> Norm | None:
        mean_fqn, var_fqn = self.name(mean), self.name(var)
        if mean_fqn is None or var_fqn is None:
            return None
        name = self.names.get((mean_fqn, var_fqn))
        if name is None:
            # the owning module's path, as fold names norms; its buffer's own name where that
            # module already names another pair (two F.batch_norm calls with different buffers)
            name = mean_fqn.rpartition(".")[0] or mean_fqn
            if name in self.names.values():
                name = mean_fqn
            self.names[(mean_fqn, var_fqn)] = name
        return Norm(name, mean_fqn, var_fqn)


def _bind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = [a.name for a in func._schema.arguments]
    return {**dict(zip(names, args, strict=False)), **kwargs}


class OpCalls(TorchDispatchMode):
    """Records the batch-norm op calls of a pass, one forward at a time (:meth:`start`): which
    norm, how often per forward, in which order, with batch statistics or not, with which ``eps``;
    accumulates the inputs of the norms in ``measure`` (of every norm when None)."""

    def __init__(self, index: BufferIndex, measure: Iterable[Norm] | None) -> None:
        super().__init__()
        self.index = index
        self.measure_all = measure is None
        self.moments: dict[Norm, Moments] = {norm: Moments() for norm in measure or ()}
        self.eps: dict[Norm, float] = {}
        self.order: list[Norm] = []  # first call of each norm, over all forwards
        self.seen: set[Norm] = set()
        self.most_calls: Counter[Norm] = Counter()  # most calls in one forward
        self.batch_statistics: set[Norm] = set()
        self.calls: Counter[Norm] = Counter()
        self.batch = 0

    def start(self, batch: int) -> None:
        self.batch, self.calls = batch, Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        batch_stats = BATCH_NORM_OPS.get(getattr(func, "overloadpacket", None))
        if batch_stats is None:
            return func(*args, **kwargs)
        bound = _bind(func, args, kwargs)
        norm = self.index.norm(bound.get("running_mean"), bound.get("running_var"))
        if norm is None:
            return func(*args, **kwargs)
        if norm not in self.seen:
            self.seen.add(norm)
            self.order.append(norm)
            if self.measure_all:
                self.moments[norm] = Moments()
        self.calls[norm] += 1
        self.most_calls[norm] = max(self.most_calls[norm], self.calls[norm])
        if bool(bound.get("training", batch_stats)):
            # its running-average update must not change the model while it is measured
            self.batch_statistics.add(norm)
            copies = {k: bound[k].clone() for k in ("running_mean", "running_var")}
            names = [a.name for a in func._schema.arguments]
            args = tuple(copies.get(n, a) for n, a in zip(names, args, strict=False))
            kwargs = {k: copies.get(k, v) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        self.eps[norm] = float(bound.get("eps", bound.get("epsilon", 0.0)))
        x = bound["input"]
        if norm in self.moments and not self.moments[norm].add(x):
            bad = int((~torch.isfinite(x)).sum())
            raise TraceError(
                f"the input of {norm.name}'s batch-norm op holds {bad:,} non-finite value(s) on batch "
                f"{self.batch} (finite data; the model overflows or divides by zero before it): "
                "its statistics would be NaN; nothing was changed"
            )
        return func(*args, **kwargs)


def describe(batch: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in batch)


def check_batches(batches: list[tuple[torch.Tensor, ...]]) -> None:
    """Refuse data whose statistics are NaN: an empty input or non-finite values."""
    for i, batch in enumerate(batches):
        for j, t in enumerate(batch):
            where = f"batch {i}, input {j} (shape {tuple(t.shape)}, {str(t.dtype).removeprefix('torch.')})"
            if t.numel() == 0:
                raise UsageError(
                    f"{where} has no values: the statistics of an empty batch are NaN; "
                    "recalibrate() needs at least one sample in every batch (nothing was changed)"
                )
            if t.is_floating_point() or t.is_complex():
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                if nan or inf:
                    raise UsageError(
                        f"{where} holds {nan:,} NaN and {inf:,} infinite value(s): the statistics of "
                        "non-finite data are not finite; recalibrate() needs finite batches "
                        "(nothing was changed)"
                    )


def run_batch(model: nn.Module, mode: OpCalls, batch: tuple[torch.Tensor, ...], i: int) -> None:
    """One eval-mode forward under ``mode``; a failing forward is a TraceError naming the batch
    (and the dtype it should have, when the data's is not the weights')."""
    mode.start(i)
    try:
        with torch.no_grad(), mode:
            # copies: a forward that changes its input in place must not change the next pass's data
            model(*(t.clone() for t in batch))
    except NormfoldError:
        raise
    except Exception as e:
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        other = sorted({str(t.dtype) for t in batch if t.is_floating_point() and t.dtype != weights})
        hint = (
            f"; the data is {', '.join(d.removeprefix('torch.') for d in other)} but the model's weights "
            f"are {str(weights).removeprefix('torch.')}: give batches of the weights' dtype"
            if weights is not None and other
            else ""
        )
        raise TraceError(
            f"the model ({type(model).__name__}) raised {type(e).__name__} during forward on batch {i} "
            f"(inputs {describe(batch)}): {first_line(e)}{hint}"
        ) from e
