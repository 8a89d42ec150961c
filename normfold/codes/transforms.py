"""The codes of the other transforms: reparameterization merges (``merge``), drop-bias
(``drop_bias``), norm swaps (``swap``) and recalibration (``calibrate``)."""

from __future__ import annotations

from normfold.codes.base import Code
from normfold.codes.base import code as _code

__all__ = ["TRANSFORM_CODES"]

TRANSFORM_CODES: tuple[Code, ...] = (
    # --- merge (normfold.engine.reparam): the geometry of the branches -------------------------
    _code("reparam_stride", "the branches' strides differ (a 1-tap branch needs stride 1)", "merge"),
    _code("reparam_dilation", "the branches' dilations differ", "merge"),
    _code("reparam_groups", "the branches' groups differ", "merge"),
    _code(
        "reparam_padding",
        "centred in the largest kernel, a branch would read other inputs (`p_i != P - d(K - k_i)/2`), "
        "an avg pool leaves its padding out of the divisor, or (ONNX) a Conv pads unevenly or by `auto_pad`",
        "merge",
    ),
    _code("reparam_pool", "an avg pool uses `ceil_mode` or `divisor_override`: no fixed kernel", "merge"),
    _code("reparam_kernel", "no conv kernel covers all the others (`1x3 + 3x1` without a `3x3`)", "merge"),
    _code(
        "reparam_channels",
        "an identity-like branch, but output channels differ from input channels",
        "merge",
    ),
    # --- merge: the forward walk of a scale that stays on a branch (the planner's silent keeps) --
    _code(
        "feeds_op",
        "a scale on a branch stays: it folds into no layer before it, and its output feeds an op, "
        "not a layer",
        "merge",
    ),
    _code(
        "before_activation",
        "a scale on a branch stays: it folds into no layer before it, and its output feeds an activation",
        "merge",
    ),
    _code(
        "model_output",
        "a scale on a branch stays: it folds into no layer before it, and its output is returned by "
        "the model",
        ("merge", "norm_affine"),
        norm_affine="the norm's output is returned by the model (T5's final encoder norm)",
    ),
    # --- drop_bias (normfold.transforms.bias) --------------------------------------------------
    _code(
        "export_only",
        "the engine folds the norm in the export only (functional `F.batch_norm`, hooks, a norm also "
        "called where it stays, ...)",
        "drop_bias",
    ),
    _code("no_bias", "the layer has no bias: nothing to drop", "drop_bias"),
    _code("through_ops", "ops between the layer and the norm", "drop_bias"),
    _code(
        "forward_fold",
        "the norm folds forward into the layer after it: no layer feeds it directly",
        "drop_bias",
    ),
    _code(
        "not_layer_module",
        "the layer is functional code or not a Conv/ConvTranspose/Linear module's op",
        "drop_bias",
    ),
    _code(
        "custom_forward",
        "a layer subclass whose `forward` does not run unchanged with `bias=None`",
        ("drop_bias", "swap"),
        swap="a BatchNorm subclass overrides `forward`: a swap would lose its extra behaviour",
    ),
    _code(
        "not_batchnorm",
        "the norm module is not a `torch` BatchNorm (its training behaviour is unknown)",
        "drop_bias",
    ),
    _code(
        "shared_norm",
        "one norm module called at several places: one running mean, several biases",
        ("drop_bias", "norm_affine"),
        norm_affine="the norm's scale or shift is also read elsewhere (a norm called twice, a shared weight)",
    ),
    # --- swap (normfold.transforms.swap) -------------------------------------------------------
    _code(
        "uninitialized",
        "the BatchNorm has uninitialized (lazy) parameters: run the model once first",
        "swap",
    ),
    _code(
        "no_statistics",
        '`track_running_stats=False` (`to="frozen"`): no stored statistics to freeze',
        "swap",
    ),
    _code(
        "not_sync",
        'not a `SyncBatchNorm` (`to="batch"` converts SyncBatchNorm only)',
        "swap",
    ),
    _code(
        "not_called",
        'never called on `example_inputs` (`to="batch"`): its input rank (BatchNorm1d/2d/3d) is unknown',
        "swap",
    ),
    # --- calibrate (normfold.transforms.calibration) -------------------------------------------
    _code(
        "multiple_calls",
        "its op runs several times in one forward (a module called at several places, e.g. "
        "`bn(conv(bn(x)))`): the call sites' inputs differ, so no one set of statistics is exact for "
        "every call, and pooled ones would move again on a second pass",
        "calibrate",
    ),
    _code("no_values", "its op's input has no values (a zero-size axis)", "calibrate"),
)
