"""The norm-affine plan's values written into the user's module, by parameter name.

Each value (:meth:`~normfold.engine.norm_affine.records.NormPlan.values`, float64) is cast to the
parameter's dtype once and copied into the parameter of that name in place, so the
module's class, module paths and state-dict keys stay; a new bias (``new_biases=True``) is a new
``nn.Parameter`` on an ``nn.Linear`` whose ``bias`` was None, which its ``forward`` then adds.
The norm modules keep their parameters, set to the neutral scale and shift. A consumer weight
shared with another reader and untied by the plan (``Consumer.untie``) first becomes a copy
registered on the consumer alone, so the other reader keeps the unscaled original.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from normfold.engine.norm_affine.records import NormPlan


def tensor_of(model: nn.Module, fqn: str) -> torch.Tensor:
    """The parameter or buffer called ``fqn``."""
    module, _, attr = fqn.rpartition(".")
    owner = model.get_submodule(module)
    found = getattr(owner, attr)
    if not isinstance(found, torch.Tensor):
        raise KeyError(f"{fqn} is not a tensor of {type(model).__name__}")
    return found


def apply_plan(model: nn.Module, plan: NormPlan, values: Mapping[str, torch.Tensor]) -> None:
    """Write ``values`` (FQN -> tensor) into ``model``; the new biases of ``plan`` are created."""
    new = {c.new_bias for f in plan.folds for c in f.consumers if c.new_bias is not None}
    with torch.no_grad():
        for name in (n for f in plan.folds for c in f.consumers for n in c.untie):
            module, _, attr = name.rpartition(".")
            owner = model.get_submodule(module)
            shared = getattr(owner, attr)  # the other reader keeps this one
            setattr(owner, attr, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
        for fqn, value in values.items():
            if fqn in new:  # in its layer's dtype and device
                module, _, attr = fqn.rpartition(".")
                layer = model.get_submodule(module)
                weight = layer.weight
                setattr(layer, attr, nn.Parameter(value.to(device=weight.device, dtype=weight.dtype)))
            else:
                target = tensor_of(model, fqn)
                target.copy_(value.to(device=target.device, dtype=target.dtype))
