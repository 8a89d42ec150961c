"""normfold: fold eval-mode BatchNorm into neighbouring Conv/ConvTranspose/Linear layers.

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
    ExportError,
    LoadError,
    NormfoldError,
    ParityError,
    TraceError,
    UsageError,
)

# public name -> submodule that defines it
_LAZY = {
    "fold": "normfold.fold",
    "FoldResult": "normfold.fold",
    "Folded": "normfold.fold",
    "Skipped": "normfold.fold",
    "verify": "normfold.verify",
    "ParityReport": "normfold.verify",
    "OutputParity": "normfold.verify",
    "Tolerance": "normfold.verify",
    "DEFAULT_TOLERANCES": "normfold.verify",
}

if TYPE_CHECKING:
    from normfold.fold import Folded, FoldResult, Skipped, fold
    from normfold.verify import DEFAULT_TOLERANCES, OutputParity, ParityReport, Tolerance, verify


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
    "ExportError",
    "FoldResult",
    "Folded",
    "LoadError",
    "NormfoldError",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "Skipped",
    "Tolerance",
    "TraceError",
    "UsageError",
    "__version__",
    "fold",
    "verify",
]
