"""drop_redundant_biases(): a layer bias that feeds a BatchNorm is removed, the norm's running mean
absorbs it (``running_mean - bias``), and the model is unchanged in eval and in train mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import Pair, randomize_bn, state_bytes
from torch import nn

from normfold.engine.capture import CaptureOptions, capture
from normfold.engine.plan import plan
from normfold.errors import UsageError
from normfold.transforms.bias import BiasResult, DroppedBias, KeptBias, drop_redundant_biases

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (6, 5), 3: (4, 4, 3)}


def _input(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def _big_bias(module: nn.Module, seed: int = 1) -> nn.Module:
    """Biases far from the default init, so a wrong sign or a forgotten shift cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *CONV_T.values())):
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 3 + 1)
    return module


def _pair_cases():
    cases = []
    for d in (1, 2, 3):
        for groups in (1, 2):
            cases.append(
                pytest.param(
                    CONV[d](4, 6, 3, padding=1, groups=groups), BN[d](6), d, id=f"conv{d}d-g{groups}"
                )
            )
            cases.append(
                pytest.param(
                    CONV_T[d](4, 6, 3, stride=2, groups=groups),
                    BN[d](6),
                    d,
                    id=f"conv_transpose{d}d-g{groups}",
                )
            )
    cases.append(pytest.param(nn.Linear(4, 6), nn.BatchNorm1d(6), 0, id="linear"))
    return cases


def _shape(d: int) -> tuple[int, ...]:
    return (5, 4, *SPATIAL[d]) if d else (5, 4)


def _train_step(model: nn.Module, x: torch.Tensor, grad_out_seed: int = 3):
    """One train-mode forward/backward: output, input gradient, parameter gradients by name."""
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize(("producer", "norm", "d"), _pair_cases())
def test_exact_in_eval_and_train_mode(producer, norm, d):
    model = _big_bias(randomize_bn(Pair(producer, norm)))
    x = _input(_shape(d))
    bias = model.producer.bias.detach().clone()
    result = drop_redundant_biases(model, x)
    new = result.model
    assert result.dropped == [DroppedBias(layer="producer", norm="norm", params=6)]
    assert result.kept == []
    assert new.producer.bias is None and "bias" in new.producer._parameters
    # the sign: the norm now sees y instead of y + b, so its mean is the old one minus b
    torch.testing.assert_close(new.norm.running_mean, model.norm.running_mean - bias, rtol=0, atol=1e-6)
    assert torch.equal(new.norm.running_var, model.norm.running_var)

    # eval mode: same outputs
    with torch.no_grad():
        ref, got = model.eval()(x), new.eval()(x)
    err = (ref - got).abs().max().item()
    print(f"eval max abs error {err:.3g} (max |ref| {ref.abs().max().item():.3g})")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), err

    # train mode: same outputs, input and weight gradients (copies: a train forward updates stats)
    old_t, new_t = copy.deepcopy(model), copy.deepcopy(new)
    out_old, gx_old, g_old = _train_step(old_t, x)
    out_new, gx_new, g_new = _train_step(new_t, x)
    err = (out_old - out_new).abs().max().item()
    print(f"train max abs error {err:.3g}, input grad {(gx_old - gx_new).abs().max().item():.3g}")
    assert torch.allclose(out_new, out_old, rtol=1e-5, atol=1e-5), err
    assert torch.allclose(gx_new, gx_old, rtol=1e-4, atol=1e-5)
    for name, g in g_new.items():
        assert torch.allclose(g, g_old[name], rtol=1e-4, atol=1e-4), name
    # the dropped bias had no train-mode gradient anyway (the batch mean cancels it)
    assert g_old["producer.bias"].abs().max() < 1e-4 * max(1.0, g_old["producer.weight"].abs().max())
    # running statistics after the step: the invariant new = old - bias holds
    torch.testing.assert_close(new_t.norm.running_mean, old_t.norm.running_mean - bias, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_t.norm.running_var, old_t.norm.running_var, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_t.norm.num_batches_tracked, old_t.norm.num_batches_tracked)
    # and the models still agree in eval mode after it
    with torch.no_grad():
        torch.testing.assert_close(new_t.eval()(x), old_t.eval()(x), rtol=1e-5, atol=1e-5)


def test_cumulative_average_and_several_steps():
    """momentum=None (cumulative average): the running mean invariant holds step after step."""
    model = _big_bias(randomize_bn(Pair(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=None))))
    model.norm.num_batches_tracked.fill_(4)
    bias = model.producer.bias.detach().clone()
    new = drop_redundant_biases(model, _input((4, 3, 8, 8))).model
    old = copy.deepcopy(model).train()
    new.train()
    with torch.no_grad():
        for step in range(3):
            x = _input((4, 3, 8, 8), seed=10 + step)
            torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.norm.running_mean, old.norm.running_mean - bias, rtol=0, atol=1e-5)
    torch.testing.assert_close(new.norm.running_var, old.norm.running_var, rtol=1e-5, atol=1e-5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.res = nn.Conv2d(8, 8, 1)
        self.bn_res = nn.BatchNorm2d(8)
        self.plain = nn.Conv2d(8, 8, 1)
        self.bn_nostats = nn.BatchNorm2d(8, track_running_stats=False)
        self.nobias = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_nobias = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.bn_stem(self.stem(x)))
        x = torch.relu(self.bn_a(self.shared(x))) + torch.relu(self.bn_b(self.shared(x)))
        y = self.res(x)
        x = torch.relu(self.bn_res(y) + y)
        x = torch.relu(self.bn_nostats(self.plain(x)))
        x = torch.relu(self.bn_nobias(self.nobias(x)))
        return self.bn_fc(self.fc(x.mean((2, 3))))


SHARED_REASON = (
    "shared (conv2d) weight shared.weight is used by 2 ops (a module called at several places, or a tied "
    "or directly read weight); folding {bn} into it would change the others"
)


def _net():
    return _big_bias(randomize_bn(Net()))


def test_skips_with_the_engines_codes_and_reasons():
    model = _net()
    x = _input((2, 3, 8, 8))
    result = drop_redundant_biases(model, x)
    assert result.dropped == [
        DroppedBias(layer="stem", norm="bn_stem", params=8),
        DroppedBias(layer="fc", norm="bn_fc", params=4),
    ]
    assert result.kept == [
        KeptBias("shared", "bn_a", "shared_producer", SHARED_REASON.format(bn="bn_a")),
        KeptBias("shared", "bn_b", "shared_producer", SHARED_REASON.format(bn="bn_b")),
        KeptBias("res", "bn_res", "multiple_users", "res (conv2d) output has 2 users"),
        KeptBias(
            "plain",
            "bn_nostats",
            "batch_statistics",
            "bn_nostats runs without running statistics: it normalizes with batch statistics",
        ),
        KeptBias("nobias", "bn_nobias", "no_bias", "nobias has no bias to drop"),
    ]
    # the same codes and reasons the fold planner gives for these norms
    the_plan = plan(capture(copy.deepcopy(model).eval(), (x,), CaptureOptions(dynamic_batch=False)))
    engine = {k.unit.name: (k.code, k.reason) for k in the_plan.kept}
    for k in result.kept:
        if k.norm in engine:
            assert (k.code, k.reason) == engine[k.norm]
    assert set(engine) == {"bn_a", "bn_b", "bn_res", "bn_nostats"}

    # params saved, class and names kept, kept layers untouched, outputs unchanged
    assert result.params_before - result.params_after == result.params_saved == 12
    assert type(result.model) is Net
    assert set(dict(result.model.named_modules())) == set(dict(model.named_modules()))
    assert set(model.state_dict()) - set(result.model.state_dict()) == {"stem.bias", "fc.bias"}
    for name in ("shared", "res", "plain"):
        assert torch.equal(getattr(result.model, name).bias, getattr(model, name).bias)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert result.to_dict() == {
        "model_type": "Net",
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_saved": 12,
        "dropped": [
            {"layer": "stem", "norm": "bn_stem", "params": 8},
            {"layer": "fc", "norm": "bn_fc", "params": 4},
        ],
        "kept": [{"layer": k.layer, "norm": k.norm, "code": k.code, "reason": k.reason} for k in result.kept],
    }


def test_input_untouched_and_modes_restored():
    model = _net().train()
    model.bn_stem.eval()  # a frozen norm inside a training model keeps its own mode
    before = state_bytes(model)
    modes = {n: m.training for n, m in model.named_modules()}
    result = drop_redundant_biases(model, _input((2, 3, 8, 8)))
    assert state_bytes(model) == before
    assert model.stem.bias is not None and model.fc.bias is not None
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.training for n, m in result.model.named_modules()} == modes
    assert result.model is not model
    assert result.model.bn_stem.running_mean.data_ptr() != model.bn_stem.running_mean.data_ptr()


def test_inplace():
    model = _net().train()
    mean = model.bn_stem.running_mean
    result = drop_redundant_biases(model, (_input((2, 3, 8, 8)),), inplace=True)
    assert result.model is model and model.training
    assert model.stem.bias is None and model.fc.bias is None
    assert result.model.bn_stem.running_mean is not mean  # a new tensor, not an in-place write


def test_idempotent():
    model = _net()
    x = _input((2, 3, 8, 8))
    once = drop_redundant_biases(model, x)
    twice = drop_redundant_biases(once.model, x)
    assert twice.dropped == [] and twice.params_saved == 0
    assert {k.norm: k.code for k in twice.kept}["bn_stem"] == "no_bias"


class NoStatsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, affine=False, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_norm_without_running_stats_is_kept():
    result = drop_redundant_biases(NoStatsOnly(), _input((2, 3, 6, 6)))
    assert result.dropped == []
    assert result.kept == [
        KeptBias(
            "conv",
            "bn",
            "batch_statistics",
            "bn runs without running statistics: it normalizes with batch statistics",
        )
    ]
    assert result.model.conv.bias is not None


class Special(nn.Module):
    """Norms the engine folds but whose bias cannot be dropped here, each for its own reason."""

    def __init__(self) -> None:
        super().__init__()
        self.c_pool = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_pool = nn.BatchNorm2d(6)
        self.c_fn = nn.Conv2d(6, 6, 1)
        self.bn_fn = nn.BatchNorm2d(6)
        self.c_twice = nn.Conv2d(6, 6, 1)
        self.bn_twice = nn.BatchNorm2d(6)
        self.bn_fwd = nn.BatchNorm2d(6)
        self.c_fwd = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        x = torch.relu(self.bn_pool(F.max_pool2d(self.c_pool(x), 2)))
        bn = self.bn_fn
        x = torch.relu(F.batch_norm(self.c_fn(x), bn.running_mean, bn.running_var, bn.weight, bn.bias))
        x = torch.relu(self.bn_twice(self.bn_twice(self.c_twice(x))))
        return self.c_fwd(self.bn_fwd(x))


def test_folds_that_are_not_candidates():
    model = _big_bias(randomize_bn(Special()))
    x = _input((2, 3, 8, 8))
    result = drop_redundant_biases(model, x)
    assert result.dropped == []
    assert [(k.layer, k.norm, k.code) for k in result.kept] == [
        ("c_pool", "bn_pool", "through_ops"),
        ("c_fn", "bn_fn", "export_only"),
        ("c_twice", "bn_twice", "shared_norm"),
        ("c_twice", "bn_twice", "after_norm"),
        (None, "bn_fwd", "forward_fold"),
    ]
    reasons = {(k.norm, k.code): k.reason for k in result.kept}
    assert reasons["bn_pool", "through_ops"].startswith("ops between the layer and the norm (max_pool2d")
    assert (
        reasons["bn_fn", "export_only"] == "the norm is a functional call in forward code, not a norm module"
    )
    assert reasons["bn_twice", "shared_norm"].startswith("bn_twice is called 2 times")
    assert reasons["bn_fwd", "forward_fold"] == (
        "bn_fwd reads relu (forward), not a layer output used only there "
        "(it folds forward into c_fwd, bn-conv)"
    )
    assert state_bytes(result.model) == state_bytes(model)


class ReLUBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with a built-in activation (the engine neutralizes its norm part)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class CheckedConv(nn.Conv2d):
    """A subclass with its own forward that needs its bias."""

    def forward(self, x):
        if self.bias.shape[0] != self.out_channels:  # fails on bias=None
            raise ValueError("bad bias")
        return super().forward(x)


class WrappedConv(nn.Conv2d):
    """A subclass with its own forward that runs fine without a bias."""

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("4-d input expected")
        return super().forward(x)


class Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = ReLUBatchNorm(6)
        self.checked = CheckedConv(6, 6, 1)
        self.bn_checked = nn.BatchNorm2d(6)
        self.wrapped = WrappedConv(6, 6, 1)
        self.bn_wrapped = nn.BatchNorm2d(6)
        self.fn = nn.Conv2d(6, 6, 1)
        self.bn_fn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn_checked(self.checked(self.bn(self.conv(x)))))
        x = torch.relu(self.bn_wrapped(self.wrapped(x)))
        return self.bn_fn(F.conv2d(x, self.fn.weight, self.fn.bias))  # the layer is code in forward


def test_subclasses():
    model = _big_bias(randomize_bn(Subclasses()))
    x = _input((3, 3, 8, 8))
    result = drop_redundant_biases(model, x)
    assert [(d.layer, d.norm) for d in result.dropped] == [("conv", "bn"), ("wrapped", "bn_wrapped")]
    assert result.kept == [
        KeptBias(
            "checked",
            "bn_checked",
            "custom_forward",
            "checked (CheckedConv) has its own forward, which does not run unchanged with bias=None",
        ),
        KeptBias(
            "fn",
            "bn_fn",
            "not_layer_module",
            "the conv op conv2d_3 runs in the model's forward, not as a Conv/ConvTranspose/Linear module "
            "reading its own bias (fn.bias)",
        ),
    ]
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    old, new = copy.deepcopy(model).train(), copy.deepcopy(result.model).train()
    torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)


def test_probing_a_subclass_leaves_the_global_rng_alone():
    model = _big_bias(randomize_bn(Subclasses()))
    x = _input((3, 3, 8, 8))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    result = drop_redundant_biases(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert [d.layer for d in result.dropped] == ["conv", "wrapped"]  # the probes ran


def test_usage_errors():
    with pytest.raises(UsageError):
        drop_redundant_biases("not a module", torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        drop_redundant_biases(NoStatsOnly(), None)  # type: ignore[arg-type]
    assert isinstance(drop_redundant_biases(NoStatsOnly(), [_input((2, 3, 6, 6))]), BiasResult)


class FunctionalBN(nn.Module):
    """A norm module of the user's own, not a torch BatchNorm: its train-mode behaviour is its own."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)


def test_norm_that_is_not_a_torch_batchnorm_is_kept():
    model = Pair(nn.Conv2d(3, 4, 3), FunctionalBN(4))
    result = drop_redundant_biases(model, _input((2, 3, 6, 6)))
    assert result.dropped == []
    assert result.kept == [
        KeptBias(
            "producer",
            "norm",
            "not_batchnorm",
            "norm (FunctionalBN) is not a torch BatchNorm module: its train-mode behaviour is unknown",
        )
    ]
