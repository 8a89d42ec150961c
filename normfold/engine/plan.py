"""Plan: which norm ops of a captured graph fold into which layers, as pure data.

The entry point over a ``torch.export`` capture; the engine does the work:
:mod:`normfold.engine.norms` finds the norm units (eval batch norms, constant affine chains) and
their per-channel maps ``y = s * x + t``, the rule table :mod:`normfold.engine.rules` (backward
folds into the layers before a norm, through commuting ops and at most one concat or sum; forward
folds into the layers after it) decides each, and :mod:`normfold.engine.planner` records every
decision as :mod:`normfold.engine.records` (a :class:`Fold` per folded unit, a :class:`Keep` with a
stable code and a reason per unit left in place).
"""

from __future__ import annotations

from collections.abc import Mapping

from normfold.engine import planner
from normfold.engine.capture import Capture
from normfold.engine.context import Refused
from normfold.engine.records import Fold, Keep, LayerUpdate, Plan, RowBlocks, Unit, new_bias_name
from normfold.engine.torch_view import TorchView, describe

__all__ = [
    "Fold", "Keep", "LayerUpdate", "Plan", "Refused", "RowBlocks", "Unit", "describe", "new_bias_name",
    "plan",
]  # fmt: skip


def plan(
    capture: Capture, keep: Mapping[str, tuple[str, str]] | None = None, view: TorchView | None = None
) -> Plan:
    """Plan every fold of the captured graph (pure: reads the graph, changes nothing). ``keep``:
    norms (by :attr:`Unit.name`) decided elsewhere to stay, with their ``(code, reason)`` (the
    measured gate of :mod:`normfold.engine.gate`). ``view``: the capture's view when the caller has one."""
    return planner.plan(view or TorchView.of(capture), capture, keep)

