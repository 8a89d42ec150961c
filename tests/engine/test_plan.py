"""The planner's patterns, one by one: positive (structure + parity with realistic statistics) and
negative (the precondition fails: exact code and reason, outputs unchanged)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import bn_ops, exported, randomize_bn
from torch import nn

import normfold

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max rel error vs the original (fp32 at rounding level; fp16/bf16 at a few ulps of the output)
TOL = {torch.float32: 2e-6, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _x(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3).to(dtype)


def _folds(model, x, expected, *, kept=None):
    """``expected``: [(norm, pattern, into, where)]; ``kept``: {norm: code}. Parity in eager and export."""
    result = normfold.fold(model, x)
    assert [(f.norm, f.pattern, f.into, f.where) for f in result.folded] == expected
    assert {s.norm: s.code for s in result.skipped} == (kept or {})
    assert result.replan_folds == 0
    assert bn_ops(result.program) == sum(1 for s in result.skipped if s.code != "unused")
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()
        assert report.max_rel_error <= TOL[x.dtype]
    return result


def _kept(model, x, norm, code, reason):
    result = normfold.fold(model, x)
    assert result.folded == []
    assert [(s.norm, s.code, s.reason) for s in result.skipped] == [(norm, code, reason)]
    for candidate in (result.model, exported(result.program)):
        assert torch.equal(candidate(x), model(x))
    return result


class Seq(nn.Module):
    """``layer -> between(x) -> norm -> tail``, ``between`` a plain function."""

    def __init__(self, layer, norm, between=None, tail=None):
        super().__init__()
        self.layer, self.norm = layer, norm
        self.between, self.tail = between or (lambda t: t), tail or (lambda t: t)

    def forward(self, x):
        return self.tail(self.norm(self.between(self.layer(x))))


# --- ops in between ------------------------------------------------------------------------------

BETWEEN = {
    "dropout": nn.Dropout(0.3),
    "clone_contiguous": lambda t: t.clone().contiguous(),
    "to_same_dtype": lambda t: t.to(t.dtype),
    "avg_pool": nn.AvgPool2d(2),
    "avg_pool_padding_not_counted": nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
    "adaptive_avg_pool": nn.AdaptiveAvgPool2d(2),
    "max_pool": nn.MaxPool2d(2),
    "upsample": nn.Upsample(scale_factor=2),
    "permute_twice": lambda t: t.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
    "mean_spatial_keepdim": lambda t: t.mean((2, 3), keepdim=True),
    "reflect_pad": lambda t: F.pad(t, (1, 1, 1, 1), mode="reflect"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("between", list(BETWEEN))
def test_conv_bn_folds_through_commuting_ops(between, dtype):
    model = randomize_bn(Seq(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), BETWEEN[between]))
    model = model.to(dtype)
    _folds(model, _x((2, 3, 5, 5), dtype), [("norm", "conv-bn", "layer", "both")])


def test_linear_on_tokens_flatten_bn1d_folds():  # LeViT: Linear (N, L, C) -> flatten -> BatchNorm1d(C)
    model = randomize_bn(Seq(nn.Linear(8, 12, bias=False), nn.BatchNorm1d(12), lambda t: t.flatten(0, 1)))
    result = _folds(model, _x((2, 5, 8)), [("norm", "linear-bn", "layer", "both")])
    assert result.folded[0].through == ("flatten",)


def test_channel_slice_folds_into_the_sliced_channels():
    model = randomize_bn(Seq(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4), lambda t: t[:, 2:6]))
    result = _folds(model, _x((2, 3, 4, 4)), [("norm", "conv-bn", "layer", "both")])
    untouched = [0, 1, 6, 7]  # channels the norm never sees keep their weights
    assert torch.equal(result.model.layer.weight[untouched], model.layer.weight[untouched])


def test_avg_pool_counting_zero_padding_is_kept():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.AvgPool2d(3, 1, padding=1)))
    reason = (
        "between (avg_pool2d): avg pooling counts zero padding in its divisor, which scales the norm's "
        "shift at borders"
    )
    _kept(model, _x((2, 3, 5, 5)), "norm", "not_commuting", reason)


def test_max_pool_with_a_negative_scale_is_kept():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.MaxPool2d(2)))
    with torch.no_grad():
        model.norm.weight[1] = -0.7
    reason = "norm has 1 non-positive scale(s), which between (max_pool2d) does not commute with"
    _kept(model, _x((2, 3, 4, 4)), "norm", "negative_scale", reason)


SCALARS = {
    "div_negative": lambda t: t / -0.5,
    "mul_negative": lambda t: t * -2.0,
    "rsub": lambda t: 1.5 - t,
}


@pytest.mark.parametrize("scalar", list(SCALARS))
def test_negative_scalar_does_not_fold_through_max_pool(scalar):
    """``max(-2y) != -2 max(y)``: a scalar's sign is checked like a per-channel scale's (the
    program used to get the scalar folded through the max pool into the conv)."""
    model = randomize_bn(
        Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), lambda t: F.max_pool2d(t, 3, 1), SCALARS[scalar])
    )
    x = _x((2, 3, 12, 12))
    result = normfold.fold(model, x)
    assert [(f.norm, f.pattern, f.through) for f in result.folded] == [("norm", "conv-bn", ("max_pool2d",))]
    assert result.skipped == []  # a scalar op that stays is no norm: not reported
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


def test_positive_scalar_folds_through_max_pool():
    model = randomize_bn(
        Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), lambda t: F.max_pool2d(t, 3, 1), lambda t: t / 0.5)
    )
    x = _x((2, 3, 12, 12))
    result = normfold.fold(model, x)
    assert [(f.norm, f.pattern, f.where) for f in result.folded] == [
        ("norm", "conv-bn", "both"),
        ("forward:div", "conv-affine", "export"),
    ]
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


def test_negative_scalar_does_not_fold_forward_through_max_pool():
    """The forward direction: ``relu(conv(x)) * -0.5 -> max pool -> conv``."""
    model = Seq(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), lambda t: t * -0.5, tail=nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(4, 5, 1)))  # fmt: skip
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert result.folded == [] and result.skipped == []
    for candidate in (result.model, exported(result.program)):
        assert normfold.verify(model, candidate, x).passed


def test_mean_over_channels_is_kept():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(1), lambda t: t.mean(1, keepdim=True)))
    _kept(model, _x((2, 3, 4, 4)), "norm", "channel_mixing", "mean (forward) reduces over the channel axis")


def test_bn1d_over_flattened_channels_and_pixels_is_kept():
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(16), lambda t: t.flatten(1)))
    reason = "one channel of layer (conv2d) reaches several channels of norm"
    result = normfold.fold(model, _x((2, 3, 2, 2)))
    assert [(s.code, s.reason) for s in result.skipped] == [("channel_mixing", reason)]


# --- forward folds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bn_folds_forward_into_unpadded_conv(dims, bias, groups, dtype):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](6, 6, 3, groups=groups, bias=bias)
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](6)
    model = randomize_bn(nn.Sequential(nn.ReLU(), norm, conv)).to(dtype)
    _folds(model, _x((2, 6, *[5] * dims), dtype), [("1", "bn-conv", "2", "both")])


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_folds_forward_into_conv_with_copying_padding(mode):
    model = randomize_bn(
        nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode))
    )
    _folds(model, _x((2, 4, 6, 6)), [("1", "bn-conv", "2", "both")])


def test_bn_before_pooling_and_classifier_folds_forward():
    head = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    result = _folds(randomize_bn(head), _x((2, 6, 4, 4)), [("1", "bn-linear", "4", "both")])
    assert result.folded[0].through == ("adaptive_avg_pool2d", "flatten")


def test_bn_before_flatten_into_linear_folds_per_feature():
    head = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4))
    _folds(randomize_bn(head), _x((2, 3, 2, 2)), [("1", "bn-linear", "3", "both")])


class TwoConsumers(nn.Module):
    def __init__(self, padding=0):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=padding)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        return self.a(y), self.b(y)


def test_bn_feeding_two_convs_folds_into_both():
    _folds(randomize_bn(TwoConsumers()), _x((2, 4, 5, 5)), [("bn", "bn-conv", "a, b", "both")])


def test_bn_feeding_a_padded_conv_among_others_is_kept():
    model = randomize_bn(TwoConsumers(padding=1))
    reason = (
        "input of bn comes from relu (forward), not a Conv/ConvTranspose/Linear; as a forward fold: "
        "bn feeds b (conv2d), whose zero padding would see 0 instead of the norm's shift at the borders"
    )
    result = normfold.fold(model, _x((2, 4, 5, 5)))
    assert [(s.norm, s.code, s.reason) for s in result.skipped] == [("bn", "zero_padding_forward", reason)]
    assert torch.equal(result.model.a.weight, model.a.weight)  # nothing half-folded


def test_bn_before_transposed_conv_is_kept():
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 2)))
    reason = (
        "input of 1 comes from 0 (relu), not a Conv/ConvTranspose/Linear; as a forward fold: 1 feeds 2 "
        "(conv_transpose2d), a transposed conv: a shift would reach border outputs a different number "
        "of times"
    )
    _kept(model, _x((2, 4, 3, 3)), "1", "transposed_consumer", reason)


def test_backward_fold_takes_priority_over_forward():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)))
    _folds(model, _x((2, 3, 4, 4)), [("1", "conv-bn", "0", "both")])


# --- a bare matmul with a parameter: a Linear without bias ------------------------------------------


class BareMatmul(nn.Module):
    """``x @ W`` (``W`` a parameter, no bias) and a BatchNorm1d after it, or before it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        shape = (7, 5) if how == "transposed" else (5, 7)  # (out, in), as a Linear stores it
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
        self.norm = nn.BatchNorm1d(5 if how == "norm_first" else 7)

    def forward(self, x):
        if self.how == "norm_first":
            return self.norm(torch.relu(x)) @ self.w
        if self.how == "transposed":
            return self.norm(x @ self.w.t())
        if self.how == "tokens":  # (N, L, 5) @ W -> (N * L, 7), as LeViT's linear-bn
            return self.norm((x @ self.w).flatten(0, 1))
        return self.norm(x @ self.w)


@pytest.mark.parametrize("how", ["plain", "transposed", "tokens", "norm_first"])
def test_bn_next_to_a_bare_matmul_folds_in_the_export(how):
    """The norm's shift needs a bias the matmul has no slot for: the program gets ``x @ W' + b``,
    the user's forward cannot, so the eager module keeps its norm (export only, with a note)."""
    model = randomize_bn(BareMatmul(how))
    x = _x((4, 3, 5) if how == "tokens" else (6, 5))
    pattern = "bn-linear" if how == "norm_first" else "linear-bn"
    result = _folds(model, x, [("norm", pattern, "w", "export")])
    assert result.folded[0].note == (
        "folded in the export only: the matmul x @ w in forward has no bias to receive the norm's shift"
    )
    assert isinstance(result.model.norm, nn.BatchNorm1d)  # the eager module is the original
    adds = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 1 and adds[0].args[1].op == "placeholder"  # the new bias, a parameter


# --- concat and add -----------------------------------------------------------------------------


class Merge(nn.Module):
    def __init__(self, how, relu_second=False):
        super().__init__()
        self.how, self.relu_second = how, relu_second
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4 if how == "add" else 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(4 if how == "add" else 10)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        b = torch.relu(b) if self.relu_second else b
        return self.bn(a + b if self.how == "add" else torch.cat([a, b], 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["cat", "add"])
def test_bn_after_merge_of_convs_folds_into_each(how, dtype):
    model = randomize_bn(Merge(how)).to(dtype)
    pattern = "concat-bn" if how == "cat" else "add-bn"
    _folds(model, _x((2, 3, 5, 5), dtype), [("bn", pattern, "a, b", "both")])


@pytest.mark.parametrize("how", ["cat", "add"])
def test_bn_after_merge_with_an_activation_branch_is_kept(how):
    model = randomize_bn(Merge(how, relu_second=True))
    reason = "input of bn comes from relu (forward), not a Conv/ConvTranspose/Linear"
    result = normfold.fold(model, _x((2, 3, 5, 5)))
    assert [(s.norm, s.code, s.reason) for s in result.skipped] == [("bn", "after_activation", reason)]
    assert torch.equal(result.model.a.weight, model.a.weight)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) + x)  # BN after a residual add: x is also a model input


def test_bn_after_residual_add_is_kept():
    reason = "input of bn is model input x, not a Conv/ConvTranspose/Linear output"
    # the planner's rule, before any merge (with reparameterize the identity sum merges first)
    result = normfold.fold(randomize_bn(Residual()), _x((2, 4, 5, 5)), reparameterize=False)
    assert [(s.norm, s.code, s.reason) for s in result.skipped] == [("bn", "after_input", reason)]


# --- hand-written norms -----------------------------------------------------------------------------


class Inline(nn.Module):
    """The tutorials' ``gain * (h - mean) / std + bias`` on a conv output, in the model's own forward."""

    def __init__(self, c=5, vary_spatial=False):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("mean", torch.randn(c, generator=g))
        self.register_buffer("var", torch.rand(c, generator=g) + 0.3)
        shape = (1, c, 1, 4) if vary_spatial else (1, c, 1, 1)
        self.gain = nn.Parameter(torch.rand(shape, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.randn(c, generator=g)[:, None, None])

    def forward(self, x):
        h = self.conv(x)
        std = torch.sqrt(self.var + 1e-5)[None, :, None, None]
        return torch.relu(self.gain * (h - self.mean[None, :, None, None]) / std + self.bias)


def test_inline_bn_folds_in_the_export():
    model = Inline().eval()
    result = _folds(model, _x((2, 3, 6, 6)), [("forward:sub", "conv-affine", "conv", "export")])
    assert "written in forward code" in result.folded[0].note
    mul_div_add = {"sub", "div", "mul", "add"}
    ops = {n.target.__name__.split(".")[0] for n in result.program.graph.nodes if n.op == "call_function"}
    assert not ops & mul_div_add  # the whole chain is gone from the export


def test_inline_constants_varying_off_the_channel_axis_are_not_a_norm():
    model = Inline(vary_spatial=True).eval()
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert result.folded == [] and result.skipped == []  # not per channel: not folded, not a norm
    assert torch.equal(exported(result.program)(x), model(x))


class LayerScaleAfterPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(x) * self.gamma  # a per-channel scale with no layer to go into


def test_a_layer_scale_that_stays_is_not_reported_as_a_norm():
    result = normfold.fold(LayerScaleAfterPool(), _x((2, 4, 3, 3)))
    assert result.folded == [] and result.skipped == []


def test_an_inline_norm_that_stays_is_reported():
    model = Inline().eval()
    model.conv = nn.ReLU()  # the norm now reads a relu output: nothing to fold into
    x = _x((2, 5, 6, 6))
    result = normfold.fold(model, x)
    reason = "input of forward:sub comes from conv (relu), not a Conv/ConvTranspose/Linear"
    assert [(s.norm, s.code, s.reason) for s in result.skipped] == [
        ("forward:sub", "after_activation", reason)
    ]
    assert torch.equal(exported(result.program)(x), model(x))


def test_a_fold_that_would_overflow_the_parameter_dtype_is_skipped() -> None:
    """fp16: gamma / sqrt(var + eps) = 1e3 / sqrt(1e-5) ~ 3e5 times a weight of 1 is over 65504."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    randomize_bn(model)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_var.fill_(0.0)  # eps 1e-5: a scale of gamma * 316
        model[1].weight.fill_(1e3)
    model = model.half().eval()
    x = (torch.randn(2, 3, 4, 4).half(),)
    result = normfold.fold(model, x)
    (skip,) = result.skipped
    assert (skip.norm, skip.code) == ("1", "overflow")
    overflow = "does not fit in float16 (largest finite 6.55e+04): the fold would make it inf"
    assert skip.reason == f"the folded 0.weight {overflow}; as a forward fold: the folded 2.weight {overflow}"
    assert [f.norm for f in result.folded] == ["3"]  # the other norm still folds
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
