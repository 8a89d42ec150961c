"""The one record type of "this stays, with a code and a reason", whatever the transform.

Every transform reports what it leaves in place as a record of its own shape (a fold's
:class:`~normfold.Skipped` names the norm and its type, a drop-bias :class:`~normfold.KeptBias` the
layer and the norm, ...), and every such record is a :class:`Kept`: a stable :attr:`code` (one of
:data:`normfold.codes.CODES`), a readable :attr:`reason` naming this model's modules and values,
and the :attr:`subject` that stays. A script can treat them all alike::

    stays = {r.subject: (r.code, r.reason) for r in (*fold_result.skipped, *bias_result.kept)}
"""

from __future__ import annotations

__all__ = ["Kept"]


class Kept:
    """Base of every record of a thing a transform leaves in place (each subclass a frozen
    dataclass with ``code`` and ``reason`` fields among its own)."""

    __slots__ = ()
    #: a stable code of :data:`normfold.codes.CODES`
    code: str
    #: why, in this model's words (module paths, values)
    reason: str
    #: the field that names what stays (a module path, a norm op, a block)
    subject_field: str = "module"

    @property
    def subject(self) -> str:
        """What stays: a module path, or a norm op written in ``forward`` code."""
        return str(getattr(self, self.subject_field))
