"""The rule table: every fold pattern, one class each; the order *is* the priority.

Within a direction the planner (:mod:`normfold.engine.planner`) takes the first rule whose
``match`` finds its shape, so a more specific shape comes before a more general one. The three
backward rules match disjoint shapes of one walk (no merge, a concat, a sum), so their order only
fixes which walk is tried first; :class:`ConstantWeight` matches only norms on parameters alone,
which no other rule takes; backward rules as a whole come before forward ones (a norm folds
into the layer that produced its input where it can, which leaves the layers after it untouched).

To add a pattern: write one class with ``name``, ``direction``, ``match``, ``check`` and ``plan``
(:mod:`normfold.engine.rules.base`) and add one entry here.
"""

from __future__ import annotations

from normfold.engine.rules.backward import ConcatThenNorm, LayerThenNorm, SumThenNorm
from normfold.engine.rules.base import FoldRule
from normfold.engine.rules.constant import ConstantWeight
from normfold.engine.rules.forward import NormThenLayers

RULES: tuple[FoldRule, ...] = (
    ConstantWeight(),  # a weight standardized in forward, computed once (then a norm after folds)
    LayerThenNorm(),  # conv-bn, linear-bn, conv_transpose-bn, conv-affine, ...
    ConcatThenNorm(),  # cat(conv, conv) -> bn: split per slice
    SumThenNorm(),  # conv + conv -> bn: every branch scaled, one shifted
    NormThenLayers(),  # bn -> (ops ->) conv/linear, every consumer
)

__all__ = [
    "RULES",
    "ConcatThenNorm",
    "ConstantWeight",
    "FoldRule",
    "LayerThenNorm",
    "NormThenLayers",
    "SumThenNorm",
]
