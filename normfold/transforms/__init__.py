"""Transforms beyond the fold: drop redundant biases (:mod:`~normfold.transforms.bias`),
recalibrate norm statistics (:mod:`~normfold.transforms.calibration`) and swap BatchNorm for other
norms (:mod:`~normfold.transforms.swap`).
"""
