"""The fold pass: every foldable pattern folds exactly; every unsafe case is skipped with its reason."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import count_bn, randomize_bn, state_bytes
from normfold.models import ZOO, example_inputs
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.errors import TraceError, UsageError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 4)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Pair(nn.Module):
    """A user's own class: producer -> norm -> activation."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.norm = norm

    def forward(self, x):
        return torch.relu(self.norm(self.producer(x)))


def _input(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3).to(dtype)


def _check_folded(model, x, pattern, *, into="producer", norm="norm"):
    """Structure (norm gone, class kept) and numbers (verify passes, fp32 at rounding level)."""
    before = state_bytes(model)
    result = normfold.fold(model, x)
    assert state_bytes(model) == before  # inplace=False never touches the input
    assert [(f.norm, f.into, f.pattern) for f in result.folded] == [(norm, into, pattern)]
    assert result.skipped == []
    assert type(result.model) is type(model)
    assert not result.graph_module
    assert isinstance(result.model.get_submodule(norm), nn.Identity)
    assert count_bn(result.model) == 0
    report = normfold.verify(model, result.model, x)
    assert report.passed, report.failures()
    if x.dtype == torch.float32:
        assert report.max_rel_error <= 1e-5
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", ["1", "2", "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
def test_conv_bn_folds(transpose, dims, groups, bias, affine, dtype):
    c_in, c_out = (6, 6) if groups == "depthwise" else (4, 6)
    g = 6 if groups == "depthwise" else int(groups)
    kwargs = dict(stride=2, padding=1, dilation=2, groups=g, bias=bias)
    if transpose:
        producer = CONV_T[dims](c_in, c_out, 3, output_padding=1, **kwargs)
    else:
        producer = CONV[dims](c_in, c_out, 3, **kwargs)
    model = randomize_bn(Pair(producer, BN[dims](c_out, affine=affine))).to(dtype)
    result = _check_folded(
        model, _input((2, c_in, *SPATIAL[dims]), dtype), "conv_transpose-bn" if transpose else "conv-bn"
    )
    folded = result.model.producer
    assert folded.weight.dtype == folded.bias.dtype == dtype


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes_fold(padding_mode):
    model = randomize_bn(Pair(nn.Conv2d(3, 5, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(5)))
    _check_folded(model, _input((2, 3, 8, 8)), "conv-bn")


def test_conv_same_padding_folds():
    model = randomize_bn(Pair(nn.Conv1d(3, 5, 4, padding="same", bias=False), nn.BatchNorm1d(5)))
    _check_folded(model, _input((2, 3, 9)), "conv-bn")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_bn_folds_on_2d_input(bias, affine, dtype):
    model = randomize_bn(Pair(nn.Linear(7, 5, bias=bias), nn.BatchNorm1d(5, affine=affine))).to(dtype)
    _check_folded(model, _input((4, 7), dtype), "linear-bn")


def test_sync_batchnorm_in_eval_folds():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    _check_folded(model, _input((2, 3, 6, 6)), "conv-bn")


class PlainSubclassBN(nn.BatchNorm2d):
    """A subclass that only renames: matched with isinstance and folded."""


class BNAct(nn.BatchNorm2d):
    """A subclass whose forward adds an activation (as popular model libraries do)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_bn_subclass_with_plain_forward_folds():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), PlainSubclassBN(4)))
    result = _check_folded(model, _input((2, 3, 6, 6)), "conv-bn")
    assert result.folded[0].norm_type == "PlainSubclassBN"


def test_bn_subclass_with_extra_behaviour_is_skipped_not_broken():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), BNAct(4)))
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert result.folded == []
    [skip] = result.skipped
    assert skip.norm == "norm"
    assert skip.norm_type == "BNAct"
    assert re.fullmatch(
        r"norm \(BNAct\) forward does more than the BatchNorm formula \(max abs difference [0-9.e+-]+ "
        r"on a probe input\); left in place to keep that behaviour",
        skip.reason,
    ), skip.reason
    assert torch.equal(result.model(x), model(x))


def test_bn_after_folded_bn_folds_through_it():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert [(f.norm, f.into) for f in result.folded] == [("1", "0"), ("2", "0")]
    report = normfold.verify(model, result.model, x)
    assert report.passed and report.max_rel_error <= 1e-5


def test_aliased_bn_is_replaced_under_every_name():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.alias = model.norm  # same module registered twice, called once
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert len(result.folded) == 1
    assert isinstance(result.model.alias, nn.Identity) and isinstance(result.model.norm, nn.Identity)
    assert normfold.verify(model, result.model, x).passed


def test_missing_conv_bias_becomes_a_parameter_and_state_dict_round_trips():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    folded = normfold.fold(model).model
    assert isinstance(folded.producer.bias, nn.Parameter)
    buf = io.BytesIO()
    torch.save(folded.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"producer.weight", "producer.bias"}
    fresh = normfold.fold(randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), seed=9)).model
    fresh.load_state_dict(state)
    x = _input((2, 3, 6, 6))
    assert torch.equal(fresh(x), folded(x))


def test_inplace_false_leaves_input_byte_identical_and_in_train_mode():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    before = state_bytes(model)
    result = normfold.fold(model, _input((2, 3, 6, 6)))
    assert state_bytes(model) == before
    assert model.training and isinstance(model.norm, nn.BatchNorm2d)
    assert result.model is not model and not result.model.training


def test_inplace_true_folds_the_given_model():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    result = normfold.fold(model, inplace=True)
    assert result.model is model and isinstance(model.norm, nn.Identity)


def test_param_counts_are_reported():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    result = normfold.fold(model)
    assert result.params_before == 3 * 4 * 9 + 8
    assert result.params_after == 3 * 4 * 9 + 4
    assert result.to_dict()["folded"][0] == {
        "norm": "norm",
        "into": "producer",
        "pattern": "conv-bn",
        "norm_type": "BatchNorm2d",
        "into_type": "Conv2d",
    }


# --- negative cases: exact reason, outputs unchanged -------------------------------------------


def _check_skipped(model, x, norm, reason):
    result = normfold.fold(model, x)
    skipped = {s.norm: s.reason for s in result.skipped}
    assert skipped[norm] == reason
    assert norm not in {f.norm for f in result.folded}
    if x is not None:  # nothing else in these models folds: outputs are bit-identical
        got, want = result.model(x), model(x)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    return result


def test_bn_without_running_stats_is_skipped():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    _check_skipped(
        model,
        _input((2, 3, 6, 6)),
        "norm",
        "norm has no running statistics (track_running_stats=False): "
        "it normalizes with batch statistics even in eval mode",
    )


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_producer_with_two_users_is_skipped():
    model = randomize_bn(TwoUsers())
    x = _input((2, 3, 6, 6))
    result = _check_skipped(model, x, "bn", "conv output has 2 users")
    assert torch.equal(result.model(x), model(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.bn(self.conv(x))
        b = self.conv(x * 2)  # the other call site
        return a, b


def test_shared_conv_is_skipped_and_other_call_site_unchanged():
    model = randomize_bn(SharedConv())
    x = _input((2, 3, 6, 6))
    result = _check_skipped(
        model,
        x,
        "bn",
        "conv is called at 2 places (shared weights); folding bn into it would change the other call sites",
    )
    a, b = result.model(x)
    a0, b0 = model(x)
    assert torch.equal(b, b0) and torch.equal(a, a0)
    # The peer torch.fx.experimental.optimization.fuse corrupts exactly this second output.


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


def test_bn_called_twice_is_skipped():
    _check_skipped(
        randomize_bn(SharedBN()),
        _input((2, 3, 6, 6)),
        "bn",
        "bn is called at 2 places; removing it would change all of them",
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "norm.running_var has 1 non-finite value(s)"),
        (float("inf"), "norm.running_var has 1 non-finite value(s)"),
        (-0.5, "norm.running_var + eps is not positive (min running_var -0.5)"),
    ],
)
def test_bad_running_var_is_skipped(value, reason):
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.norm.running_var[2] = value
    result = normfold.fold(model)
    assert [s.reason for s in result.skipped] == [reason]
    assert isinstance(result.model.norm, nn.BatchNorm2d)


def test_channel_mismatch_is_skipped():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)))
    result = normfold.fold(model)  # the model cannot even run; the pass must still not touch it
    assert [s.reason for s in result.skipped] == ["norm has 5 features but producer produces 4 channels"]
    assert isinstance(result.model.norm, nn.BatchNorm2d)


class Tokens(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d(L): BN normalizes L, not the Linear's features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):  # (N, L=16, C=8)
        return self.bn(self.fc(x))


def test_linear_bn_on_sequence_axis_is_skipped():
    model = randomize_bn(Tokens())
    x = _input((2, 16, 8))
    result = _check_skipped(
        model,
        x,
        "bn",
        "bn normalizes axis 1 of the (2, 16, 16) output of fc, but fc's features are on its last axis",
    )
    assert torch.equal(result.model(x), model(x))


def test_linear_bn_without_shapes_is_not_guessed():
    model = randomize_bn(Pair(nn.Linear(7, 5), nn.BatchNorm1d(5)))
    result = _check_skipped(
        model,
        None,
        "norm",
        "cannot tell which axis norm normalizes without activation shapes "
        "(producer acts on the last axis, BatchNorm on axis 1): pass example_inputs",
    )
    assert isinstance(result.model.norm, nn.BatchNorm1d)


def test_unbatched_conv_output_is_skipped():
    model = randomize_bn(Pair(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)))
    x = _input((3, 6))  # unbatched: conv output (4, 4), BatchNorm1d would see N=4, C=4
    _check_skipped(
        model, x, "norm", "producer output (4, 4) is unbatched, so its channels are not on norm's axis 1"
    )


class BNAfterReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


def test_bn_after_relu_is_skipped():
    _check_skipped(
        randomize_bn(BNAfterReLU()),
        _input((2, 3, 6, 6)),
        "bn",
        "input of bn is relu (call function), not a Conv/ConvTranspose/Linear",
    )


def test_bn_on_model_input_is_skipped():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))
    reason = "input of 0 is a model input, not a Conv/ConvTranspose/Linear"
    _check_skipped(model, _input((2, 3, 6, 6)), "0", reason)


class StdConv(nn.Conv2d):
    """Weight-standardized conv: its output is not linear in ``weight``."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


def test_conv_subclass_overriding_forward_is_skipped():
    _check_skipped(
        randomize_bn(Pair(StdConv(3, 4, 3), nn.BatchNorm2d(4))),
        _input((2, 3, 6, 6)),
        "norm",
        "producer (StdConv) overrides forward; its output may not be linear in its weight",
    )


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


def test_producer_weight_read_directly_is_skipped():
    _check_skipped(
        randomize_bn(ReadsWeight()),
        _input((2, 3, 6, 6)),
        "bn",
        "forward reads conv.weight directly, outside the module call",
    )


def test_bn_with_forward_hook_is_skipped():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.norm.register_forward_hook(lambda m, i, o: o * 2)
    _check_skipped(model, _input((2, 3, 6, 6)), "norm", "norm has forward hooks that would be lost")


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.spare = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.gn(self.bn(self.conv(x)))


def test_unused_and_non_batch_norms_are_reported():
    model = randomize_bn(Unused())
    result = normfold.fold(model, _input((2, 3, 6, 6)))
    assert [f.norm for f in result.folded] == ["bn"]
    assert {s.norm: s.reason for s in result.skipped} == {
        "gn": "GroupNorm normalizes with per-sample statistics",
        "spare": "never called in forward (not in the traced graph)",
    }


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_model_raises_trace_error():
    with pytest.raises(TraceError, match=r"^torch.fx could not trace Untraceable: TraceError: "):
        normfold.fold(Untraceable())


def test_wrong_example_input_shape_raises_trace_error():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    message = r"Pair failed on example inputs \[\(2, 5, 6, 6\) float32\]: RuntimeError: "
    with pytest.raises(TraceError, match=message):
        normfold.fold(model, _input((2, 5, 6, 6)))


@pytest.mark.parametrize("bad", ["model.pt", None, 3])
def test_non_module_raises_usage_error(bad):
    with pytest.raises(UsageError, match=r"fold\(\) expects a torch.nn.Module"):
        normfold.fold(bad)


def test_bad_example_inputs_raise_usage_error():
    with pytest.raises(UsageError, match="example_inputs must be a tensor or a tuple of tensors, got dict"):
        normfold.fold(nn.Conv2d(1, 1, 1), {"x": torch.zeros(1)})


# --- the reference zoo ----------------------------------------------------------------------------

MIXED_SKIPS = {
    "bn_shared": "shared is called at 2 places (shared weights); "
    "folding bn_shared into it would change the other call sites",
    "bn_nostats": "bn_nostats has no running statistics (track_running_stats=False): "
    "it normalizes with batch statistics even in eval mode",
    "bn_after_relu": "input of bn_after_relu comes from relu (ReLU), not a Conv/ConvTranspose/Linear",
    "bn_two_users": "conv_two_users output has 2 users",
    "bn_seq": "bn_seq normalizes axis 1 of the (2, 16, 16) output of fc_seq, "
    "but fc_seq's features are on its last axis",
}


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_folds_with_parity(name):
    model = ZOO[name].factory()
    x = example_inputs(name)
    result = normfold.fold(model, x)
    expected_skips = MIXED_SKIPS if name == "mixed" else {}
    assert {s.norm: s.reason for s in result.skipped} == expected_skips
    assert len(result.folded) == count_bn(model) - len(expected_skips) > 0
    # no foldable BN left: the BatchNorms still in the model are exactly the skipped ones
    left = {n for n, m in result.model.named_modules() if isinstance(m, _BatchNorm)}
    assert left == set(expected_skips)
    assert type(result.model) is type(model)
    assert [n for n, _ in result.model.named_modules()] == [n for n, _ in model.named_modules()]
    report = normfold.verify(model, result.model, x)
    assert report.passed, report.failures()
    assert report.max_rel_error <= 1e-5


def test_mixed_shared_conv_second_call_site_is_untouched():
    model = ZOO["mixed"].factory()
    result = normfold.fold(model, example_inputs("mixed"))
    assert torch.equal(result.model.shared.weight, model.shared.weight)
    assert torch.equal(result.model.shared.bias, model.shared.bias)


def test_package_functions_stay_callable_after_submodule_imports():
    import normfold.folding
    import normfold.parity

    assert callable(normfold.fold) and callable(normfold.verify)
