"""Grouped matmuls told by what they compute, not by their name: an MoE's experts in one op.

``y = grouped_mm(x, W, offs)`` with ``x`` of shape ``(T, in)``, ``W`` of shape ``(E, in, out)`` and
``offs`` the cumulative row counts of the groups computes ``y[s:e] = x[s:e] @ W[g]`` for the rows
``s:e`` of group ``g``: a batch of Linears over ``x``'s last axis, so a per-channel scale on ``x``
moves into ``W``'s input axis (``(x * g) @ W[e] = x @ (g[:, None] * W[e])``) whatever the grouping.
``aten._grouped_mm`` is one by definition. Any other operator whose schema is three tensors in, one
out (Hugging Face's ``transformers::grouped_mm_fallback``, another library's own kernel) is one when
it computes exactly that on a probe: integer-valued float32 operands (every product and sum exact),
two groups of different sizes, then an empty first group. The answer is cached per operator.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["is_grouped_mm"]

_BUILTIN = "_grouped_mm"


def is_grouped_mm(target: Any) -> bool:
    """``target`` (an fx node's target) is a grouped matmul (module docstring)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace == "aten":
        return target._overloadpacket.__name__ == _BUILTIN
    if target.namespace == "prims" or not _three_tensors_in_one_out(target):
        return False
    return _probe(target)


def _three_tensors_in_one_out(target: torch._ops.OpOverload) -> bool:
    schema = target._schema
    args, rets = schema.arguments, schema.returns
    tensor = torch._C.TensorType.get()
    return (
        len(args) == 3 and all(a.type == tensor for a in args) and len(rets) == 1 and rets[0].type == tensor
    )


@functools.cache
def _probe(target: torch._ops.OpOverload) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (5, 3), generator=gen).float()
    w = torch.randint(-3, 4, (2, 3, 4), generator=gen).float()
    cases = [(torch.tensor([2, 5], dtype=torch.int32), torch.cat([x[:2] @ w[0], x[2:] @ w[1]])),
             (torch.tensor([0, 5], dtype=torch.int32), x @ w[1])]  # fmt: skip
    try:
        with torch.no_grad():
            return all(torch.equal(target(x, w, offs), want) for offs, want in cases)
    except Exception:  # an operator that does not run on the probe is no grouped matmul
        logger.debug("probing %s as a grouped matmul failed", target, exc_info=True)
        return False
