"""Each fold rule alone, on tiny captured graphs: what it matches, every refusal it gives (exact code
and reason), and the values it plans (float64, against the BatchNorm formula)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfold.engine import planner
from normfold.engine.capture import CaptureOptions, capture
from normfold.engine.context import Candidate, Context, Refused
from normfold.engine.norms import candidates
from normfold.engine.rules import (
    RULES,
    ConcatThenNorm,
    ConstantWeight,
    LayerThenNorm,
    NormThenLayers,
    SumThenNorm,
)
from normfold.engine.torch_view import TorchView


def _bn(c: int, seed: int, *, negative: bool = False) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 2 + 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.2)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if negative:
            bn.weight[0] = -bn.weight[0]
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def _expected(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = bn.weight.double() / torch.sqrt(var + bn.eps)
    return s, bn.bias.double() - mean * s


class Seq(nn.Module):
    def __init__(self, *mods: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3), _bn(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class Sum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), _bn(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), _bn(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.bn(h) + h


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), _bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def _setup(model: nn.Module, shape: tuple[int, ...] = (2, 3, 8, 8)) -> tuple[Context, list[Candidate]]:
    cap = capture(model.eval(), (torch.randn(*shape),), CaptureOptions(dynamic_batch=False))
    view = TorchView(cap)
    return Context(view, cap), candidates(view)


def _only(cands: list[Candidate]) -> Candidate:
    assert len(cands) == 1, [c.unit.name for c in cands]
    return cands[0]


# --- LayerThenNorm -------------------------------------------------------------------------------


def test_layer_then_norm_plans_the_batchnorm_map_on_the_output_side() -> None:
    model = Seq(nn.Conv2d(3, 5, 3), _bn(5, 0))
    ctx, cands = _setup(model)
    rule, cand = LayerThenNorm(), _only(cands)
    m = rule.match(ctx, cand)
    assert m is not None and len(m.trace.branches) == 1
    assert rule.check(ctx, m) is None
    fold = rule.plan(ctx, m)
    assert fold.pattern == "conv-bn" and fold.unit.name == "body.1"
    (u,) = fold.updates
    s, t = _expected(model.body[1])
    assert (u.side, u.weight, u.bias, u.module) == ("output", "body.0.weight", "body.0.bias", "body.0")
    torch.testing.assert_close(u.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(u.shift, t, rtol=1e-12, atol=1e-12)


def test_layer_then_norm_leaves_merges_to_their_rules() -> None:
    for model, merge in ((Cat(), ConcatThenNorm), (Sum(), SumThenNorm)):
        ctx, cands = _setup(model)
        assert LayerThenNorm().match(ctx, _only(cands)) is None
        assert merge().match(ctx, _only(cands)) is not None


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        (Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), _bn(4, 0)), "after_activation",
         "input of body.2 comes from body.1 (relu), not a Conv/ConvTranspose/Linear"),
        (Seq(_bn(3, 0)), "after_input",
         "input of body.0 is model input x, not a Conv/ConvTranspose/Linear output"),
        (Residual(), "multiple_users", "conv (conv2d) output has 2 users"),
        (Seq(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 1, padding=1), _bn(4, 0)), "not_commuting",
         "body.1 (avg_pool2d): avg pooling counts zero padding in its divisor, which scales the norm's "
         "shift at borders"),
    ],
)  # fmt: skip
def test_layer_then_norm_walk_refusals(model: nn.Module, code: str, reason: str) -> None:
    ctx, cands = _setup(model)
    with pytest.raises(Refused) as e:
        LayerThenNorm().match(ctx, _only(cands))
    assert (e.value.code, e.value.reason) == (code, reason)


def test_layer_then_norm_check_refusals() -> None:
    ctx, cands = _setup(Twice(), (2, 4, 8, 8))
    cand = _only(cands)
    m = LayerThenNorm().match(ctx, cand)
    r = LayerThenNorm().check(ctx, m)
    assert r.code == "shared_producer"
    assert r.reason.startswith("conv (conv2d) weight conv.weight is used by 2 ops")

    ctx, cands = _setup(Seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), _bn(4, 0, negative=True)))
    m = LayerThenNorm().match(ctx, _only(cands))
    r = LayerThenNorm().check(ctx, m)
    assert (r.code, r.reason) == (
        "negative_scale",
        "body.2 has 1 non-positive scale(s), which body.1 (max_pool2d) does not commute with",
    )

    class MeanOverChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), _bn(1, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x).mean(1, keepdim=True))

    ctx, cands = _setup(MeanOverChannels())
    m = LayerThenNorm().match(ctx, _only(cands))
    r = LayerThenNorm().check(ctx, m)
    assert (r.code, r.reason) == ("channel_mixing", "mean (forward) reduces over the channel axis")

    class WrongAxis(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(5).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))

    ctx, cands = _setup(WrongAxis(), (2, 5, 6))
    m = LayerThenNorm().match(ctx, _only(cands))
    r = LayerThenNorm().check(ctx, m)
    assert r.code == "wrong_axis"
    assert r.reason == (
        "bn normalizes axis 1 of the (2, 5, 6) output of fc (linear), whose channels are on axis 2"
    )


# --- merges ---------------------------------------------------------------------------------------


def test_concat_then_norm_splits_the_map_per_slice() -> None:
    model = Cat()
    ctx, cands = _setup(model)
    rule = ConcatThenNorm()
    m = rule.match(ctx, _only(cands))
    assert rule.check(ctx, m) is None
    fold = rule.plan(ctx, m)
    s, t = _expected(model.bn)
    assert fold.pattern == "concat-bn"
    a, b = fold.updates
    assert (a.weight, b.weight) == ("a.weight", "b.weight")
    torch.testing.assert_close(torch.cat([a.scale, b.scale]), s, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([a.shift, b.shift]), t, rtol=1e-12, atol=1e-12)


def test_sum_then_norm_scales_every_branch_and_shifts_one() -> None:
    model = Sum()
    ctx, cands = _setup(model)
    rule = SumThenNorm()
    m = rule.match(ctx, _only(cands))
    assert rule.check(ctx, m) is None
    fold = rule.plan(ctx, m)
    s, t = _expected(model.bn)
    a, b = fold.updates
    assert fold.pattern == "add-bn"
    torch.testing.assert_close(a.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.shift, t, rtol=1e-12, atol=1e-12)
    assert bool((b.shift == 0).all())


# --- NormThenLayers -------------------------------------------------------------------------------


def test_norm_then_layers_plans_the_map_on_the_input_side() -> None:
    model = Seq(_bn(3, 6), nn.Conv2d(3, 4, 1))
    ctx, cands = _setup(model)
    rule = NormThenLayers()
    m = rule.match(ctx, _only(cands))
    assert rule.check(ctx, m) is None
    fold = rule.plan(ctx, m)
    s, t = _expected(model.body[0])
    (u,) = fold.updates
    assert (fold.pattern, u.side, u.weight) == ("bn-conv", "input", "body.1.weight")
    torch.testing.assert_close(u.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(u.shift, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        (Seq(_bn(3, 0), nn.Conv2d(3, 4, 3, padding=1)), "zero_padding_forward",
         "body.0 feeds body.1 (conv2d), whose zero padding would see 0 instead of the norm's shift at "
         "the borders"),
        (Seq(_bn(3, 0), nn.ConvTranspose2d(3, 4, 2)), "transposed_consumer",
         "body.0 feeds body.1 (conv_transpose2d), a transposed conv: a shift would reach border outputs a "
         "different number of times"),
    ],
)  # fmt: skip
def test_norm_then_layers_check_refusals(model: nn.Module, code: str, reason: str) -> None:
    ctx, cands = _setup(model)
    m = NormThenLayers().match(ctx, _only(cands))
    r = NormThenLayers().check(ctx, m)
    assert (r.code, r.reason) == (code, reason)


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        (Seq(_bn(3, 0), nn.ReLU(), nn.Conv2d(3, 4, 1)), "before_activation",
         "body.0 output feeds body.1 (relu), not a Conv/Linear"),
        (Seq(_bn(3, 0)), "model_output", "body.0 output is returned by the model"),
    ],
)  # fmt: skip
def test_norm_then_layers_walk_refusals(model: nn.Module, code: str, reason: str) -> None:
    ctx, cands = _setup(model)
    with pytest.raises(Refused) as e:
        NormThenLayers().match(ctx, _only(cands))
    assert (e.value.code, e.value.reason) == (code, reason)


# --- the table --------------------------------------------------------------------------------------


def test_the_table_order_is_the_priority_and_a_missing_rule_is_a_code() -> None:
    """A norm between two layers folds backward (the first direction); without the rule for its
    shape it is kept with ``no_rule``, and adding that one class back folds it."""
    model = Seq(nn.Conv2d(3, 4, 3), _bn(4, 0), nn.Conv2d(4, 2, 1))
    cap = capture(model.eval(), (torch.randn(2, 3, 8, 8),), CaptureOptions(dynamic_batch=False))
    plan = planner.plan(TorchView(cap), cap)
    assert [f.pattern for f in plan.folds] == ["conv-bn"]

    cap = capture(Cat().eval(), (torch.randn(2, 3, 8, 8),), CaptureOptions(dynamic_batch=False))
    without = [r for r in RULES if not isinstance(r, ConcatThenNorm)]
    kept = planner.plan(TorchView(cap), cap, rules=without).kept
    assert [(k.unit.name, k.code) for k in kept] == [("bn", "no_rule")]
    assert planner.plan(TorchView(cap), cap, rules=[*without, ConcatThenNorm()]).kept == []


# --- ConstantWeight -------------------------------------------------------------------------------


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d`` / ``ScaledStdConv2d`` (with ``gain``): the weight standardized per
    output channel in every forward."""

    def __init__(self, c_in: int, c_out: int, *, gain: bool = False) -> None:
        super().__init__(c_in, c_out, 3)
        self.gain = nn.Parameter(torch.rand(c_out) + 0.5) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, weight=self.gain, training=True,
            momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return torch.nn.functional.conv2d(x, w, self.bias)


@pytest.mark.parametrize("gain", [False, True], ids=["std", "scaled_std"])
def test_constant_weight_computes_a_standardized_weight_once(gain: bool) -> None:
    model = Seq(StdConv(3, 6, gain=gain), _bn(6, 7))
    ctx, cands = _setup(model)
    std = next(c for c in cands if c.constant)
    rule = ConstantWeight()
    m = rule.match(ctx, std)
    assert m is not None and rule.check(ctx, m) is None
    fold = rule.plan(ctx, m)
    (u,) = fold.updates
    w = model.body[0].weight.detach().double().reshape(6, -1)
    expected = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-6)
    if gain:
        expected = expected * model.body[0].gain.detach().double()[:, None]
    assert (fold.pattern, u.side, u.weight, fold.unit.input) == ("weight_std", "replace", "body.0.weight",
                                                                 "p_body_0_weight")  # fmt: skip
    torch.testing.assert_close(u.value, expected.reshape(u.value.shape), rtol=1e-9, atol=1e-12)
    # no other rule takes it, and with it the norm after the conv folds too: no batch norm is left
    assert all(r.match(ctx, std) is None for r in RULES if not isinstance(r, ConstantWeight))
    plan = planner.plan(ctx.view, ctx.values)
    assert [f.pattern for f in plan.folds] == ["weight_std", "conv-bn"] and plan.kept == []


def test_constant_weight_is_applied_exactly_in_the_export() -> None:
    import normfold

    model = Seq(StdConv(3, 6, gain=True), _bn(6, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    result = normfold.fold(model, x)
    assert [f.pattern for f in result.folded] == ["weight_std", "conv-bn"]
    ops = {str(n.target) for n in result.program.graph.nodes if n.op == "call_function"}
    assert ops == {"aten.conv2d.default"}
    normfold.verify(model, result, x)  # both artifacts against the original, per element


def test_constant_weight_refuses_a_weight_read_elsewhere() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StdConv(3, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.conv.weight.sum()

    ctx, cands = _setup(Tied())
    std = next(c for c in cands if c.constant)
    m = ConstantWeight().match(ctx, std)
    r = ConstantWeight().check(ctx, m)
    assert r.code == "shared_producer"
    assert r.reason.startswith("parameter conv.weight, which the weight of conv (conv2d) is computed from")
