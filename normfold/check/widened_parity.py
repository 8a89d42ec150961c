"""Parity of a transformed model against the original, with the original's *captured graph widened to
float64* (:mod:`normfold.check.widen`) as the exact reference: the proof of a transform on models that
cast inside (Hugging Face norms compute in float32 whatever the model's dtype).

The original's own outputs and its perturbed runs (its noise) come from
:func:`~normfold.check.reference.make_reference` as in every check; only the exact run is replaced.
Where the widened graph cannot run (an op without a float64 kernel), the reference's own exact run
stays, and a note says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from normfold.check.input_sets import parity_sets
from normfold.check.model_run import run_model
from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.check.reference import check, make_reference
from normfold.check.widen import widened

__all__ = ["widened_parity"]

_ROLE = "float64 widening of the original's captured graph"


def widened_parity(
    original: nn.Module,
    program: ExportedProgram,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    rule: ParityRule,
) -> ParityReport:
    """Judge ``candidate`` against ``original`` (captured as ``program``) on the rule's input sets."""
    sets = parity_sets(inputs, rule)

    def exact() -> Callable[[tuple[torch.Tensor, ...]], Any]:
        wide = widened(program)  # built only within the rule's exact_limit_bytes
        return lambda x: run_model(wide, x, role=_ROLE)

    reference = make_reference(original, sets, rule, exact=exact)
    failed = next((n for n in reference.notes if n.startswith("no float64 reference (")), None)
    if failed is not None:  # no widened graph, or a widened op without a float64 kernel: a copy judges
        reference = make_reference(original, sets, rule)
        reference.notes.append(f"no widened float64 reference ({failed}); a float64 copy of the module")
    elif reference.exact is not None:
        reference.notes.append("exact reference: the original's captured graph, widened to float64")
    return check(reference, lambda x: run_model(candidate, x, role="folded"), rule)
