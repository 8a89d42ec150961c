"""normfold: fold eval-mode BatchNorm into neighbouring Conv/ConvTranspose/Linear layers.

One engine on the ``torch.export`` graph (:mod:`normfold.engine`): capture
(:mod:`normfold.engine.capture`), plan (:mod:`normfold.engine.plan`, patterns in
:mod:`normfold.engine.rules` over the op tables of :mod:`normfold.engine.aten`), apply to the module
and the exported program (:mod:`normfold.engine.apply`); :func:`fold` runs the three. The other
sub-packages: :mod:`normfold.transforms` (drop-bias, recalibrate, swap), :mod:`normfold.check`
(parity) and :mod:`normfold.io` (files in and out).

The public API is imported lazily (PEP 562) so that ``import normfold`` and the CLI's
``--help``/``--version`` never pay for importing torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("normfold")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0+unknown"

from normfold.errors import (
    ConsistencyError,
    ExportError,
    LoadError,
    NormfoldError,
    NotFoldedError,
    ParityError,
    TraceError,
    UnknownCodeError,
    UsageError,
)

# public name -> submodule that defines it
_LAZY = {
    "fold": "normfold.folding",
    "fold_onnx": "normfold.onnx_fold",
    "plan_onnx": "normfold.onnx_fold",
    "fold_onnx_file": "normfold.onnx_pipeline",
    "inspect_onnx": "normfold.onnx_pipeline",
    "OnnxRun": "normfold.onnx_pipeline",
    "OnnxFoldResult": "normfold.onnx_fold",
    "FoldResult": "normfold.folding",
    "Folded": "normfold.folding",
    "Skipped": "normfold.folding",
    "Merged": "normfold.folding",
    "NotMerged": "normfold.folding",
    "reparameterize": "normfold.folding",
    "MergedBranch": "normfold.engine.reparam_eager",
    "Uncaptured": "normfold.engine.parts",
    "verify": "normfold.check.reference",
    "ParityRule": "normfold.check.parity",
    "ParityReport": "normfold.check.parity",
    "OutputParity": "normfold.check.parity",
    "Tolerance": "normfold.check.parity",
    "DEFAULT_TOLERANCES": "normfold.check.parity",
    "compare": "normfold.check.parity",
    "run_model": "normfold.check.reference",
    "load_model": "normfold.io.load",
    "load_inputs": "normfold.io.load",
    "LoadedModel": "normfold.io.load",
    "export_model": "normfold.io.export",
    "export_onnx": "normfold.io.export",
    "ExportResult": "normfold.io.export",
    "fold_and_export": "normfold.pipeline",
    "recalibrate": "normfold.transforms.calibration",
    "drop_redundant_biases": "normfold.transforms.bias",
    "swap_norms": "normfold.transforms.swap",
    "SwapResult": "normfold.transforms.swap",
    "FrozenBatchNorm": "normfold.transforms.swap",
    "BiasResult": "normfold.transforms.bias",
    "KeptBias": "normfold.transforms.bias",
    "NotSwapped": "normfold.transforms.swap",
    "NotRecalibrated": "normfold.transforms.calibration",
    "Kept": "normfold.codes.kept",
    "RecalibrateResult": "normfold.transforms.calibration",
    "inspect": "normfold.pipeline",
    "FoldRun": "normfold.runs",
    "InputSpec": "normfold.options",
    "LoadOptions": "normfold.options",
    "FoldOptions": "normfold.options",
    "ExportOptions": "normfold.options",
    "WriteOptions": "normfold.options",
    "WriteRun": "normfold.runs",
    "recalibrate_and_write": "normfold.pipeline",
    "drop_bias_and_write": "normfold.pipeline",
    "fold_norms_and_write": "normfold.pipeline",
    "swap_and_write": "normfold.pipeline",
    "fold_norm_affine": "normfold.norm_affine",
    "NormAffineResult": "normfold.norm_affine",
    "NormFolded": "normfold.norm_affine",
    "NormKept": "normfold.norm_affine",
    "fold_norm_affine_checkpoint": "normfold.norm_affine_checkpoint",
    "NormAffineCheckpointResult": "normfold.norm_affine_checkpoint",
    "save_folded": "normfold.io.roundtrip",
    "load_folded": "normfold.io.roundtrip",
}

if TYPE_CHECKING:
    from normfold.check.parity import (
        DEFAULT_TOLERANCES,
        OutputParity,
        ParityReport,
        ParityRule,
        Tolerance,
        compare,
    )
    from normfold.check.reference import run_model, verify
    from normfold.codes.kept import Kept
    from normfold.engine.parts import Uncaptured
    from normfold.engine.reparam_eager import MergedBranch
    from normfold.folding import Folded, FoldResult, Merged, NotMerged, Skipped, fold, reparameterize
    from normfold.io.export import ExportResult, export_model, export_onnx
    from normfold.io.load import LoadedModel, load_inputs, load_model
    from normfold.io.roundtrip import load_folded, save_folded
    from normfold.norm_affine import NormAffineResult, NormFolded, NormKept, fold_norm_affine
    from normfold.norm_affine_checkpoint import NormAffineCheckpointResult, fold_norm_affine_checkpoint
    from normfold.onnx_fold import OnnxFoldResult, fold_onnx, plan_onnx
    from normfold.onnx_pipeline import OnnxRun, fold_onnx_file, inspect_onnx
    from normfold.options import ExportOptions, FoldOptions, InputSpec, LoadOptions, WriteOptions
    from normfold.pipeline import (
        drop_bias_and_write,
        fold_and_export,
        fold_norms_and_write,
        inspect,
        recalibrate_and_write,
        swap_and_write,
    )
    from normfold.runs import FoldRun, WriteRun
    from normfold.transforms.bias import BiasResult, KeptBias, drop_redundant_biases
    from normfold.transforms.calibration import NotRecalibrated, RecalibrateResult, recalibrate
    from normfold.transforms.swap import FrozenBatchNorm, NotSwapped, SwapResult, swap_norms


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'normfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DEFAULT_TOLERANCES",
    "BiasResult",
    "ConsistencyError",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FoldOptions",
    "FoldResult",
    "FoldRun",
    "Folded",
    "FrozenBatchNorm",
    "InputSpec",
    "Kept",
    "KeptBias",
    "LoadError",
    "LoadOptions",
    "LoadedModel",
    "Merged",
    "MergedBranch",
    "NormAffineCheckpointResult",
    "NormAffineResult",
    "NormFolded",
    "NormKept",
    "NormfoldError",
    "NotFoldedError",
    "NotMerged",
    "NotRecalibrated",
    "NotSwapped",
    "OnnxFoldResult",
    "OnnxRun",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "ParityRule",
    "RecalibrateResult",
    "Skipped",
    "SwapResult",
    "Tolerance",
    "TraceError",
    "Uncaptured",
    "UnknownCodeError",
    "UsageError",
    "WriteOptions",
    "WriteRun",
    "__version__",
    "compare",
    "drop_bias_and_write",
    "drop_redundant_biases",
    "export_model",
    "export_onnx",
    "fold",
    "fold_and_export",
    "fold_norm_affine",
    "fold_norm_affine_checkpoint",
    "fold_norms_and_write",
    "fold_onnx",
    "fold_onnx_file",
    "inspect",
    "inspect_onnx",
    "load_folded",
    "load_inputs",
    "load_model",
    "plan_onnx",
    "recalibrate",
    "recalibrate_and_write",
    "reparameterize",
    "run_model",
    "save_folded",
    "swap_and_write",
    "swap_norms",
    "verify",
]
