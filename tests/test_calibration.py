"""recalibrate(): exact eval-mode statistics of what each batch-norm op normalizes, in dependency
order, in as few passes as exact; non-exact norms left unchanged with a code; bad data refused
before anything changes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, state_bytes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from normfold.calibration import NotRecalibrated, recalibrate
from normfold.cli.app import app
from normfold.errors import TraceError, UsageError


def _batches(n=4, shape=(8, 3, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 1.7 + 0.4 for _ in range(n)]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _stats(xs):
    """Independent float64 population statistics over batch and positions, per channel (axis 1)."""
    flat = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)
    return flat.mean(1), flat.var(1, unbiased=False)


def _assert_stats(bn, mean, var):
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)


def _with_stats(bn, mean, var):
    """A copy of ``bn`` holding the given statistics (the independent computation's norm)."""
    import copy

    new = copy.deepcopy(bn).eval()
    new.running_mean, new.running_var = mean.float(), var.float()
    return new


def test_statistics_are_the_exact_eval_mode_statistics_in_order():
    model = randomize_bn(Chain())
    batches = _batches()
    result = recalibrate(model, batches)
    new = result.model
    with torch.no_grad():  # independent computation: bn1 first, then bn2 sees the recalibrated bn1
        y1 = [model.conv1(x) for x in batches]
        m1, v1 = _stats(y1)
        bn1 = _with_stats(model.bn1, m1, v1)
        m2, v2 = _stats([model.conv2(torch.relu(bn1(y))) for y in y1])
    _assert_stats(new.bn1, m1, v1)
    _assert_stats(new.bn2, m2, v2)
    assert [(r.norm, r.level, r.values) for r in result.norms] == [
        ("bn1", 1, 4 * 8 * 16),
        ("bn2", 2, 4 * 8 * 4),
    ]
    assert result.passes == 2 and result.skipped == {}


def test_everything_but_the_statistics_is_bit_identical_and_the_input_untouched():
    model = randomize_bn(Chain()).train()
    before = state_bytes(model)
    result = recalibrate(model, _batches())
    after = state_bytes(result.model)
    assert state_bytes(model) == before and model.training  # inplace=False
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"}
    assert result.model.training  # modes restored


def test_stale_statistics_show_as_drift_and_a_second_pass_has_none():
    model = randomize_bn(Chain())
    first = recalibrate(model, _batches())
    assert max(r.mean_drift for r in first.norms) > 0.1
    second = recalibrate(first.model, _batches())
    assert max(r.mean_drift for r in second.norms) < 1e-5
    assert max(r.std_drift for r in second.norms) < 1e-5


class Branches(nn.Module):
    """Two independent conv-bn branches, then a norm after their sum: two levels, two passes."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_sum = nn.BatchNorm2d(4)
        self.nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.nostats(self.bn_sum(self.bn_a(self.a(x)) + self.bn_b(self.b(y))))


def test_independent_norms_share_a_pass_and_several_inputs_and_dataloaders_work():
    xs, ys = _batches(seed=1), _batches(seed=2)
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)
    result = recalibrate(randomize_bn(Branches()), loader)
    assert result.passes == 2
    assert {r.norm: r.level for r in result.norms} == {"bn_a": 1, "bn_b": 1, "bn_sum": 2}
    assert result.skipped == {
        "nostats": NotRecalibrated(
            "nostats", "batch_statistics", "no running statistics (track_running_stats=False)"
        ),
        "unused": NotRecalibrated("unused", "unused", "no batch-norm op ran with its statistics on the data"),
    }
    assert result.to_dict()["skipped"][1] == {
        "norm": "unused",
        "code": "unused",
        "reason": "no batch-norm op ran with its statistics on the data",
    }
    with torch.no_grad():
        m, v = _stats([result.model.a(x) for x in xs])
    _assert_stats(result.model.bn_a, m, v)


def test_a_generator_of_batches_is_read_once_and_reused():
    result = recalibrate(randomize_bn(Chain()), (x for x in _batches()))
    assert result.passes == 2 and [r.values for r in result.norms] == [4 * 8 * 16, 4 * 8 * 4]


def test_no_batches_is_a_usage_error():
    with pytest.raises(UsageError, match="needs at least one batch"):
        recalibrate(Chain(), [])


# ------------------------------------------------------------------------------------------------
# what the op normalizes, not the module's input


class Scaled(nn.BatchNorm2d):
    """A subclass that transforms its input before the op: its op normalizes 3x."""

    def forward(self, x):
        return super().forward(x * 3.0)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3), Scaled(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_a_subclass_that_scales_its_input_gets_the_statistics_of_the_op_input():
    model = randomize_bn(ScaledNet())
    batches = _batches()
    result = recalibrate(model, batches)
    with torch.no_grad():
        y1 = [model.conv1(x) for x in batches]
        m1, v1 = _stats([3.0 * y for y in y1])  # what the op normalizes, 9x the module input's var
        bn1 = _with_stats(model.bn1, m1, v1)
        m2, v2 = _stats([model.conv2(torch.relu(bn1(y))) for y in y1])
    _assert_stats(result.model.bn1, m1, v1)
    _assert_stats(result.model.bn2, m2, v2)
    assert [(r.norm, r.level) for r in result.norms] == [("bn1", 1), ("bn2", 2)]
    second = recalibrate(result.model, batches)  # a fixed point: a second pass moves nothing
    assert max(max(r.mean_drift, r.std_drift) for r in second.norms) < 1e-5


class ChannelsLast(nn.BatchNorm1d):
    """A channels-last BatchNorm1d: ``(N, L, C)`` in and out, the op normalizes ``(N, C, L)``."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(5, 6), ChannelsLast(6)

    def forward(self, x):
        return self.norm(self.proj(x))


def test_a_channels_last_bn1d_gets_statistics_along_its_op_channel_axis():
    model = randomize_bn(Tokens())
    batches = _batches(shape=(8, 7, 5))  # L = 7 tokens, 5 features: the module input's axis 1 is L
    result = recalibrate(model, batches)
    with torch.no_grad():
        m, v = _stats([model.proj(x).transpose(1, 2) for x in batches])
    assert result.model.norm.running_mean.shape == (6,)
    _assert_stats(result.model.norm, m, v)
    assert [(r.norm, r.level, r.values) for r in result.norms] == [("norm", 1, 4 * 8 * 7)]
    with torch.no_grad():  # and the recalibrated model runs
        assert result.model(batches[0]).shape == (8, 7, 6)


class FunctionalNorm(nn.Module):
    """A hand-written module whose forward calls F.batch_norm with its own buffers."""

    def __init__(self, c):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("rm", torch.randn(c, generator=g) + 0.7)
        self.register_buffer("rv", torch.rand(c, generator=g) * 2 + 0.3)
        self.w = nn.Parameter(torch.rand(c, generator=g) + 0.5)
        self.b = nn.Parameter(torch.randn(c, generator=g) * 0.3)

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-3)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.fn = nn.Conv2d(3, 5, 3), FunctionalNorm(5)
        self.conv2, self.bn = nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv2(torch.relu(self.fn(self.conv1(x)))))


def test_functional_batch_norm_with_a_modules_buffers_gets_its_own_statistics_in_order():
    model = randomize_bn(FunctionalNet())
    batches = _batches()
    result = recalibrate(model, batches)
    with torch.no_grad():
        y1 = [model.conv1(x) for x in batches]
        m1, v1 = _stats(y1)
        m2, v2 = _stats([model.conv2(torch.relu(F.batch_norm(y, m1.float(), v1.float(), model.fn.w,
                                                              model.fn.b, False, 0.1, 1e-3))) for y in y1])  # fmt: skip
    torch.testing.assert_close(result.model.fn.rm.double(), m1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.model.fn.rv.double(), v1, rtol=1e-6, atol=1e-6)
    _assert_stats(result.model.bn, m2, v2)
    assert [(r.norm, r.level) for r in result.norms] == [("fn", 1), ("bn", 2)]
    old_std = (model.fn.rv.double() + 1e-3).sqrt()  # the drift is in the op's own eps
    expected = ((old_std / (v1 + 1e-3).sqrt()) - 1).abs().max()
    assert result.norms[0].std_drift == pytest.approx(float(expected), rel=1e-6)


class DataDependent(nn.Module):
    """Python control flow on a value: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), Scaled(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.bn_sum = nn.BatchNorm2d(4)

    def forward(self, x):
        if float(x.abs().amax()) > 0:
            x = x + 0.25
        return self.bn_sum(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))


def test_a_model_that_cannot_be_captured_takes_one_pass_per_norm_in_op_order():
    model = randomize_bn(DataDependent())
    batches = _batches()
    result = recalibrate(model, batches)
    assert result.passes == 3
    assert [(r.norm, r.level) for r in result.norms] == [("bn_a", 1), ("bn_b", 2), ("bn_sum", 3)]
    with torch.no_grad():
        xs = [x + 0.25 for x in batches]
        ma, va = _stats([3.0 * model.a(x) for x in xs])
        mb, vb = _stats([model.b(x) for x in xs])
        bn_a, bn_b = _with_stats(model.bn_a, ma, va), _with_stats(model.bn_b, mb, vb)
        ms, vs = _stats([bn_a(model.a(x)) + bn_b(model.b(x)) for x in xs])
    _assert_stats(result.model.bn_a, ma, va)
    _assert_stats(result.model.bn_b, mb, vb)
    _assert_stats(result.model.bn_sum, ms, vs)
