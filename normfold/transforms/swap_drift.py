"""How far a swap moved the model's outputs, on the example inputs in eval mode (information: a
GroupNorm or LayerNorm swap changes the function by design).

``max_rel_error = max|ref - new| / max|ref|`` of the worst output, judged as
:func:`normfold.compare` judges it; ``cosine_similarity = <ref, new> / (|ref| |new|)`` over all
floating output elements at once, in float64, over the elements finite in both (1 when they are
equal, 0 when either is all zeros, ``nan`` when the outputs differ in size or are empty).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from normfold.check.model_run import run_model
from normfold.check.parity import compare

__all__ = ["Drift", "drift_of"]


@dataclass(frozen=True)
class Drift:
    """How far the swapped model's outputs are from the original's on example_inputs (eval mode).

    ``max_rel_error`` is ``max|ref - new| / max|ref|`` of the worst output (as in
    :func:`normfold.verify`); ``cosine_similarity`` is over all floating output elements at once
    (float64, elements finite in both). Expected 0 and 1 for ``"frozen"`` and ``"batch"``.
    """

    max_rel_error: float
    cosine_similarity: float
    outputs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def drift_of(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: Any) -> Drift:
    outputs = run_model(model, inputs, role="swapped")
    report = compare(reference, outputs)
    return Drift(report.max_rel_error, _cosine(reference, outputs), len(report.outputs))


def _cosine(reference: Any, outputs: Any) -> float:
    a, b = _flat(reference), _flat(outputs)
    if a.numel() != b.numel() or a.numel() == 0:
        return math.nan
    finite = a.isfinite() & b.isfinite()
    a, b = a[finite], b[finite]
    if torch.equal(a, b):
        return 1.0
    norm = float(a.norm() * b.norm())
    return 0.0 if norm == 0.0 else float(a @ b) / norm


def _flat(tree: Any) -> torch.Tensor:
    """Every floating tensor in a tree of tuples/lists/dicts, as one float64 vector."""
    parts = [t.detach().reshape(-1).to("cpu", torch.float64) for t in _floating_leaves(tree)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _floating_leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _floating_leaves(value)]
    return []


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
