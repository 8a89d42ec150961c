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

README's tables of codes are :func:`markdown` of each table in :data:`TABLES`;
``tests/test_codes.py`` checks that README shows exactly them, and that every code the package
passes to a record is here and every code here is given somewhere. Regenerate a table with
``python -m normfold.codes --markdown [TABLE]``.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

from normfold.errors import UnknownCodeError

__all__ = ["CODES", "TABLES", "TRANSFORMS", "Code", "Table", "codes_of", "lookup", "markdown", "names"]

Transform = Literal["fold", "capture", "merge", "drop_bias", "swap", "calibrate", "norm_affine"]
TRANSFORMS: tuple[Transform, ...] = ("fold", "capture", "merge", "drop_bias", "swap", "calibrate",
                                     "norm_affine")  # fmt: skip


@dataclass(frozen=True)
class Code:
    """One stable code: its name, its meaning (one line, README's wording) and the transforms
    that give it. ``meanings``: the wording of one transform's table where it differs."""

    name: str
    meaning: str
    transforms: tuple[Transform, ...]
    meanings: Mapping[Transform, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.transforms, *self.meanings) if t not in TRANSFORMS]
        if unknown or not self.transforms:
            raise ValueError(f"code {self.name!r}: transforms {self.transforms} (known: {TRANSFORMS})")
        if set(self.meanings) - set(self.transforms):
            raise ValueError(f"code {self.name!r}: a meaning for a transform that does not give it")
        object.__setattr__(self, "meanings", MappingProxyType(dict(self.meanings)))

    def meaning_in(self, transform: Transform) -> str:
        """The meaning as ``transform``'s table words it."""
        return self.meanings.get(transform, self.meaning)


def _code(name: str, meaning: str, transforms: Transform | tuple[Transform, ...], **meanings: str) -> Code:
    given: tuple[Transform, ...] = (transforms,) if isinstance(transforms, str) else transforms
    return Code(name, meaning, given, cast("dict[Transform, str]", meanings))


# Grouped by the transform that gives a code first; each table lists its own codes first.
_ALL = (
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
        norm_affine="a Linear reads the norm's output along another axis than the one its scale varies along",
        merge="a branch's kept scale varies along another axis than the channel axis",
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
        "`fold()` and kept when the result fails",
        ("fold", "merge", "norm_affine"),
        merge="a merged kernel or bias does not fit the parameter dtype (fp16: beyond 65504)",
        norm_affine="a folded weight or bias does not fit the model's dtype (fp16: beyond 65504)",
    ),
    _code(
        "cancellation",
        "the norm's running mean lies many stds from zero (`|mean| / std` above 16 in fp32, 8 in fp16, "
        "4 in bf16), so the folded layer cancels two large numbers; `fold()` then judges its result by "
        "the parity rule on the example inputs, with the original's own error alone as the noise in "
        "float32/float64 (`ParityRule(perturbations=0)`: a fold beyond the rule's factor of the "
        "rounding the original itself shows is not exact; in float16/bfloat16 the full rule, whose "
        "perturbed runs measure the parameter rounding a fold applies), and keeps such norms only when "
        "the fold fails it (a float32 `Linear -> BN(mean ~1e3, var 10)` before a batch-statistics "
        "norm: up to 30x the model's own error). The rest stay folded",
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
        "no_export",
        "(models captured in parts) a fold that exists only in an export, and there is no whole-model export",
        "capture",
    ),
    # --- merge (normfold.engine.reparam): the geometry of the branches -------------------------
    _code("reparam_stride", "the branches' strides differ (a 1-tap branch needs stride 1)", "merge"),
    _code("reparam_dilation", "the branches' dilations differ", "merge"),
    _code("reparam_groups", "the branches' groups differ", "merge"),
    _code(
        "reparam_padding",
        "centred in the largest kernel, a branch would read other inputs (`p_i != P - d(K - k_i)/2`), "
        "or an avg pool leaves its padding out of the divisor",
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
    # --- norm_affine (normfold.engine.norm_affine): LayerNorm / RMSNorm affine into Linear layers --
    *(_code(name, meaning, "norm_affine") for name, meaning in {
        "residual_user": "the norm's output is also added to another tensor (a post-norm block's "
        "residual): a Linear alone cannot absorb its scale",
        "rope_after_norm": "the norm's output is rotated (a rotary embedding after a qk-norm: a product "
        "with cos/sin and a half-swap) before any Linear",
        "nonlinear_consumer": "the norm's output feeds an op that is not a Linear over its normalized axis "
        "(an activation, a product with another tensor, a conv)",
        "tied_weight": "a consumer Linear's weight (or bias) is also read elsewhere or registered under "
        "another name (a tied LM head): scaling it would change the other reader",
        "new_bias_needed": "a consumer Linear has no bias for the norm's shift (`new_biases=True` adds one "
        "to an `nn.Linear`): the scale folds, the shift stays in the norm as `beta / gamma` (the whole "
        "norm stays where its scale has a zero or is all 1)",
        "no_affine": "the norm has no scale or shift (or scale 1 and shift 0): nothing to fold",
        "affine_not_parameter": "the norm's scale or shift is computed from parameters in a way normfold "
        "cannot write back (only a parameter read through casts and `+ c`)",
    }.items()),
)

#: name -> :class:`Code`, every code normfold gives
CODES: Mapping[str, Code] = MappingProxyType({c.name: c for c in _ALL})
if len(CODES) != len(_ALL):
    raise ValueError("normfold.codes: a code is registered twice")


@dataclass(frozen=True)
class Table:
    """One of README's tables of codes: the codes of ``transforms`` (each one's own first), under
    ``header``, and ``footer`` rows after them (a code passed on from another table)."""

    name: str
    transforms: tuple[Transform, ...]
    header: tuple[str, str] = ("code", "meaning")
    footer: tuple[tuple[str, str], ...] = ()


TABLES: Mapping[str, Table] = MappingProxyType({
    "fold": Table("fold", ("fold", "capture")),
    "merge": Table(
        "merge",
        ("merge",),
        footer=(("any kept-norm code", "a branch's own BN stays (its conv branch is then no conv)"),),
    ),
    "drop_bias": Table(
        "drop_bias",
        ("drop_bias",),
        footer=(("any kept-norm code", "the engine keeps the norm: a code of `fold()`'s table, its reason"),),
    ),
    "swap": Table("swap", ("swap",)),
    "calibrate": Table("calibrate", ("calibrate",), header=("code", "left unchanged because")),
    "norm_affine": Table("norm_affine", ("norm_affine",), header=("code", "kept (or shift kept) because")),
})  # fmt: skip


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


def codes_of(table: str) -> list[Code]:
    """The codes ``table`` shows, in its order: those a transform of the table gives first, then
    the ones it shares, each group in registry order."""
    t = _table(table)
    mine = [c for c in CODES.values() if set(c.transforms) & set(t.transforms)]
    return sorted(mine, key=lambda c: c.transforms[0] not in t.transforms)


def markdown(table: str) -> str:
    """``table`` as README shows it: a markdown table, one row per code, no trailing newline."""
    t = _table(table)
    rows = [
        f"| {t.header[0]} | {t.header[1]} |",
        "|---|---|",
        *(f"| `{c.name}` | {_cell(_meaning(c, t))} |" for c in codes_of(table)),
        *(f"| {name} | {_cell(meaning)} |" for name, meaning in t.footer),
    ]
    return "\n".join(rows)


def _meaning(code: Code, table: Table) -> str:
    return code.meaning_in(next(t for t in table.transforms if t in code.transforms))


def _cell(text: str) -> str:
    """A table cell: every ``|`` escaped, so a ``|mean|`` in a code span does not end the cell."""
    return text.replace("|", "\\|")


def _table(name: str) -> Table:
    if name not in TABLES:
        raise UnknownCodeError(f"{name!r} is not a table of codes (known: {', '.join(TABLES)})")
    return TABLES[name]


def _main(argv: Sequence[str]) -> int:
    """``python -m normfold.codes --markdown [TABLE ...]``: print README's tables of codes."""
    if not argv or argv[0] != "--markdown" or any(a not in TABLES for a in argv[1:]):
        sys.stderr.write(f"usage: python -m normfold.codes --markdown [{' | '.join(TABLES)} ...]\n")
        return 2
    for name in argv[1:] or list(TABLES):
        sys.stdout.write(f"<!-- table of codes: {name} -->\n{markdown(name)}\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
