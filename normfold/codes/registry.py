"""The registry: every code by name (:data:`CODES`), :func:`lookup` and :func:`names`."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

from normfold.codes.base import Code, Transform
from normfold.codes.fold import FOLD_CODES
from normfold.codes.norm_affine import NORM_AFFINE_CODES
from normfold.codes.transforms import TRANSFORM_CODES
from normfold.errors import UnknownCodeError

__all__ = ["CODES", "lookup", "names"]

# Grouped by the transform that gives a code first; each table lists its own codes first.
_ALL = (*FOLD_CODES, *TRANSFORM_CODES, *NORM_AFFINE_CODES)

#: name -> :class:`Code`, every code normfold gives
CODES: Mapping[str, Code] = MappingProxyType({c.name: c for c in _ALL})
if len(CODES) != len(_ALL):
    raise ValueError("normfold.codes: a code is registered twice")


def lookup(name: str) -> Code:
    """The registered :class:`Code` called ``name``; :class:`~normfold.errors.UnknownCodeError`
    (naming the closest registered codes) when there is none."""
    found = CODES.get(name)
    if found is None:
        close = difflib.get_close_matches(str(name), list(CODES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownCodeError(f"{name!r} is not a code normfold gives (normfold.codes.CODES){hint}")
    return found


def names(transform: Transform | None = None) -> frozenset[str]:
    """The registered code names (of one transform)."""
    return frozenset(c.name for c in CODES.values() if transform is None or transform in c.transforms)
