"""``fold()``'s own post-condition: the two artifacts it hands out agree, and its plan is complete.

A :class:`~normfold.folding.FoldResult` carries two folded artifacts written from one plan: the
eager module and the exported program. Where every fold lands in both (``where="both"``) they
compute the same arithmetic (one plan written twice; when the program's parameters and buffers
*are* the module's tensors, :func:`shares_tensors`, ``fold()`` runs no check); where a fold or
merge lands in the export only, the module keeps the original arithmetic for that part. Either way
both approximate the original, so on the example inputs, per output leaf::

    max|module - program| <= rel(dtype) * max|module|           (finite elements; the same
                                                                 non-finite positions)

with ``rel`` far above rounding on real models (1e-3 for float32: a fold's rounding is ~1e-6 of
the output scale there) and far below the changes this catches (a scale folded through a max pool
with the wrong sign, a shift applied twice after a merge: errors of the output's own order). An
output past that quick bound is judged by the parity rule with the folded module as the reference
(``verify(module, program)``: the module's float64 run and its rounding-sized perturbations), so
an exact export-only fold of an ill-conditioned map (a mean of 30 under a gamma of 1e-6: outputs
~1e-5 computed from values ~30) is not called a disagreement. For float16/bfloat16 the quick
bound is loose; :func:`normfold.verify` against the original is the precise judge of each artifact.

Second, planning the folded program again finds nothing (``replan_folds == 0``): a fold or merge
left in the program that the planner would take is an incomplete plan.

Either failure is a bug in normfold, raised as :class:`~normfold.errors.ConsistencyError` naming
the rules involved, rather than returning an inconsistent result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from normfold.engine.probe import isolated_rng
from normfold.errors import ConsistencyError, printable

__all__ = ["check_artifacts_agree", "check_replan", "shares_tensors"]

#: the largest module-vs-program difference, relative to the output's scale, per dtype
_RELATIVE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}


def _run(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    """The output leaves on copies of ``inputs`` (a forward may write into its input), the global
    RNG state restored (a forward may draw random numbers)."""
    device = inputs[0].device if inputs else torch.device("cpu")
    with torch.no_grad(), isolated_rng(device):
        return pytree.tree_leaves(module(*(t.clone() for t in inputs)))


def _disagreement(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why two float outputs of the same computation differ beyond rounding, or None."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if not a.is_floating_point():
        return None if torch.equal(a, b) else "integer values differ"
    x, y = a.detach().double(), b.detach().double()
    fx, fy = torch.isfinite(x), torch.isfinite(y)
    same_nonfinite = (torch.isnan(x) & torch.isnan(y)) | (x == y)
    odd = int((~(fx & fy) & ~same_nonfinite).sum())
    if odd:
        return f"non-finite values at {odd} position(s) that differ (e.g. inf in one only)"
    both = fx & fy
    if not bool(both.any()):
        return None
    diff = float((x - y).abs()[both].max())
    scale = float(x.abs()[both].max())
    rel = _RELATIVE.get(a.dtype, 1e-3)
    if diff > rel * scale:
        return f"max difference {diff:.3g} > {rel * scale:.3g} ({rel:g} x the output's scale {scale:.3g})"
    return None


def shares_tensors(module: nn.Module, program: ExportedProgram) -> bool:
    """Whether every parameter and buffer of ``program`` is the tensor ``module`` holds under the
    same name (same storage and shape): the premise under which ``fold()`` skips the run of
    :func:`check_artifacts_agree` for a plan that lands in both alike."""
    mine = module.state_dict(keep_vars=True)
    return all(
        name in mine and t.shape == mine[name].shape and t.data_ptr() == mine[name].data_ptr()
        for name, t in program.state_dict.items()
    )


def check_artifacts_agree(
    module: nn.Module, program: ExportedProgram, inputs: tuple[torch.Tensor, ...], suspects: Sequence[str]
) -> None:
    """Raise :class:`ConsistencyError` when the folded module and the folded program disagree on
    ``inputs`` (module docstring). ``suspects``: the folds and merges whose module and program
    forms differ (export-only ones), named in the message."""
    was_training = {name: m.training for name, m in module.named_modules()}
    try:
        mine = _run(module.eval(), inputs)
        theirs = _run(program.module(), inputs)
    finally:
        for name, m in module.named_modules():
            m.training = was_training.get(name, m.training)
    if len(mine) != len(theirs):
        raise ConsistencyError(
            f"fold produced a module with {len(mine)} output tensor(s) and a program with {len(theirs)}"
        )
    quick = next(
        (f"output {i}: {why}" for i, (a, b) in enumerate(zip(mine, theirs, strict=True))
         if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (why := _disagreement(a, b))),
        None,
    )  # fmt: skip
    if quick is None:
        return
    if "non-finite" in quick or "shape/dtype" in quick:  # no rounding makes these: a disagreement
        _raise(quick, None, suspects)
    # beyond the quick bound: the parity rule decides, with the module as the reference (its
    # float64 run and rounding-sized perturbations measure how far rounding alone can move it)
    from normfold.check.reference import verify  # the checker only when the quick bound is exceeded

    report = verify(module, program, inputs)
    if not (report.passed or not report.decided):
        _raise(quick, report.failures()[0], suspects)


def _raise(quick: str, judged: str | None, suspects: Sequence[str]) -> None:
    where = "; ".join(printable(s) for s in suspects[:6]) or "none export-only"
    beyond = f", beyond the module's own rounding ({judged})" if judged else ""
    raise ConsistencyError(
        f"fold's two results disagree on the example inputs: the folded module and the folded program, "
        f"{quick}{beyond}. This is a bug in normfold; the folds and merges that land differently in the "
        f"two: {where}"
    )


def check_replan(found: Sequence[str]) -> None:
    """Raise :class:`ConsistencyError` when planning the folded program again finds ``found``."""
    if found:
        raise ConsistencyError(
            f"planning the folded program again finds {len(found)} fold(s) or merge(s) the first plan "
            f"missed: {'; '.join(printable(f) for f in found[:6])}. This is a bug in normfold (the "
            "plan did not reach a fixpoint)"
        )
