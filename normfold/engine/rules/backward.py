"""Backward folds: a norm ``y = s * x + t`` after layers, folded into their outputs.

For a layer ``z = W x + b`` whose output reaches the norm through commuting ops (channel ``c`` of
the norm is channel ``r(c)`` of the layer, :mod:`normfold.engine.channels`):

    W'[r(c)] = s[c] * W[r(c)],    b'[r(c)] = s[c] * b[r(c)] + t[c]

* :class:`LayerThenNorm`: one layer (``conv-bn``, ``linear-bn``, ``conv_transpose-affine`` ...);
* :class:`ConcatThenNorm`: ``cat(z_1, ..., z_k) -> norm``: each producer gets ``s``/``t`` on the
  channels it contributes (the norm splits per slice);
* :class:`SumThenNorm`: ``z_1 + z_2 -> norm``: ``s * (z_1 + z_2) + t = (s z_1 + t) + s z_2``:
  every producer gets ``s``, only the first gets ``t``.

Every layer's weight (and bias) must be a parameter read by that op alone, of the output's dtype;
a scale crossing a max must be positive (:mod:`normfold.engine.signs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from normfold.engine.channels import pull_back
from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.records import Fold, LayerUpdate
from normfold.engine.rules.base import NormRule, norm_tag
from normfold.engine.rules.checks import check_layer, check_positive
from normfold.engine.rules.walks import BackTrace, trace_back


@dataclass
class BackMatch:
    cand: Candidate
    trace: BackTrace
    updates: list[LayerUpdate] = field(default_factory=list)  # filled by check


class _Backward(NormRule):
    """The shared check and plan of the three backward shapes (they differ in what they match and
    in who gets the shift)."""

    name: ClassVar[str]
    direction: ClassVar[str] = "backward"
    merge: ClassVar[str | None]

    def match(self, ctx: Context, cand: Candidate) -> BackMatch | None:
        if cand.s is None:  # no map on data (a constant)
            return None
        trace = trace_back(ctx, cand)
        return BackMatch(cand, trace) if trace.merge_kind == self.merge else None

    def shifted(self, k: int) -> bool:
        """Whether branch ``k`` takes the norm's shift."""
        return True

    def check(self, ctx: Context, m: BackMatch) -> Refused | None:
        cand, view = m.cand, ctx.view
        branches = m.trace.branches
        if len({id(b.layer.node) for b in branches}) != len(branches):
            return Refused("repeated_branch", f"the same layer output reaches {cand.unit.name} twice")
        x_shape = view.shape(cand.inputs[0])
        m.updates = []
        try:
            for k, b in enumerate(branches):
                check_layer(view, b.layer, f"folding {cand.unit.name} into it")
                scale, shift = pull_back(
                    ctx, cand.unit.name, cand.s, cand.t, cand.axis, x_shape, b.layer, b.path
                )
                check_positive(view, cand.unit.name, b.path, scale)  # every factor, scalar or per-channel
                shift = shift if self.shifted(k) else torch.zeros_like(shift)
                m.updates.append(ctx.update(b.layer, "output", scale, shift))
        except Refused as r:
            return r
        return None

    def pattern(self, m: BackMatch) -> str:
        return f"{m.trace.branches[0].layer.kind}-{norm_tag(m.cand)}"

    def plan(self, ctx: Context, m: BackMatch) -> Fold:
        through = tuple(dict.fromkeys(ctx.view.name(n) for b in m.trace.branches for n in b.path))
        return Fold(m.cand.unit, self.pattern(m), tuple(m.updates), through, ctx.after())


class LayerThenNorm(_Backward):
    name = "layer-norm"
    merge = None


class ConcatThenNorm(_Backward):
    name = "concat-norm"
    merge = "concat"

    def pattern(self, m: BackMatch) -> str:
        return f"concat-{norm_tag(m.cand)}"


class SumThenNorm(_Backward):
    name = "sum-norm"
    merge = "add"

    def shifted(self, k: int) -> bool:
        return k == 0  # a sum gets the norm's shift once

    def pattern(self, m: BackMatch) -> str:
        return f"add-{norm_tag(m.cand)}"
