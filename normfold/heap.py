"""Hand freed heap memory back to the operating system between large temporary tensors.

glibc's ``malloc`` serves blocks above its mmap threshold with ``mmap`` and returns them on
``free``, but the threshold rises to the size of each such block freed (up to 32 MB), so the
next blocks of 1-32 MB (a float32 or float64 block of a weight) come from the heap, where freed
space below a live allocation is kept: a loop over the blocks of large weights then grows the
resident set by hundreds of MB that nothing uses (measured on the sharded norm-affine fold: 1.3 GB
over one 131 MB LM head). ``malloc_trim(0)`` releases every free page of every arena. Elsewhere
(another C library) :func:`release` does nothing.

Used by the sharded fold's writer (:mod:`normfold.io.fold_shards`) and its local proofs
(:mod:`normfold.check.group_parity`) alike, so it belongs to neither layer and imports nothing of
normfold (as :mod:`normfold.errors`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release"]


@functools.cache
def _trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release() -> None:
    """Return the heap's free pages to the operating system (glibc; else nothing)."""
    trim = _trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
