"""A merged block's values: float64 from the capture's values, cast once, checked to fit.

The target conv takes ``W = sum_i c_i * centre(W_i)`` and ``b = sum_i c_i * b_i``
(:mod:`normfold.engine.reparam`). A conv branch's ``W_i``, ``b_i`` are its values after its own folds;
they are computed here in float64 from the capture's values (the folds' maps applied without
rounding), so the merged kernel is rounded once, to the weight's dtype, never a fold's rounded
value rounded again.

Branches that each fit their dtype can sum past it (float16: ``|x| > 65504``; two folded
branches of 4e4 each): the merged conv would hold ``inf`` and output it where the original
does not. Such a block stays, code ``overflow``, like a fold whose values would not fit.
The values are computed when the merge is planned, before anything is written (the capture's
tensors may be the module's own, which the first round writes in place).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from normfold.engine.capture import Capture
from normfold.engine.context import Refused
from normfold.engine.records import Fold, Plan, new_bias_name

if TYPE_CHECKING:
    from normfold.engine.branches import Branch


class _Float64:
    """A capture's values in float64, for :meth:`Plan.iter_values`: a fold's values computed
    from it are float64 too (its cast back goes to the value's own dtype)."""

    def __init__(self, capture: Capture) -> None:
        self.capture, self.names = capture, capture.names

    def value(self, fqn: str) -> torch.Tensor:
        return self.capture.value(fqn).detach().to(torch.float64)


def merged_values(
    capture: Capture, plan: Plan, folds: Sequence[Fold], branches: Sequence[Branch], target: Branch, bias: str
) -> dict[str, torch.Tensor]:
    """``{target weight FQN: W, bias FQN: b}`` in the weight's dtype, the branches taken after
    ``folds`` (those of ``plan`` that apply: all of them, or the module's own); raises the
    ``overflow`` failure when ``W`` or ``b`` does not fit that dtype."""
    weights = {b.weight for b in branches if b.kind == "conv"}
    mine = [f for f in folds if any(u.weight in weights for u in f.updates)]
    folded = dict(plan.iter_values(_Float64(capture), mine)) if mine else {}  # type: ignore[arg-type]
    ref = capture.value(target.weight or "")
    w = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)  # (C_out, C_in / g, *K)
    b = torch.zeros(ref.shape[0], dtype=torch.float64, device=ref.device)
    for branch in branches:
        _add_branch(w, b, branch, capture, folded)
    out = {target.weight or "": w.to(ref.dtype), bias: b.to(ref.dtype)}
    for (name, value), exact in zip(out.items(), (w, b), strict=True):
        if value.is_floating_point() and not bool(value.isfinite().all()):
            dtype, largest = str(value.dtype).removeprefix("torch."), float(exact.abs().max())
            limit = torch.finfo(value.dtype).max
            raise Refused(
                "overflow",
                f"the merged {name} does not fit in {dtype} (largest finite {limit:.4g}, merged value "
                f"{largest:.4g}): merging the block would make it inf",
            )
    return out


def _add_branch(
    w: torch.Tensor, b: torch.Tensor, branch: Branch, capture: Capture, folded: Mapping[str, torch.Tensor]
) -> None:
    """Add ``branch``, times its factor per output channel, to ``w`` (C_out, C_in / g, *K) and
    ``b``; ``folded``: float64 values of the folded layers."""
    K = w.shape[2:]
    window = tuple(slice((K_ - k) // 2, (K_ - k) // 2 + k) for K_, k in zip(K, branch.kernel, strict=True))
    coeff = torch.ones(w.shape[0], dtype=torch.float64) if branch.coeff is None else branch.coeff
    coeff = coeff.to(w.device)
    if branch.kind == "conv":
        fqn = branch.weight or ""
        bw = folded[fqn] if fqn in folded else capture.value(fqn)
        rows = coeff.reshape(-1, *([1] * (w.dim() - 1)))
        w[(slice(None), slice(None), *window)] += rows * bw.detach().to(w.device, torch.float64)
        bias_name = branch.bias or new_bias_name(capture, fqn)
        if bias_name in folded:
            b += coeff * folded[bias_name].detach().to(b.device, torch.float64)
        elif branch.bias is not None:
            b += coeff * capture.value(branch.bias).detach().to(b.device, torch.float64)
        return
    channels, per_group = w.shape[0], w.shape[1]
    scale = torch.ones(channels, dtype=torch.float64) if branch.scale is None else branch.scale
    shift = torch.zeros(channels, dtype=torch.float64) if branch.shift is None else branch.shift
    rows = torch.arange(channels, device=w.device)
    taps = math.prod(branch.kernel)
    # channel c's own input is column c mod (C_in / g) of row c
    w[(rows, rows % per_group, *window)] += (coeff * scale.to(w.device) / taps).reshape(-1, *([1] * len(K)))
    b += coeff * shift.to(b.device)
