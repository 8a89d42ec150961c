"""The records :func:`normfold.fold` returns: one per norm op folded (:class:`Folded`) or kept
(:class:`Skipped`, with a stable code and a reason), one per block merged (:class:`Merged`) or
sum of branches kept (:class:`NotMerged`), one per module ``torch.export`` could not capture
(:class:`Uncaptured`), and the :class:`FoldResult` holding them with the folded model and program.

Pure data: building them (:mod:`normfold.engine.analysis`, :mod:`normfold.folding`,
:mod:`normfold.engine.parts`) and reading them (the checks, the CLI) both import this module, so it
imports nothing of normfold's but the base of every kept record (:class:`normfold.codes.Kept`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.export import ExportedProgram

from normfold.codes.kept import Kept

__all__ = ["FoldResult", "Folded", "Merged", "NotMerged", "Skipped", "Uncaptured"]


@dataclass(frozen=True)
class Uncaptured(Kept):
    """A module ``torch.export`` could not capture (code ``not_captured``), or one that captured
    alone would lose a call from outside it (``called_outside``), and why."""

    module: str
    code: str
    reason: str


@dataclass(frozen=True)
class Folded:
    """A norm op that was folded away."""

    norm: str  # module path, or "<module or forward>:<op>" for a norm written in forward code
    norm_type: str
    into: str  # the layer module(s) that absorbed it, comma-separated
    into_type: str
    pattern: (
        str  # conv-bn, linear-bn, conv_transpose-bn, bn-conv, bn-linear, concat-bn, add-bn, conv-affine...
    )
    where: str  # "both" (eager module and export) or "export" (export only, with ``note``)
    node: str  # the op's name in the exported graph
    through: tuple[str, ...] = ()  # ops between the layer and the norm
    note: str | None = None


@dataclass(frozen=True)
class Skipped(Kept):
    """A norm op (or unused norm module) left in place, with a stable code and a readable reason."""

    norm: str
    norm_type: str
    code: str
    reason: str
    node: str | None = None
    subject_field = "norm"


@dataclass(frozen=True)
class Merged:
    """A block whose parallel branches became one conv (structural reparameterization)."""

    block: str  # module path owning the sum ("forward": the model's own forward)
    into: str  # module path of the conv that took the sum
    branches: tuple[str, ...]  # "<module path> (conv 3x3)", "<module path> (norm)", "identity"...
    where: str  # "both" (module and export) or "export" (export only, with ``note``)
    node: str  # the sum's add op
    note: str | None = None


@dataclass(frozen=True)
class NotMerged(Kept):
    """A sum of branches of one tensor that stays, with a stable code and a readable reason."""

    block: str
    code: str
    reason: str
    node: str
    subject_field = "block"


@dataclass
class FoldResult:
    """What :func:`fold` produced: the model, the folded exported program, one record per norm."""

    model: nn.Module
    program: ExportedProgram | None = None
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: elements of the floating weights the captured program computes with (parameters, buffers,
    #: constants: :func:`weight_elements`), before and after; the written file holds the same
    #: plus the exporter's own constants (shapes)
    params_before: int = 0
    params_after: int | None = None  # None until the plan is applied
    #: multiply-accumulates of one run at the example sizes (:func:`normfold.engine.costs.program_macs`)
    macs_before: int | None = None
    macs_after: int | None = None
    replan_folds: int = 0  # folds found when planning the folded program again (0 expected)
    #: modules torch.export could not capture (the model itself first); empty when it could.
    #: Then ``program`` is None and only the captured parts were folded (see normfold.engine.parts).
    uncaptured: list[Uncaptured] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. switched to eval)
    #: ops of the captured graph before and after folding, by the ONNX op they become
    #: (:func:`normfold.engine.capture.op_counts`); empty when the model was not captured whole
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    #: blocks reparameterized into one conv, and sums of branches that stay (``reparameterize=True``)
    merged: list[Merged] = field(default_factory=list)
    not_merged: list[NotMerged] = field(default_factory=list)

    @property
    def export_only(self) -> list[Folded]:
        return [f for f in self.folded if f.where == "export"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "replan_folds": self.replan_folds,
            "uncaptured": [asdict(u) for u in self.uncaptured],
            "notes": list(self.notes),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "merged": [asdict(m) for m in self.merged],
            "not_merged": [asdict(m) for m in self.not_merged],
        }
