"""Checks that a transformed model still computes what the original did: run both on the same
inputs (:mod:`~normfold.check.reference`, :mod:`~normfold.check.input_sets`) and compare outputs
under a parity rule (:mod:`~normfold.check.parity`), with error statistics and exact checks.
"""
