"""The local proof of one norm-affine fold: the norm's affine tail and its consumers, before and
after, on seeded normalized rows, judged by the parity rule (:mod:`normfold.check.parity`).

A fold changes only ``y = gamma * n + beta`` and the Linear layers reading ``y``; the statistics
``n(x)`` are untouched. So for one norm with consumers ``z_i = W_i y[c_i] + b_i``, the original
and the folded group are run on the same ``n``:

* ``n``: ``rows`` seeded rows ``x`` with realistic statistics (per-row mean and spread far from
  0 and 1), normalized in float64 as the norm's kind does (``layer_norm``/``group_norm``: centred
  and scaled, ``rms_norm``: scaled), then rounded to the proving dtype;
* **original** in the proving dtype (the stored dtype, float32 for float16/bfloat16: as
  :func:`normfold.fold_norm_affine` proves), **exact** in float64 from the same stored values,
  ``perturbations`` runs with every stored parameter of the group rounded from ``t * (1 + d)``
  (:func:`normfold.check.exact.perturbed_tensor`, :func:`~normfold.check.exact.perturb`'s rule),
  and the **candidate**: the folded values as they will be stored (cast to the stored dtype once),
  computed in the proving dtype.

One consumer's weight is held at a time (in its stored dtype, the proving dtype and float64); its
outputs (``rows x out``) are kept for the judgment, which runs over the whole group at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from normfold.check.exact import perturbed_tensor
from normfold.check.parity import compare
from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.dtypes import LOW_PRECISION
from normfold.heap import release

__all__ = ["GroupSide", "prove_group"]


@dataclass(frozen=True)
class GroupSide:
    """One consumer as the proof runs it: ``weight`` (stored dtype), ``in_axis``, ``channels``
    (the norm channel each input reads), ``bias`` or None; ``folded_weight`` / ``folded_bias``:
    the values the fold stores (stored dtype; a bias the fold creates has no original)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    in_axis: int
    channels: tuple[int, ...]
    folded_weight: torch.Tensor
    folded_bias: torch.Tensor | None


def normalized_rows(kind: str, channels: int, rows: int, seed: int) -> torch.Tensor:
    """``rows`` normalized float64 rows of ``channels`` values (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 6 - 3
    spread = torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 4 + 0.5
    x = torch.randn(rows, channels, generator=gen, dtype=torch.float64) * spread + mean
    if kind != "rms_norm":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None


def _wide(w: torch.Tensor | None, offset: float, b: torch.Tensor | None) -> tuple:
    return _to(w, torch.float64), offset, _to(b, torch.float64)


def _pert_norm(
    w: torch.Tensor | None, b: torch.Tensor | None, gen: torch.Generator, dtype: torch.dtype
) -> tuple:
    return (perturbed_tensor(w, gen, dtype) if w is not None else None,
            perturbed_tensor(b, gen, dtype) if b is not None else None)  # fmt: skip


def _affine(n: torch.Tensor, w: torch.Tensor | None, offset: float, b: torch.Tensor | None) -> torch.Tensor:
    y = n * (w.reshape(-1) + offset) if w is not None else n
    return y + b.reshape(-1) if b is not None else y


def _out_blocks(side: GroupSide) -> list[slice]:
    """Blocks of the output features (about 4M weight elements each)."""
    w = side.weight.movedim(side.in_axis, -1)
    per = max(1, w.numel() // max(1, w.shape[-2]))
    rows = max(1, (1 << 22) // per)
    return [slice(i, min(i + rows, w.shape[-2])) for i in range(0, w.shape[-2], rows)]


def _layer(y: torch.Tensor, side: GroupSide, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``y[:, channels]`` through ``w`` (a block of output features of the weight, as
    ``(..., out, in)``): a batch of expert matrices gives one output per expert."""
    out = y[:, list(side.channels)] @ w.transpose(-1, -2)
    return out + b if b is not None else out


def prove_group(
    kind: str,
    norm: tuple[torch.Tensor | None, float, torch.Tensor | None],
    folded_norm: tuple[torch.Tensor | None, torch.Tensor | None],
    sides: Callable[[], Iterable[GroupSide]] | Iterable[GroupSide],
    rule: ParityRule,
    *,
    channels: int,
    rows: int = 16,
    seed: int = 0,
    label: str = "norm",
) -> ParityReport:
    """Judge the folded group against the original (module docstring). ``norm``: the stored
    ``(weight, offset, bias)`` (``gamma = offset + weight``); ``folded_norm``: the stored values
    after the fold; ``sides``: the consumers, or a function returning them (a generator function
    gives them one at a time: one consumer's weights held at once)."""
    w, offset, b = norm
    fw, fb = folded_norm
    n64 = normalized_rows(kind, channels, rows, seed)
    orig, exact, cand = {}, {}, {}
    perts: list[dict[str, torch.Tensor]] = [{} for _ in range(rule.perturbations)]
    for side in sides() if callable(sides) else sides:
        dtype = torch.float32 if side.weight.dtype in LOW_PRECISION else side.weight.dtype
        n = n64.to(dtype)
        wn, bn = (t.to(dtype) if t is not None else None for t in (w, b))
        y, y64 = _affine(n, wn, offset, bn), _affine(n.double(), *_wide(w, offset, b))
        fwn, fbn = (t.to(dtype) if t is not None else None for t in (fw, fb))
        y_cand = _affine(n, fwn, offset, fbn)
        gens = [torch.Generator().manual_seed(seed * 1000 + k) for k in range(len(perts))]
        y_pert = [_affine(n, pw, offset, pb) for pw, pb in (_pert_norm(w, b, gen, dtype) for gen in gens)]
        weight = side.weight.movedim(side.in_axis, -1)
        folded = side.folded_weight.movedim(side.in_axis, -1)
        shape = (*weight.shape[:-2], rows, weight.shape[-2])
        key = side.name
        orig[key], cand[key] = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        exact[key] = torch.empty(shape, dtype=torch.float64)
        for pert in perts:
            pert[key] = torch.empty(shape, dtype=dtype)
        for s in _out_blocks(side):
            wb = weight[..., s, :]
            sb = side.bias[..., s] if side.bias is not None else None
            fsb = side.folded_bias[..., s] if side.folded_bias is not None else None
            orig[key][..., s] = _layer(y, side, wb.to(dtype), _to(sb, dtype))
            exact[key][..., s] = _layer(y64, side, wb.double(), _to(sb, torch.float64))
            cand[key][..., s] = _layer(y_cand, side, folded[..., s, :].to(dtype), _to(fsb, dtype))
            for k, gen in enumerate(gens):
                pw = perturbed_tensor(wb, gen, dtype)
                pb = perturbed_tensor(sb, gen, dtype) if sb is not None else None
                perts[k][key][..., s] = _layer(y_pert[k], side, pw, pb)
                del pw
            release()
    return compare(orig, cand, exact_outputs=exact, perturbed_outputs=perts, rule=rule,
                   inputs=f"{rows} seeded normalized rows of {label}")  # fmt: skip

