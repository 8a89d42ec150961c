"""Every code normfold gives a thing it leaves in place: one registry, README's tables rendered from it.

A transform that leaves a norm, a bias, a sum of branches or a module unchanged says why with a
stable *code* (a snake_case name a program can match) and a readable *reason* (the modules and
values of this model). The codes are an API: a script may filter ``result.skipped`` by code, so a
code never changes its meaning and a new one is added here first.

Transforms, and the record each one's codes are carried in:

===============  ==============================================================================
``fold``         :func:`normfold.fold` (the planner, the measured gate): ``Skipped.code``
``capture``      :func:`normfold.fold` on a model captured in parts (:mod:`normfold.engine.parts`):
                 ``Skipped.code`` too
``merge``        reparameterization (``fold(..., reparameterize=True)``): ``NotMerged.code``
``drop_bias``    :func:`normfold.drop_redundant_biases`: ``KeptBias.code``
``swap``         :func:`normfold.swap_norms`: ``NotSwapped.code``
``calibrate``    :func:`normfold.recalibrate`: ``NotRecalibrated.code``
``norm_affine``  :func:`normfold.fold_norm_affine`: ``NormKept.code``, ``NormFolded.code``
===============  ==============================================================================

A code may be given by several transforms (``batch_statistics``: fold, drop-bias, recalibration);
:attr:`Code.meaning` is its general meaning and :meth:`Code.meaning_in` the wording of one
transform's table where that transform means it more narrowly. Besides their own codes, a merge
and a drop-bias pass on the planner's code of a norm that stays (a branch's own BatchNorm, the norm
after a layer): the last row of their tables says so.

The registry is split by concern: :mod:`.base` (what a code is), :mod:`.fold` (the fold's and the
capture's codes), :mod:`.transforms` (merge, drop-bias, swap, calibration), :mod:`.registry`
(:data:`CODES`, :func:`lookup`), :mod:`.tables` (README's tables), :mod:`.norm_affine` (the
norm-affine fold's own codes). README's tables of codes are
:func:`markdown` of each table in :data:`TABLES`;
``tests/codes/test_codes.py`` checks that README shows exactly them, and that every code the package
passes to a record is here and every code here is given somewhere. Regenerate a table with
``python -m normfold.codes --markdown [TABLE]``.
"""

from __future__ import annotations

from normfold.codes.base import TRANSFORMS, Code, Transform
from normfold.codes.kept import Kept
from normfold.codes.registry import CODES, lookup, names
from normfold.codes.tables import TABLES, Table, codes_of, markdown

__all__ = [
    "CODES", "TABLES", "TRANSFORMS", "Code", "Kept", "Table", "Transform", "codes_of", "lookup", "markdown",
    "names",
]  # fmt: skip
