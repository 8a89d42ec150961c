"""normfold: fold eval-mode BatchNorm into neighbouring Conv/ConvTranspose/Linear layers.

One engine on the ``torch.export`` graph: capture (:mod:`normfold.graph`), plan
(:mod:`normfold.plan`, patterns in :mod:`normfold.rules`), apply to the module and the exported
program (:mod:`normfold.apply`); :func:`fold` runs the three.

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
    "FoldResult": "normfold.folding",
    "Folded": "normfold.folding",
    "Skipped": "normfold.folding",
    "Merged": "normfold.folding",
    "NotMerged": "normfold.folding",
    "reparameterize": "normfold.folding",
    "MergedBranch": "normfold.reparam",
    "Uncaptured": "normfold.parts",
    "verify": "normfold.reference",
    "ParityRule": "normfold.parity",
    "ParityReport": "normfold.parity",
    "OutputParity": "normfold.parity",
    "Tolerance": "normfold.parity",
    "DEFAULT_TOLERANCES": "normfold.parity",
    "compare": "normfold.parity",
    "run_model": "normfold.reference",
    "load_model": "normfold.load",
    "load_inputs": "normfold.load",
    "LoadedModel": "normfold.load",
    "export_model": "normfold.export",
    "export_onnx": "normfold.export",
    "ExportResult": "normfold.export",
    "fold_and_export": "normfold.pipeline",
    "recalibrate": "normfold.calibration",
    "drop_redundant_biases": "normfold.bias",
    "swap_norms": "normfold.swap",
    "SwapResult": "normfold.swap",
    "FrozenBatchNorm": "normfold.swap",
    "BiasResult": "normfold.bias",
    "RecalibrateResult": "normfold.calibration",
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
    "swap_and_write": "normfold.pipeline",
    "save_folded": "normfold.roundtrip",
    "load_folded": "normfold.roundtrip",
}

if TYPE_CHECKING:
    from normfold.bias import BiasResult, drop_redundant_biases
    from normfold.calibration import RecalibrateResult, recalibrate
    from normfold.export import ExportResult, export_model, export_onnx
    from normfold.folding import Folded, FoldResult, Merged, NotMerged, Skipped, fold, reparameterize
    from normfold.load import LoadedModel, load_inputs, load_model
    from normfold.options import ExportOptions, FoldOptions, InputSpec, LoadOptions, WriteOptions
    from normfold.parity import (
        DEFAULT_TOLERANCES,
        OutputParity,
        ParityReport,
        ParityRule,
        Tolerance,
        compare,
    )
    from normfold.parts import Uncaptured
    from normfold.pipeline import (
        drop_bias_and_write,
        fold_and_export,
        inspect,
        recalibrate_and_write,
        swap_and_write,
    )
    from normfold.reference import run_model, verify
    from normfold.reparam import MergedBranch
    from normfold.roundtrip import load_folded, save_folded
    from normfold.runs import FoldRun, WriteRun
    from normfold.swap import FrozenBatchNorm, SwapResult, swap_norms


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
    "LoadError",
    "LoadOptions",
    "LoadedModel",
    "Merged",
    "MergedBranch",
    "NormfoldError",
    "NotFoldedError",
    "NotMerged",
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
    "inspect",
    "load_folded",
    "load_inputs",
    "load_model",
    "recalibrate",
    "recalibrate_and_write",
    "reparameterize",
    "run_model",
    "save_folded",
    "swap_and_write",
    "swap_norms",
    "verify",
]
