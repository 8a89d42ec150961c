"""fold(): the guarantees of the fold (structure, parity, input untouched, exact skips) on the export engine.

Pattern-by-pattern tests of the planner live in test_plan.py; what lands in the eager module versus
the export only is in test_apply.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ZOO_EXPORT_ONLY,
    ZOO_KEPT,
    ZOO_SHOWS,
    Pair,
    bn_ops,
    count_bn,
    exported,
    randomize_bn,
    state_bytes,
)
from normfold.models import ZOO, example_inputs
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine.rebuild import Remainder
from normfold.errors import TraceError, UsageError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 4)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
    assert [f.where for f in result.folded] == ["both"]
    assert isinstance(result.model.get_submodule(norm), nn.Identity)
    assert count_bn(result.model) == 0
    assert result.replan_folds == 0
    assert bn_ops(result.program) == 0
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
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


def test_bn_subclass_with_activation_folds_and_keeps_the_activation():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), BNAct(4)))
    x = _input((2, 3, 6, 6)) * 3
    result = normfold.fold(model, x)
    [f] = result.folded
    assert (f.norm, f.norm_type, f.into, f.pattern, f.where) == (
        "norm",
        "BNAct",
        "producer",
        "conv-bn",
        "both",
    )
    assert result.skipped == [] and result.replan_folds == 0
    bn = result.model.norm
    # its activation stays, its norm op is gone (normfold.engine.rebuild): it runs what the export runs
    assert isinstance(bn, Remainder) and bn.recipe.original == "BNAct"
    assert [s.op for s in bn.recipe.steps] == ["relu.default"] and not list(bn.state_dict())
    probe = torch.randn(5, 4, 3, 3) * 100
    assert torch.equal(bn(probe), torch.relu(probe))
    assert bn_ops(result.program) == 0
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed and report.max_rel_error <= 1e-5


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
    folded = normfold.fold(model, _input((2, 3, 6, 6))).model
    assert isinstance(folded.producer.bias, nn.Parameter)
    buf = io.BytesIO()
    torch.save(folded.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"producer.weight", "producer.bias"}
    fresh = randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), seed=9)
    fresh = normfold.fold(fresh, _input((2, 3, 6, 6))).model
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
    result = normfold.fold(model, _input((2, 3, 6, 6)), inplace=True)
    assert result.model is model and isinstance(model.norm, nn.Identity)


def test_inplace_true_writes_into_the_models_own_weight_tensors():
    """No second copy of the weights: the folded values land in the tensors the model holds
    (the same Parameter, the same storage), and the program shares them."""
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = _input((2, 3, 6, 6))
    expected = normfold.fold(model, x).model  # a copy, folded the usual way
    weight, bias = model.producer.weight, model.producer.bias
    pointers = (weight.data_ptr(), bias.data_ptr())
    result = normfold.fold(model, x, inplace=True)
    assert model.producer.weight is weight and model.producer.bias is bias
    assert (weight.data_ptr(), bias.data_ptr()) == pointers
    assert torch.equal(weight, expected.producer.weight) and torch.equal(bias, expected.producer.bias)
    assert result.program.state_dict["producer.weight"].data_ptr() == pointers[0]


@pytest.mark.parametrize("inplace", [False, True])
def test_a_tied_weight_gets_the_folded_value_under_every_name(inplace: bool) -> None:
    """A weight registered under two names (tied) and read by one op. torch.export names it by
    the other module (``spare.weight``); the fold used to land there only, leaving the called
    ``producer`` unfolded after its BatchNorm was removed: a wrong model. Both names (one tensor)
    now hold the folded value, and the result matches the original."""
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.spare = nn.Conv2d(3, 4, 3)
    model.spare.weight = model.producer.weight  # tied, never called
    x = _input((2, 3, 6, 6))
    reference = copy.deepcopy(model)
    result = normfold.fold(model, x, inplace=inplace)
    assert result.model.spare.weight is result.model.producer.weight  # still tied
    assert normfold.verify(reference, result.model, x).passed
    assert normfold.verify(reference, exported(result.program), x).passed


def test_param_counts_are_reported():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    result = normfold.fold(model, _input((2, 3, 6, 6)))
    # the weights the program computes with: conv weight + BN weight, bias, mean, var; then + a bias
    assert result.params_before == 3 * 4 * 9 + 4 * 4
    assert result.params_after == 3 * 4 * 9 + 4

    assert result.to_dict()["folded"][0] == {
        "norm": "norm",
        "into": "producer",
        "pattern": "conv-bn",
        "norm_type": "BatchNorm2d",
        "into_type": "Conv2d",
        "where": "both",
        "node": "batch_norm",
        "through": (),
        "note": None,
    }


def test_param_counts_never_grow_where_a_norm_stays_in_the_eager_module():
    """Friction 9 of issue 19: a BN subclass with its activation stays in the eager module as the
    identity (its weights still there) while its conv gains a bias; the count is the program's,
    which the written file holds, so it goes down."""
    from normfold.models import bn_act

    model = bn_act()
    result = normfold.fold(model, example_inputs("bn_act"))
    assert result.folded
    eager = sum(p.numel() for p in result.model.parameters())
    assert result.params_after < result.params_before
    assert result.params_after <= eager  # the eager module may carry more than it computes with


# --- negative cases: exact reason, outputs unchanged -------------------------------------------


def _check_skipped(model, x, norm, code, reason):
    result = normfold.fold(model, x)
    skipped = {s.norm: (s.code, s.reason) for s in result.skipped}
    assert skipped[norm] == (code, reason)
    assert norm not in {f.norm for f in result.folded}
    assert result.replan_folds == 0
    # nothing else in these models folds: outputs are bit-identical, eager and exported
    for candidate in (result.model, exported(result.program)):
        got, want = candidate(x), model(x)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    return result


def test_bn_without_running_stats_is_skipped():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    reason = "norm runs without running statistics: it normalizes with batch statistics"
    _check_skipped(model, _input((2, 3, 6, 6)), "norm", "batch_statistics", reason)


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
    reason = "conv (conv2d) output has 2 users"
    _check_skipped(model, _input((2, 3, 6, 6)), "bn", "multiple_users", reason)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.bn(self.conv(x))
        b = self.conv(x * 2)  # the other call site
        return a, b


SHARED = (
    "conv (conv2d) weight conv.weight is used by 2 ops (a module called at several places, or a tied or "
    "directly read weight); folding bn into it would change the others"
)


def test_shared_conv_is_skipped_and_other_call_site_unchanged():
    model = randomize_bn(SharedConv())
    reason = SHARED
    result = _check_skipped(model, _input((2, 3, 6, 6)), "bn", "shared_producer", reason)
    assert torch.equal(result.model.conv.weight, model.conv.weight)
    # The peer torch.fx.experimental.optimization.fuse corrupts exactly the second output.


class DeadCall(nn.Module):
    """The conv is called a second time for nothing: that call is dead code, no user."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        self.conv(h)  # result unused
        return self.bn(h)


def test_a_call_whose_result_is_unused_blocks_no_fold():
    """It used to count as a second user (kept as multiple_users) while the folded program, without
    the dead call, had the fold to offer again (replan_folds != 0; found by the differential fuzzer)."""
    _check_folded(randomize_bn(DeadCall()), _input((2, 4, 6, 6)), "conv-bn", into="conv", norm="bn")


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


def test_bn_called_twice_folds_into_both_producers():
    model = randomize_bn(SharedBN())
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert [(f.norm, f.into, f.node, f.where) for f in result.folded] == [
        ("bn", "c1", "batch_norm", "both"),
        ("bn", "c2", "batch_norm_1", "both"),
    ]
    assert isinstance(result.model.bn, nn.Identity)
    assert normfold.verify(model, result.model, x).max_rel_error <= 1e-5


class SharedBNHalf(SharedBN):
    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(torch.relu(self.c2(x)))


def test_bn_called_twice_with_one_call_unfoldable_stays_in_the_eager_model():
    model = randomize_bn(SharedBNHalf())
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    [f] = result.folded
    assert (f.norm, f.into, f.where) == ("bn", "c1", "export")
    assert f.note == "folded in the export only: bn is also called where it stays"
    assert [(s.norm, s.code) for s in result.skipped] == [("bn", "after_activation")]
    assert torch.equal(result.model(x), model(x))  # eager: untouched, conv c1 included
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5
    assert bn_ops(result.program) == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "norm.running_var has 1 non-finite value(s)"),
        (float("inf"), "norm.running_var has 1 non-finite value(s)"),
        (-0.5, "norm.running_var + eps is not positive (min -0.5)"),
    ],
)
def test_bad_running_var_is_skipped(value, reason):
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.norm.running_var[2] = value
    result = normfold.fold(model, _input((2, 3, 6, 6)))
    assert [(s.code, s.reason) for s in result.skipped] == [("bad_statistics", reason)]
    assert isinstance(result.model.norm, nn.BatchNorm2d)
    assert torch.equal(result.model.producer.weight, model.producer.weight)


def test_channel_mismatch_cannot_be_captured():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)))
    with pytest.raises(TraceError, match=r"^torch.export could not capture Pair on example inputs"):
        normfold.fold(model, _input((2, 3, 6, 6)))


class Tokens(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d(L): BN normalizes L, not the Linear's features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):  # (N, L=16, C=8)
        return self.bn(self.fc(x))


def test_linear_bn_on_sequence_axis_is_skipped():
    reason = "bn normalizes axis 1 of the (2, 16, 16) output of fc (linear), whose channels are on axis 2"
    _check_skipped(randomize_bn(Tokens()), _input((2, 16, 8)), "bn", "wrong_axis", reason)


def test_one_channel_bn_after_linear_on_tokens_folds():
    """``Linear(5, 7)`` on ``(N, 1, 5)`` -> ``BatchNorm1d(1)``: one channel is a scalar map, exact
    on every feature (it used to be kept as wrong_axis). The weights are seeded: with the one
    channel's mean drawn above every output, Pair's ReLU would zero the whole output, which
    verify rightly refuses to judge."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = randomize_bn(Pair(nn.Linear(5, 7), nn.BatchNorm1d(1)))
    with torch.no_grad():
        model.norm.running_mean.fill_(-0.4)  # below most of the Linear's outputs
    _check_folded(model, _input((4, 1, 5)), "linear-bn")


def test_one_channel_bn_before_linear_on_tokens_folds_forward():
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(1), nn.Linear(5, 7)))
    _check_folded(model, _input((4, 1, 5)), "bn-linear", into="2", norm="1")


def test_unbatched_conv_output_is_skipped():
    model = randomize_bn(Pair(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)))
    x = _input((3, 6))  # unbatched: conv output (4, 4), BatchNorm1d would see N=4, C=4
    reason = "norm normalizes axis 1 of the (4, 4) output of producer (conv1d), whose channels are on axis 0"
    _check_skipped(model, x, "norm", "wrong_axis", reason)


class BNAfterReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


def test_bn_after_relu_is_skipped():
    reason = "input of bn comes from relu (forward), not a Conv/ConvTranspose/Linear"
    _check_skipped(randomize_bn(BNAfterReLU()), _input((2, 3, 6, 6)), "bn", "after_activation", reason)


def test_bn_on_model_input_before_padded_conv_is_skipped():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    reason = (
        "input of 0 is model input input, not a Conv/ConvTranspose/Linear output; as a forward fold: "
        "0 feeds 1 (conv2d), whose zero padding would see 0 instead of the norm's shift at the borders"
    )
    _check_skipped(model, _input((2, 3, 6, 6)), "0", "zero_padding_forward", reason)


class StdConv(nn.Conv2d):
    """Weight-standardized conv: its output is not linear in ``weight``."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


def test_conv_subclass_computing_its_weight_is_skipped():
    reason = (
        "producer (conv2d) weight is computed in forward (producer (div)), not a parameter; "
        "its output may not be linear in it"
    )
    model = randomize_bn(Pair(StdConv(3, 4, 3), nn.BatchNorm2d(4)))
    _check_skipped(model, _input((2, 3, 6, 6)), "norm", "weight_not_parameter", reason)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


def test_producer_weight_read_directly_is_skipped():
    model = randomize_bn(ReadsWeight())
    reason = SHARED.replace("3, 3, 3", "3")
    _check_skipped(model, _input((2, 3, 6, 6)), "bn", "shared_producer", reason)


def test_bn_with_forward_hook_folds_in_the_export_only():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.norm.register_forward_hook(lambda m, i, o: o * 2)
    x = _input((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert {(f.norm, f.where, f.note) for f in result.folded} == {
        ("norm", "export", "folded in the export only: norm has forward hooks that would be lost"),
        ("norm:mul", "export", "folded in the export only: norm has forward hooks that would be lost"),
    }
    assert torch.equal(result.model(x), model(x))  # the eager model keeps norm, hook and conv
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5


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
    assert {s.norm: (s.code, s.reason) for s in result.skipped} == {
        "gn": ("per_sample_statistics", "GroupNorm normalizes with per-sample statistics"),
        "spare": ("unused", "never called in forward (not in the captured graph)"),
    }


class ShapeDependent(nn.Module):
    """Python on input shapes in forward: torch.fx symbolic_trace fails, torch.export does not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        pad = 1 if x.shape[-1] % 2 else 0  # Python control flow on a shape
        return self.bn(self.conv(F.pad(x, (pad, pad, pad, pad))))


def test_shape_dependent_forward_folds():
    model = randomize_bn(ShapeDependent())
    with pytest.raises(torch.fx.proxy.TraceError):  # what the old fx engine failed on
        torch.fx.symbolic_trace(model)
    _check_folded(model, _input((2, 3, 7, 7)), "conv-bn", into="conv", norm="bn")


class Gate(nn.Module):
    """A block whose forward branches on data: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.inner(x) if x.mean() > -100 else x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.gate = Gate()
        self.reused = nn.Conv2d(4, 4, 1)
        self.block = nn.Sequential(self.reused, nn.BatchNorm2d(4))  # conv also called outside block

    def forward(self, x):
        x = self.gate(self.stem(x))
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.block(x) + self.reused(x)


def test_model_that_cannot_be_captured_is_folded_in_its_largest_captured_parts():
    model = randomize_bn(Untraceable())
    x = _input((2, 3, 8, 8))
    result = normfold.fold(model, x)
    assert result.program is None
    assert [(u.module, u.code) for u in result.uncaptured] == [
        ("Untraceable", "not_captured"),
        ("gate", "not_captured"),
        ("block", "called_outside"),
    ]
    assert all(isinstance(u, normfold.Kept) and u.subject == u.module for u in result.uncaptured)
    assert result.uncaptured[0].reason.startswith("torch.export could not capture Untraceable")
    assert result.uncaptured[2].reason == "block.0 is also called from outside block"
    assert [(f.norm, f.into, f.pattern) for f in result.folded] == [
        ("stem.1", "stem.0", "conv-bn"),
        ("gate.inner.1", "gate.inner.0", "conv-bn"),
    ]
    assert isinstance(result.model.block[1], nn.BatchNorm2d)  # the shared conv is left alone
    assert torch.equal(result.model.reused.weight, model.reused.weight)
    report = normfold.verify(model, result.model, x)
    assert report.passed and report.max_rel_error <= 1e-5


def test_wrong_example_input_shape_raises_trace_error():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    message = r"could not capture Pair on example inputs \[\(2, 5, 6, 6\) float32\]: RuntimeError: "
    with pytest.raises(TraceError, match=message):
        normfold.fold(model, _input((2, 5, 6, 6)))


@pytest.mark.parametrize("bad", ["model.pt", None, 3])
def test_non_module_raises_usage_error(bad):
    with pytest.raises(UsageError, match=r"fold\(\) expects a torch.nn.Module"):
        normfold.fold(bad, _input((2, 3)))


def test_missing_example_inputs_raise_usage_error():
    with pytest.raises(UsageError, match="fold\\(\\) needs example_inputs"):
        normfold.fold(nn.Conv2d(1, 1, 1), None)


def test_bad_example_inputs_raise_usage_error():
    with pytest.raises(UsageError, match="example_inputs must be a tensor or a tuple of tensors, got dict"):
        normfold.fold(nn.Conv2d(1, 1, 1), {"x": torch.zeros(1)})


# --- the reference zoo ----------------------------------------------------------------------------


def _neutral(bn: nn.Module) -> bool:
    return bn.eps == 0 and bool((bn.running_var == 1).all() and (bn.running_mean == 0).all())


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_folds_with_parity(name):
    model = ZOO[name].factory()
    x = example_inputs(name)
    result = normfold.fold(model, x, reparameterize=False)  # the merges: tests/engine/test_reparam.py
    kept = ZOO_KEPT.get(name, {})
    assert {s.norm: s.code for s in result.skipped} == kept
    assert {f.norm for f in result.folded if f.where == "export"} == ZOO_EXPORT_ONLY.get(name, set())
    folded = {(f.norm, f.pattern, f.through) for f in result.folded}
    assert set(ZOO_SHOWS.get(name, [])) <= folded
    assert result.replan_folds == 0
    assert bn_ops(result.program) == len(kept)
    # BatchNorm modules left in the eager model: kept, folded in the export only, or exactly the identity
    left = {n for n, m in result.model.named_modules() if isinstance(m, _BatchNorm) and not _neutral(m)}
    assert left == set(kept) | (ZOO_EXPORT_ONLY.get(name, set()) & {n for n, _ in model.named_modules()})
    assert type(result.model) is type(model)
    names, before = [n for n, _ in result.model.named_modules()], [n for n, _ in model.named_modules()]
    assert names == [n for n in before if n in names]  # module names kept, in order
    norms = {f.norm for f in result.folded}
    assert all(n.rpartition(".")[0] in norms for n in set(before) - set(names))  # children of removed norms
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()
        assert report.max_rel_error <= 5e-6  # far inside the rule (0..255 inputs included)


def test_mixed_shared_conv_second_call_site_is_untouched():
    model = ZOO["mixed"].factory()
    result = normfold.fold(model, example_inputs("mixed"))
    assert torch.equal(result.model.shared.weight, model.shared.weight)
    assert torch.equal(result.program.state_dict["shared.weight"], model.shared.weight)
    assert torch.equal(result.model.shared.bias, model.shared.bias)


def test_package_functions_stay_callable_after_submodule_imports():
    import normfold.check.parity
    import normfold.folding

    assert callable(normfold.fold) and callable(normfold.verify)


def test_recalibrate_stays_callable_after_its_submodule_import():
    import normfold.transforms.calibration

    assert callable(normfold.recalibrate)


class InPlaceBlock(nn.Module):
    """A forward that modifies its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return self.bn(self.conv(x))


class InPlaceUncapturable(nn.Module):
    """Its data-dependent branch makes torch.export fail, so fold runs the model eagerly to
    capture its parts: on the caller's own tensor, before the fix."""

    def __init__(self) -> None:
        super().__init__()
        self.block = InPlaceBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y * 2 if y.sum() > 0 else y


@pytest.mark.parametrize("model_type", [InPlaceBlock, InPlaceUncapturable])
def test_fold_never_modifies_the_callers_inputs(model_type: type[nn.Module]) -> None:
    model = randomize_bn(model_type()).eval()
    x = torch.rand(2, 3, 8, 8)
    before = x.clone()
    result = normfold.fold(model, x)
    assert torch.equal(x, before)
    assert [f.norm.rpartition(".")[2] for f in result.folded] == ["bn"]


def test_meta_and_lazy_models_are_usage_errors() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UsageError, match=r"^0.weight is on the meta device \(it has no values to fold\)"):
        normfold.fold(meta, torch.randn(1, 3, 8, 8))
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UsageError, match=r"^0.weight is not initialized yet \(a lazy module\)"):
        normfold.fold(lazy, torch.randn(1, 3, 8, 8))


def test_a_model_in_training_mode_is_folded_in_eval_mode_with_a_note() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 8, 8)
    result = normfold.fold(model, x)
    assert [f.norm for f in result.folded] == ["1"]
    assert result.notes == [
        "the model was in training mode: it was folded as in eval mode (BatchNorm with its running "
        "statistics); the returned model is in eval mode"
    ]
    assert model.training  # the caller's model is not switched
    assert normfold.verify(model.eval(), result.model, x).passed


@pytest.mark.parametrize("transform", ["recalibrate", "drop_redundant_biases"])
def test_meta_models_are_usage_errors_for_every_transform(transform: str) -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UsageError, match=r"^0.weight is on the meta device \(it has no values to fold\)"):
        if transform == "recalibrate":
            normfold.recalibrate(meta, [x])
        else:
            normfold.drop_redundant_biases(meta, x)
