"""The norm-affine plan as data, and the new parameter values it implies.

Per norm, a :class:`NormFold` (its scale, and its shift unless that stays, moved into every
consumer) or a :class:`NormKept` (a stable code of :mod:`normfold.codes` and a reason: the record
:func:`normfold.fold_norm_affine` returns as it is). Values
(:meth:`NormPlan.values`) are float64, computed from the current parameters; whoever writes them
casts each to its parameter's dtype once (:mod:`.apply`). With ``g = offset + w`` the norm's
scale and ``c[j]`` the norm channel a consumer's input ``j`` reads:

    W'[:, j] = W[:, j] * g[c[j]]                (``(in, out)`` weights: row ``j``; a batch of
                                                 expert matrices: along its input axis)
    b'       = b + W @ beta[c]                  (``b`` 0 for a new bias)
    w'       = 1 - offset                       (the norm's scale becomes 1)
    beta'    = 0, or beta / g where the shift stays in the norm (``NormFold.shift_kept``)

Nothing here reads a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from normfold.codes.kept import Kept


@dataclass(frozen=True)
class NormRecord:
    """One norm as reports name it: ``name`` (its module path, or ``forward:<op>`` for code in a
    ``forward``), the module that ran it, and its scale / shift parameters (``offset + p``)."""

    name: str
    kind: str  # layer_norm, rms_norm, group_norm
    pattern: str  # the op (layer_norm, rms_norm, group_norm) or "hand-written"
    module: str
    module_type: str
    nodes: tuple[str, ...]
    weight: str | None
    weight_offset: float
    bias: str | None
    channels: int


@dataclass(frozen=True)
class Consumer:
    """A Linear fed by the norm: ``channels[j]`` is the norm channel its input ``j`` reads; ``bias``
    None when it has none (``new_bias``: the name a new one takes, else None)."""

    layer: str  # node name of the layer op
    module: str
    weight: str
    bias: str | None
    #: the weight's axis of input features: 1 for ``(out, in)``, 0 for ``(in, out)`` (``x @ W``,
    #: GPT-2's Conv1D), 1 or 2 for a batch of expert matrices ``(E, in, out)`` / ``(E, out, in)``
    in_axis: int
    channels: tuple[int, ...]
    through: tuple[str, ...] = ()  # ops between the norm and the layer (views, casts)
    new_bias: str | None = None
    #: names (``module.attr``) re-registered as the layer's own copy before the fold (``untie``):
    #: the weight (or bias) was shared with another reader, which keeps the original
    untie: tuple[str, ...] = ()


@dataclass(frozen=True)
class NormFold:
    norm: NormRecord
    consumers: tuple[Consumer, ...]
    #: ``(code, reason)`` when the shift stays in the norm (as ``beta / gamma``), else None
    shift_kept: tuple[str, str] | None = None


@dataclass(frozen=True)
class NormKept(Kept):
    """A norm left as it is, with a stable code (:mod:`normfold.codes`) and a reason."""

    norm: str
    kind: str
    pattern: str
    norm_type: str
    code: str
    reason: str
    subject_field = "norm"

    @classmethod
    def of(cls, norm: NormRecord, code: str, reason: str) -> NormKept:
        return cls(norm.name, norm.kind, norm.pattern, norm.module_type, code, reason)


@dataclass
class NormPlan:
    folds: list[NormFold] = field(default_factory=list)
    kept: list[NormKept] = field(default_factory=list)

    def values(self, value: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """New float64 values (on the CPU) by FQN (module docstring); ``value(fqn)``: the current
        tensor."""
        out: dict[str, torch.Tensor] = {}
        for fold in self.folds:
            out.update(fold_values(fold, value))
        return out


def scale_of(norm: NormRecord, value: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The norm's scale ``offset + w`` per channel, float64."""
    if norm.weight is None:
        return torch.ones(norm.channels, dtype=torch.float64)
    w = value(norm.weight).detach().to("cpu", torch.float64).reshape(-1)
    return (w + norm.weight_offset).expand(norm.channels)


def shift_of(norm: NormRecord, value: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
    if norm.bias is None:
        return None
    return value(norm.bias).detach().to("cpu", torch.float64).reshape(-1).expand(norm.channels)


def fold_values(fold: NormFold, value: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The new values of one fold: every consumer's weight (and bias), the norm's scale and shift."""
    norm = fold.norm
    gamma, beta = scale_of(norm, value), shift_of(norm, value)
    out: dict[str, torch.Tensor] = {}
    for c in fold.consumers:
        out.update(consumer_values(fold, c, gamma, beta, value))
    out.update(norm_values(fold, gamma, beta, value))
    return out


def consumer_values(
    fold: NormFold,
    c: Consumer,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    value: Callable[[str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The new weight (and bias) of one consumer ``c`` of ``fold`` (``gamma``/``beta``: the norm's
    :func:`scale_of` / :func:`shift_of`), float64: the one place the math is written
    (:func:`consumer_weight`, :func:`consumer_shift`), so a fold applied to one consumer at a time
    (a sharded checkpoint) gives the same bits as the whole fold."""
    move_shift = beta is not None and fold.shift_kept is None
    stored = value(c.weight).detach().to("cpu")
    out = {c.weight: consumer_weight(c, gamma, stored)}
    name = c.bias or c.new_bias
    if move_shift and name is not None:
        assert beta is not None
        bias = value(c.bias).detach().to("cpu") if c.bias is not None else None
        out[name] = consumer_bias(c, beta, stored, bias)
    return out


def consumer_bias(
    c: Consumer, beta: torch.Tensor, stored: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``b + W beta[c]`` in float64 (``bias`` None: a new bias, ``b`` = 0)."""
    shift = consumer_shift(c, beta, stored)
    return bias.to(torch.float64) + shift if bias is not None else shift


#: elements of one float64 block of a consumer weight (32 MB): the fold never holds a whole
#: weight in float64, only the stored tensor and one block
BLOCK = 1 << 22


def blocks(shape: torch.Size | tuple[int, ...]) -> list[slice]:
    """Fixed blocks of axis 0 of a tensor of ``shape`` (a function of the shape alone, so every
    caller computes the same sums in the same order)."""
    if not shape:
        return [slice(None)]
    per_row = 1
    for n in shape[1:]:
        per_row *= n
    rows = max(1, BLOCK // max(1, per_row))
    return [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)] or [slice(0, 0)]


def consumer_weight(
    c: Consumer, gamma: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``W * gamma[c]`` along ``c.in_axis``, computed in float64 block by block and cast to
    ``dtype`` once (elementwise: the blocks change no bit)."""
    g = _along(c, gamma, stored.dim())
    out = torch.empty(stored.shape, dtype=dtype)
    for s in blocks(stored.shape):
        out[s] = (stored[s].to(torch.float64) * (g[s] if c.in_axis == 0 else g)).to(dtype)
    return out


def consumer_weight_max(c: Consumer, gamma: torch.Tensor, stored: torch.Tensor) -> float:
    """The largest ``|W * gamma[c]|`` in float64, block by block (never the whole float64 weight)."""
    g = _along(c, gamma, stored.dim())
    top = 0.0
    for s in blocks(stored.shape):
        block = stored[s].to(torch.float64) * (g[s] if c.in_axis == 0 else g)
        top = max(top, block.abs().max().item()) if block.numel() else top
    return top


def _along(c: Consumer, gamma: torch.Tensor, ndim: int) -> torch.Tensor:
    """``gamma[c]`` shaped to multiply a weight of ``ndim`` axes along ``c.in_axis``."""
    shape = [1] * ndim
    shape[c.in_axis] = -1
    return gamma[torch.tensor(c.channels, dtype=torch.long)].reshape(shape)


def consumer_shift(c: Consumer, beta: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``W beta[c]`` (contracting ``c.in_axis``), float64, block by block along axis 0."""
    b = beta[torch.tensor(c.channels, dtype=torch.long)]
    if c.in_axis == 0:  # the blocks split the contracted axis: partial sums, in block order
        total = None
        for s in blocks(stored.shape):
            part = stored[s].to(torch.float64).movedim(0, -1) @ b[s]
            total = part if total is None else total + part
        assert total is not None
        return total
    parts = [stored[s].to(torch.float64).movedim(c.in_axis, -1) @ b for s in blocks(stored.shape)]
    return torch.cat(parts)


def norm_values(
    fold: NormFold, gamma: torch.Tensor, beta: torch.Tensor | None, value: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The norm's own new scale (neutral) and shift (0, or ``beta / gamma`` where it stays)."""
    norm = fold.norm
    move_shift = beta is not None and fold.shift_kept is None
    out: dict[str, torch.Tensor] = {}
    if norm.weight is not None:
        shape = value(norm.weight).shape
        out[norm.weight] = torch.full(shape, 1.0 - norm.weight_offset, dtype=torch.float64)
    if norm.bias is not None:
        assert beta is not None
        shape = value(norm.bias).shape
        kept = torch.zeros(shape, dtype=torch.float64) if move_shift else (beta / gamma).reshape(shape)
        out[norm.bias] = kept
    return out


def overflowing(
    fold: NormFold, values: dict[str, torch.Tensor], dtype_of: Callable[[str], torch.dtype]
) -> str | None:
    """The first value of ``fold`` that is not finite once cast to its parameter's dtype
    (``dtype_of(fqn)``), as ``"name (max |value|, dtype)"``; None when all fit."""
    checked = [(name, c.weight) for c in fold.consumers for name in (c.weight, c.bias or c.new_bias)]
    if fold.norm.bias is not None:  # the shift kept in the norm, beta / gamma, is a new value too
        checked.append((fold.norm.bias, fold.norm.bias))
    for name, owner in checked:
        wide = values.get(name) if name is not None else None
        dtype = dtype_of(owner)  # a consumer's bias has its layer's dtype (a new one takes it)
        if wide is not None and not bool(wide.to(dtype).isfinite().all()):
            return overflow_value(name, wide.abs().max().item(), dtype)
    return None


def overflow_value(name: str, top: float, dtype: torch.dtype) -> str:
    """A value that overflows its dtype, as records name it: ``"name (max |value| top, dtype)"``."""
    return f"{name} (max |value| {top:.6g}, {dtype})"


def overflow_reason(norm: str, value: str) -> str:
    """The reason of an ``overflow`` record: folding ``norm`` makes ``value`` (:func:`overflow_value`)
    overflow."""
    return f"folding {norm} makes {value} overflow"
