"""What a run returns and reports: :class:`FoldRun` for ``fold``/``inspect``, :class:`WriteRun` for
the commands that write a transformed model (``recalibrate``, ``drop-bias``, ``swap``).

Both render to the JSON report with ``to_dict``; :meth:`FoldRun.summary` holds the counts a
pipeline can check (norms folded and kept, ops and parameters before and after, the written
file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normfold.check.parity import ParityReport
from normfold.folding import FoldResult
from normfold.io.export import ExportResult
from normfold.transforms.calibration import RecalibrateResult


@dataclass
class LayerRow:
    """One norm op as ``inspect`` and ``fold`` show it."""

    norm: str
    norm_type: str
    action: str  # "fold" (eager module and export), "fold (export)" or "keep"
    into: str | None
    pattern: str | None
    code: str | None
    reason: str | None  # why kept, or why folded in the export only


@dataclass
class FoldRun:
    """Everything the ``fold`` and ``inspect`` commands report."""

    source: str
    input_shapes: list[tuple[int, ...]]
    fold: FoldResult
    layers: list[LayerRow]
    parity: ParityReport | None = None  # folded vs original, in PyTorch
    export: ExportResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    recalibration: RecalibrateResult | None = None
    notes: list[str] = field(default_factory=list)  # how the model was taken (dtype, eval mode)

    def summary(self) -> dict[str, Any]:
        """Counts a pipeline can check: norms folded and kept, ops before/after, the written file.

        ``exporter_removed_batchnorms``: BatchNormalization ops the folded graph still had that
        the written ONNX graph does not (the exporter fused them on its own); None without ONNX."""
        f, e = self.fold, self.export
        onnx_file = e is not None and e.format == "onnx"
        kept_bn = f.ops_after.get("BatchNormalization", 0)
        return {
            "norms": len(f.folded) + len(f.skipped),
            "folded": len(f.folded),
            "folded_in_export_only": len(f.export_only),
            "kept": len(f.skipped),
            "blocks_merged": len(f.merged),
            "blocks_not_merged": len(f.not_merged),
            "params_before": f.params_before,
            "params_after": f.params_after,
            "macs_before": f.macs_before,
            "macs_after": f.macs_after,
            "ops_original": f.ops_before,
            "ops_folded": f.ops_after,
            "ops_written": e.op_counts if onnx_file else None,
            # a BatchNormalization lowered by lower_kept is gone too, by normfold's hand
            "exporter_removed_batchnorms": max(kept_bn - e.batchnorm_nodes - len(e.lowered), 0)
            if onnx_file else None,
        }

    def parity_reports(self) -> dict[str, ParityReport]:
        """Parity reports by runtime: PyTorch's, then the written file's (none for ``inspect``)."""
        if self.parity is None:
            return {}
        return {"pytorch": self.parity, **(self.export.parity if self.export is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        fold = {k: v for k, v in self.fold.to_dict().items() if k not in ("ops_before", "ops_after")}
        return {
            "source": self.source,
            "input_shapes": [list(s) for s in self.input_shapes],
            "summary": self.summary(),
            "recalibration": self.recalibration.to_dict() if self.recalibration is not None else None,
            **fold,
            "notes": self.notes,
            "parity": {
                "pytorch": self.parity.to_dict() if self.parity is not None else None,
                **(
                    {k: v.to_dict() for k, v in self.export.parity.items()} if self.export is not None else {}
                ),
            },
            "export": self.export.to_dict(parity=False) if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class WriteRun:
    """What the ``recalibrate``, ``drop-bias`` and ``swap`` commands report: a transformed model
    written to ``out``."""

    source: str
    result: Any  # RecalibrateResult, BiasResult or SwapResult (each has to_dict)
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    export: ExportResult | None = None  # for a .pt2/.onnx out
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. a dtype kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": str(self.out),
            "notes": self.notes,
            **self.result.to_dict(),
            "export": self.export.to_dict() if self.export is not None else None,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def layer_rows(result: FoldResult) -> list[LayerRow]:
    rows = [
        LayerRow(f.norm, f.norm_type, "fold" if f.where == "both" else "fold (export)", f.into, f.pattern,
                 None, f.note)
        for f in result.folded
    ]  # fmt: skip
    rows += [LayerRow(s.norm, s.norm_type, "keep", None, None, s.code, s.reason) for s in result.skipped]
    return rows
