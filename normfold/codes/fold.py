"""The codes of :func:`normfold.fold`: the planner's and the measured gate's (``fold``), norm
modules without an op, and a model captured in parts (``capture``)."""

from __future__ import annotations

from normfold.codes.base import Code
from normfold.codes.base import code as _code

__all__ = ["FOLD_CODES"]

FOLD_CODES: tuple[Code, ...] = (
    # --- fold: the planner (normfold.engine) ---------------------------------------------------
    _code(
        "batch_statistics",
        "no running statistics (`track_running_stats=False`) or training mode",
        ("fold", "drop_bias", "calibrate"),
        calibrate="no running statistics (`track_running_stats=False`), or its op normalizes with "
        "batch statistics in eval mode (`training=True`; its running averages are not updated while "
        "measured)",
    ),
    _code(
        "bad_statistics",
        "non-finite values or `running_var + eps <= 0` (a hand-written map: non-finite constants)",
        ("fold", "swap", "calibrate"),
        swap='non-finite statistics or `running_var + eps <= 0` (`to="frozen"`): the frozen outputs '
        "would not be finite",
        calibrate="the statistics do not fit the buffers' dtype (a variance above 65504 in float16)",
    ),
    _code(
        "not_constant",
        "the norm's statistics or affine parameters are computed from the input in `forward`, not "
        "buffers or parameters",
        ("fold", "norm_affine"),
    ),
    _code("unbatched", "the norm's input has fewer than two axes: no channel axis", "fold"),
    _code(
        "after_activation",
        "the norm's input comes from an activation (ReLU, ...), not a layer output; and no forward "
        "fold either",
        "fold",
    ),
    _code("after_input", "the norm's input is a model input; and no forward fold either", "fold"),
    _code(
        "after_op",
        "the norm's input comes from another op, not a layer output; and no forward fold either",
        "fold",
    ),
    _code(
        "after_norm",
        "the norm's input comes from another norm that stays; and no forward fold either",
        ("fold", "drop_bias"),
        drop_bias="the norm reads the layer output through another folded norm or affine op",
    ),
    _code(
        "merge_inputs",
        "the norm's input is a sum or concat whose inputs are not all layer outputs used only there; "
        "and no forward fold either",
        "fold",
    ),
    _code(
        "multiple_users",
        "the layer output (or an op on the way) is also used elsewhere, e.g. a residual",
        ("fold", "merge", "drop_bias"),
        merge="a branch's output is also used outside the sum",
        drop_bias="(forward folds) the layer output also goes elsewhere",
    ),
    _code(
        "repeated_branch",
        "the same layer output reaches the norm twice (on two inputs of one sum or concat)",
        ("fold", "merge"),
        merge="the same branch is added twice in the sum",
    ),
    _code(
        "shared_producer",
        "the layer's weight is used by several ops: a module called twice, a tied or directly read weight",
        ("fold", "merge", "drop_bias"),
        merge="a branch's conv weight or bias is used by several ops (a module called twice, a tied weight)",
        drop_bias="(forward folds) the layer's weight or bias is read by several ops",
    ),
    _code(
        "weight_not_parameter",
        "the layer's weight is computed in `forward` (weight standardization, parametrizations)",
        ("fold", "merge", "norm_affine"),
        merge="a branch's conv weight or bias is computed in `forward`",
    ),
    _code(
        "dtype",
        "the layer's weight is not floating point, or not the dtype of the layer's output",
        ("fold", "merge", "norm_affine"),
        merge="a branch's conv weight is not floating point, or not the dtype of its output",
    ),
    _code(
        "wrong_axis",
        "the norm's channel axis is not the layer's (`Linear` on `(N, L, C)` -> `BatchNorm1d(L)`)",
        ("fold", "merge", "norm_affine"),
        merge="a branch's kept scale varies along another axis than the channel axis",
        norm_affine="a Linear reads the norm's output along another axis than the one its scale varies along",
    ),
    _code("channel_mixing", "channels mix on the way between the layer and the norm", "fold"),
    _code(
        "not_commuting",
        "an op on the way does not commute with the map (avg pool counting zero padding)",
        "fold",
    ),
    _code(
        "negative_scale",
        "a scale is not positive and an op on the way commutes only with positive ones (max pool)",
        "fold",
    ),
    _code(
        "zero_padding_forward",
        "a forward fold into a zero-padded conv would change border outputs",
        "fold",
    ),
    _code(
        "transposed_consumer",
        "a forward fold into a transposed conv would change border outputs",
        "fold",
    ),
    _code("no_rule", "no rule of the planner's table matches the norm", "fold"),
    _code(
        "not_per_channel",
        "hand-written constants vary along other axes than the channel axis",
        ("fold", "norm_affine"),
        norm_affine="the norm normalizes over several axes (`normalized_shape` of rank > 1)",
    ),
    _code(
        "overflow",
        "a folded (or merged) value does not fit the parameter dtype (fp16: beyond 65504), or, in "
        "float16/bfloat16, a fold that scales up moves values the original computes unscaled (a sum, a "
        "mean that cancels) out of the dtype's range: such folds are judged by the parity rule inside "
        "`fold()`, with half its noise factor as a margin, and kept when the result fails",
        ("fold", "merge", "norm_affine"),
        merge="a merged kernel or bias does not fit the parameter dtype (fp16: beyond 65504)",
        norm_affine="a folded weight or bias does not fit the model's dtype (fp16: beyond 65504)",
    ),
    _code(
        "cancellation",
        "the norm's running mean lies many stds from zero (`|mean| / std` above 16 in fp32, 8 in fp16, "
        "4 in bf16), so the folded layer cancels two large numbers; `fold()` then judges its result by "
        "the parity rule on the example inputs and on them one sample larger along the batch axis "
        "(with `verify`'s normal and uniform 0..255 sets), with the original's own error alone as "
        "the noise in float32/float64 (`ParityRule(perturbations=0)`: a fold beyond the rule's factor "
        "of the rounding the original itself shows is not exact; in float16/bfloat16 the full rule, "
        "whose perturbed runs measure the parameter rounding a fold applies), with half the rule's "
        "noise factor as a margin (such a fold's error varies from one draw of inputs to the next: "
        "one at the edge of the rule passes or fails by the draw), and keeps such norms only when "
        "the fold fails it (a float32 `Linear -> BN(mean ~1e3, var 10)` before a batch-statistics "
        "norm: up to 30x the model's own error). The rest stay folded",
        "fold",
    ),
    _code(
        "in_subgraph",
        "(ONNX in) a BatchNormalization inside an If/Loop/Scan body: control-flow bodies are not folded yet",
        "fold",
    ),
    # --- fold: norm modules without an op (normfold.folding) -----------------------------------
    _code("per_sample_statistics", "GroupNorm/LayerNorm/InstanceNorm: statistics of each sample", "fold"),
    _code(
        "unused",
        "a norm module never called",
        ("fold", "calibrate"),
        calibrate="no batch-norm op ran with its statistics on the data",
    ),
    # --- capture in parts (normfold.engine.parts) ----------------------------------------------
    _code(
        "not_captured",
        "(models captured in parts) `torch.export` could not capture the module: its error",
        "capture",
    ),
    _code(
        "called_outside",
        "(models captured in parts) a module inside it is also called from outside it: captured "
        "alone, it would lose that call",
        "capture",
    ),
    _code(
        "no_export",
        "(models captured in parts) a fold that exists only in an export, and there is no whole-model export",
        "capture",
    ),
)
