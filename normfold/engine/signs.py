"""Signs: which scales an order-dependent op lets through.

A fold moves a norm's map ``y = s * x + t`` across the ops between the layer and the norm. Most of
them are linear in ``x`` (layout ops, averages: :mod:`normfold.engine.aten`), so any ``s`` passes. An
op that compares elements (max pooling, ``amax``; a :class:`~normfold.engine.view.ThroughRef` of
kind ``"max"``)
commutes only with an increasing map::

    max(s * x + t) = s * max(x) + t      for s > 0
    max(s * x + t) = s * min(x) + t      for s < 0     (a different value)

so every factor that crosses such an op must be positive: a per-channel ``s`` on each channel that
reaches it, and a scalar ``s`` (``x / -0.5``) just the same; a scalar is the per-channel case with
one value, never an exemption. :func:`blocking` is the one check both fold directions call, on
the scales they actually write into the layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from normfold.engine.view import GraphView, Node

#: kinds of pass-through ops that commute with increasing maps only
ORDER_DEPENDENT = frozenset({"max"})


def order_dependent(view: GraphView, path: Iterable[Node]) -> list[Node]:
    """The ops of ``path`` that compare elements (a negative scale does not pass them)."""
    return [n for n in path if (t := view.through(n)) is not None and t.kind in ORDER_DEPENDENT]


def blocking(view: GraphView, path: Iterable[Node], scale: torch.Tensor) -> tuple[Node, int] | None:
    """``(first order-dependent op of path, number of non-positive factors)`` when ``scale`` (any
    shape: a scalar or one value per channel) cannot cross ``path``, else None."""
    ops = order_dependent(view, path)
    if not ops:
        return None
    bad = int((~(scale > 0)).sum())  # NaN counts as not positive
    return (ops[0], bad) if bad else None
