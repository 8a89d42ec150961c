"""The codes of :func:`normfold.fold_norm_affine` (``norm_affine``): a LayerNorm / RMSNorm /
GroupNorm whose scale and shift stay (or whose shift stays) in the norm. It also gives codes of the
fold's registry where they mean the same (``wrong_axis``, ``overflow``, ``model_output``, ...), each
with its own wording in the ``norm_affine`` table."""

from __future__ import annotations

from normfold.codes.base import Code
from normfold.codes.base import code as _code

__all__ = ["NORM_AFFINE_CODES"]

NORM_AFFINE_CODES: tuple[Code, ...] = (
    _code(
        "residual_user",
        "the norm's output is also added to another tensor (a post-norm block's residual): a Linear "
        "alone cannot absorb its scale",
        "norm_affine",
    ),
    _code(
        "rope_after_norm",
        "the norm's output is rotated (a rotary embedding after a qk-norm: a product with cos/sin and a "
        "half-swap) before any Linear",
        "norm_affine",
    ),
    _code(
        "nonlinear_consumer",
        "the norm's output feeds an op that is not a Linear over its normalized axis (an activation, a "
        "product with another tensor, a conv)",
        "norm_affine",
    ),
    _code(
        "tied_weight",
        "a consumer Linear's weight (or bias) is also read elsewhere or registered under another name "
        "(a tied LM head): scaling it would change the other reader",
        "norm_affine",
    ),
    _code(
        "new_bias_needed",
        "a consumer Linear has no bias for the norm's shift (`new_biases=True` adds one to an "
        "`nn.Linear`): the scale folds, the shift stays in the norm as `beta / gamma` (the whole norm "
        "stays where its scale has a zero or is all 1)",
        "norm_affine",
    ),
    _code(
        "no_affine", "the norm has no scale or shift (or scale 1 and shift 0): nothing to fold", "norm_affine"
    ),
    _code(
        "affine_not_parameter",
        "the norm's scale or shift is computed from parameters in a way normfold cannot write back "
        "(only a parameter read through casts and `+ c`)",
        "norm_affine",
    ),
)
