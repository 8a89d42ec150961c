"""Plan records: what a plan decides, as pure data keyed by node names and FQNs.

A :class:`Plan` holds one :class:`Fold` per folded norm :class:`Unit` (the layers it folds into as
:class:`LayerUpdate` records: a per-channel ``scale``/``shift`` in float64 on the layer's output or
input side) and one :class:`Keep` per norm left in place, with a stable code (:mod:`normfold.codes`)
and a reason. :meth:`Plan.values` replays the folds into new parameter values:

    output side (backward fold):  W' = s * W (along output channels),  b' = s * b + t
    input side (forward fold):    W'[:, i] = W[:, i] * s_i,             b' = b + sum_i W[:, i] * t_i
    replace (a constant weight):  W' = value (what the graph computed from W alone), b' = b

Folds into one layer compose in plan order, in float64, and are cast back to the parameter dtype
once. Nothing here reads a graph: the records are what the planner hands to apply, replan, the
report and the gate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from normfold.codes.kept import Kept
from normfold.engine.affine import scale_input, scale_output


class Values(Protocol):
    """What :meth:`Plan.values` reads: the current tensors by FQN and the taken names."""

    names: set[str]

    def value(self, fqn: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class Unit:
    """One norm: a batch_norm op or a chain of constant affine ops (node names in graph order)."""

    nodes: tuple[str, ...]
    kind: str  # "batch_norm" or "affine"
    module: str  # owning module path ("" for the model's own forward)
    module_type: str
    call: str  # nn_module_stack key: tells repeated calls of one module apart
    stats: dict[str, str | None] = field(default_factory=dict, compare=False)  # role -> FQN (BN)
    #: the node the unit transforms: folding bypasses the unit, its users read this node instead
    input: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        """What users call this norm: its module path, or ``<module>:<op>`` for code in a forward."""
        stats = self.stats.get("running_mean")
        if self.kind == "batch_norm" and stats and "." in stats:
            return stats.rpartition(".")[0]  # the module holding the statistics, even for F.batch_norm
        if self.kind == "batch_norm" and self.module:
            return self.module
        return f"{self.module or 'forward'}:{self.nodes[0]}"


@dataclass(frozen=True)
class LayerUpdate:
    """A per-channel affine map folded into one layer, on its output or input side; or, on side
    ``replace``, the layer's weight replaced by ``value`` (then ``scale`` is 1 and ``shift`` 0)."""

    layer: str  # node name of the layer op
    module: str  # owning module path of the layer op
    module_type: str
    kind: str  # conv, conv_transpose, linear
    weight: str  # FQN
    bias: str | None  # FQN, None when the layer has no bias yet
    groups: int
    in_out: bool  # a matmul weight (in, out) rather than (out, in)
    side: str  # "output" (backward fold), "input" (forward fold) or "replace"
    scale: torch.Tensor  # float64, one per output (input) channel
    shift: torch.Tensor
    value: torch.Tensor | None = field(default=None, compare=False)  # float64, side "replace"


@dataclass(frozen=True)
class Fold:
    unit: Unit
    pattern: str  # e.g. conv-bn, linear-bn, bn-conv, concat-bn, add-bn, conv-affine
    updates: tuple[LayerUpdate, ...]
    through: tuple[str, ...]  # names of ops between the layer(s) and the norm
    after: tuple[str, ...]  # folded ops (node names) this fold passes through

    @property
    def identity(self) -> bool:
        """An op that changes nothing (``x + 0``, ``x * 1``): removed, but no norm to report."""
        return self.unit.kind == "affine" and all(
            bool((u.scale == 1).all() and (u.shift == 0).all()) for u in self.updates
        )


@dataclass(frozen=True)
class Keep(Kept):
    unit: Unit
    code: str
    reason: str
    #: the unit's per-channel map ``(s, t, channel axis)`` when it is one (float64), else None
    map: tuple[torch.Tensor, torch.Tensor, int | None] | None = field(default=None, compare=False)

    @property
    def subject(self) -> str:
        return self.unit.name


@dataclass
class Plan:
    folds: list[Fold] = field(default_factory=list)
    kept: list[Keep] = field(default_factory=list)
    #: per-channel maps that stay and are no norm (a layer scale ``x * gamma``): not reported
    silent: list[Keep] = field(default_factory=list)

    @property
    def removed(self) -> set[str]:
        return {n for f in self.folds for n in f.unit.nodes}

    def values(self, capture: Values, folds: list[Fold] | None = None) -> dict[str, torch.Tensor]:
        """New parameter values (FQN -> tensor in the parameter's dtype) after ``folds``.

        Folds touching one layer compose in plan order, in float64, and are cast back once. A
        bias created by a fold is named by :func:`new_bias_name` and takes the weight's dtype.
        The weights folded on their output side are computed side by side (:func:`materialize`).
        """
        return materialize(dict(self.iter_values(capture, folds, lazy=True)))

    def overflow(self, capture: Values, folds: list[Fold]) -> tuple[str, torch.dtype] | None:
        """The first new value after ``folds`` that is not finite in its dtype (its FQN and that
        dtype), else None; a block of rows at a time where the folds allow (:meth:`iter_values`)."""
        for fqn, updates in _by_layer(folds).items():
            weight = capture.value(fqn)
            if not weight.is_floating_point():
                continue
            if not _output_only(updates):
                mine = [f for f in folds if any(u.weight == fqn for u in f.updates)]
                bad = next(
                    (n for n, v in self.iter_values(capture, mine) if not bool(v.isfinite().all())), None
                )
                if bad is not None:
                    return bad, weight.dtype
                continue
            bias = capture.value(updates[0].bias).detach().to(torch.float64) if updates[0].bias else None
            rows, shift = RowBlocks.of(weight, bias, updates)
            if not _fits(rows) and any(not bool(torch.isfinite(block).all()) for _, block in rows.blocks()):
                return fqn, weight.dtype
            if not bool(torch.isfinite(shift.to(weight.dtype)).all()):
                return updates[0].bias or new_bias_name(capture, fqn), weight.dtype
        return None

    def iter_values(
        self, capture: Values, folds: list[Fold] | None = None, *, lazy: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
        """:meth:`values` one layer at a time (weight, then bias): only that layer's float64
        copy is alive, and a caller that writes each value away holds no full copy either.
        ``lazy``: a weight folded on its output side only comes as :class:`RowBlocks`."""
        for fqn, updates in _by_layer(self.folds if folds is None else folds).items():
            # one layer's float64 copy alive at a time
            weight = capture.value(fqn)
            bias_name = updates[0].bias or new_bias_name(capture, fqn)
            b = capture.value(updates[0].bias).detach().to(torch.float64) if updates[0].bias else None
            if _output_only(updates):
                yield from _scaled_rows(fqn, weight, bias_name, b, updates, lazy)
                continue
            w = weight.detach().to(torch.float64)
            for u in updates:
                if u.side == "replace":
                    w = u.value.to(w.device)
                    continue
                s, t = u.scale.to(w.device), u.shift.to(w.device)
                w = w.t() if u.in_out else w  # (out, in) for the fold math
                if u.side == "output":
                    w, b = scale_output(w, b, s, t, transpose=u.kind == "conv_transpose", groups=u.groups)
                else:
                    w, b = scale_input(w, b, s, t, groups=u.groups)
                w = w.t() if u.in_out else w
            yield fqn, w.to(weight.dtype)
            if b is not None:  # a replaced weight alone makes no bias
                yield bias_name, b.to(weight.dtype)
            del w, b


def materialize(values: dict[str, torch.Tensor | RowBlocks]) -> dict[str, torch.Tensor]:
    """``values`` with every :class:`RowBlocks` computed, one weight per task, each on one intra-op
    thread, as many at once as torch may use threads (:func:`normfold.check.workers.run_all`): as
    fast as two threads per op on an idle machine, and a preempted thread delays only its own
    weight where another process holds a core (one op per barrier would wait for it every time)."""
    from normfold.check.workers import run_all

    lazy = [k for k, v in values.items() if isinstance(v, RowBlocks)]
    done = run_all([values[k].tensor for k in lazy])  # type: ignore[union-attr]
    return {**values, **dict(zip(lazy, done, strict=True))}  # type: ignore[dict-item]


def _fits(rows: RowBlocks) -> bool:
    """``max|S| * max|W|`` is far inside the dtype's range, so every ``S W`` is finite: proven from
    two maxima, without computing the folded weight (the usual case in float32)."""
    w = rows.weight.detach()
    if not w.numel():
        return True
    bound = float(rows.scale.abs().max()) * float(w.abs().max())
    return math.isfinite(bound) and bound < torch.finfo(w.dtype).max / 2


def _by_layer(folds: list[Fold]) -> dict[str, list[LayerUpdate]]:
    """Weight FQN -> its updates, in plan order (the order the maps compose in)."""
    by_layer: dict[str, list[LayerUpdate]] = {}
    for fold in folds:
        for u in fold.updates:
            by_layer.setdefault(u.weight, []).append(u)
    return by_layer


def _output_only(updates: list[LayerUpdate]) -> bool:
    return all(u.side == "output" and u.kind != "conv_transpose" for u in updates)


#: float64 elements of a weight converted at once by :meth:`RowBlocks.blocks` (2 MB): a block that
#: stays in cache between its three passes (widen, scale, narrow) makes the fold's value math 2.4x
#: faster than 64 MB blocks (an 18.9M-element conv weight, 2 cores: 0.047 s against 0.112 s)
_CHUNK = 2**18


@dataclass
class RowBlocks:
    """A folded weight not computed yet, ``W' = S W`` along the output channels: written a block
    of rows at a time into a tensor of its shape (:meth:`write_into`, no whole copy ever), or made
    whole (:meth:`tensor`)."""

    weight: torch.Tensor  # the weight before the fold
    scale: torch.Tensor  # S: the output-side folds composed per channel (float64)
    in_out: bool  # an (in, out) matrix: the output channels are its columns

    @classmethod
    def of(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, updates: list[LayerUpdate]
    ) -> tuple[RowBlocks, torch.Tensor]:
        """The folded weight and the folded bias (float64, ``b' = S b + T``) of output-side folds."""
        scale = torch.ones(updates[0].scale.numel(), dtype=torch.float64)
        shift = torch.zeros_like(scale) if bias is None else bias.cpu()
        for u in updates:
            scale, shift = u.scale * scale, u.scale * shift + u.shift
        return cls(weight, scale, updates[0].in_out), shift

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows of W')`` in the weight's dtype, about :data:`_CHUNK` elements each."""
        w = self.weight
        view = [1] * w.dim()
        view[1 if self.in_out else 0] = -1
        scale = self.scale.to(w.device).reshape(view)
        rows = max(1, _CHUNK // max(1, w[0].numel()))
        for start in range(0, w.shape[0], rows):
            s = scale if self.in_out else scale[start : start + rows]
            # never in place: a float64 weight's .to(float64) is the weight itself
            yield start, (w[start : start + rows].detach().to(torch.float64) * s).to(w.dtype)

    def write_into(self, out: torch.Tensor) -> None:
        with torch.no_grad():
            for start, block in self.blocks():
                out[start : start + block.shape[0]] = block

    def tensor(self) -> torch.Tensor:
        out = torch.empty_like(self.weight, memory_format=torch.contiguous_format)
        self.write_into(out)
        return out


def _scaled_rows(
    fqn: str,
    weight: torch.Tensor,
    bias_name: str,
    bias: torch.Tensor | None,
    updates: list[LayerUpdate],
    lazy: bool,
) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
    """Output-side folds only (the usual case): the folds composed per output channel first, the
    weight scaled a block of rows at a time, so no float64 copy of a large weight is ever whole
    (``lazy``: nor a copy in its own dtype)."""
    rows, shift = RowBlocks.of(weight, bias, updates)
    yield fqn, rows if lazy else rows.tensor()
    yield bias_name, shift.to(device=weight.device, dtype=weight.dtype)


def new_bias_name(capture: Values, weight_fqn: str) -> str:
    """FQN for a bias created by a fold: ``<prefix>.bias``, unless that name is taken."""
    prefix, _, _ = weight_fqn.rpartition(".")
    name = f"{prefix}.bias" if prefix else "bias"
    return name if name not in capture.names else f"{weight_fqn}_folded_bias"
