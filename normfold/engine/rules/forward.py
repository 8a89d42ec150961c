"""Forward fold: a norm ``y = s * x + t`` before layers, folded into their inputs.

Every use of the norm's output, through commuting ops, must be the data input of a Conv or
Linear; input channel ``i`` of such a layer is norm channel ``c(i)``:

    W'[:, i] = W[:, i] * s[c(i)],    b' = b + sum_i W[:, i] * t[c(i)]   (summed over the kernel)

Exact only where the layer adds no zero padding (a zero border would see ``0`` instead of ``t``;
copying padding modes are fine) and is not transposed (a shift would reach border outputs a
different number of times). A norm feeding several layers folds into all of them or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from normfold.engine.channels import push_forward
from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.records import Fold, LayerUpdate
from normfold.engine.rules.base import NormRule, norm_tag
from normfold.engine.rules.checks import check_layer, check_positive
from normfold.engine.rules.walks import ForwardTrace, trace_forward


@dataclass
class ForwardMatch:
    cand: Candidate
    trace: ForwardTrace
    updates: list[LayerUpdate] = field(default_factory=list)  # filled by check


class NormThenLayers(NormRule):
    name: ClassVar[str] = "norm-layer"
    direction: ClassVar[str] = "forward"

    def match(self, ctx: Context, cand: Candidate) -> ForwardMatch | None:
        if cand.s is None:  # no map on data (a constant)
            return None
        return ForwardMatch(cand, trace_forward(ctx, cand))

    def check(self, ctx: Context, m: ForwardMatch) -> Refused | None:
        cand, view, name = m.cand, ctx.view, m.cand.unit.name
        x_shape = view.shape(cand.inputs[0])
        m.updates = []
        try:
            for sink in m.trace.sinks:
                layer, what = sink.layer, view.describe(sink.layer.node)
                check_layer(view, layer, f"folding {name} into it")
                if layer.transposed:
                    return Refused(
                        "transposed_consumer",
                        f"{name} feeds {what}, a transposed conv: a shift would reach border outputs "
                        "a different number of times",
                    )
                if layer.zero_padding:
                    return Refused(
                        "zero_padding_forward",
                        f"{name} feeds {what}, whose zero padding would see 0 instead of the norm's "
                        "shift at the borders",
                    )
                check_positive(view, name, sink.path, cand.s)
                scale, shift = push_forward(
                    ctx, name, cand.s, cand.t, cand.axis, x_shape, cand.nodes[-1], layer, sink.path
                )
                m.updates.append(ctx.update(layer, "input", scale, shift))
        except Refused as r:
            return r
        return None

    def plan(self, ctx: Context, m: ForwardMatch) -> Fold:
        pattern = f"{norm_tag(m.cand)}-{m.updates[0].kind}"
        through = tuple(dict.fromkeys(ctx.view.name(n) for s in m.trace.sinks for n in s.path))
        return Fold(m.cand.unit, pattern, tuple(m.updates), through, ctx.after())
