"""recalibrate(): exact eval-mode statistics, in dependency order, in as few passes as exact."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn, state_bytes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normfold.calibration import recalibrate
from normfold.errors import UsageError


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


def test_statistics_are_the_exact_eval_mode_statistics_in_order():
    model = randomize_bn(Chain())
    batches = _batches()
    result = recalibrate(model, batches)
    new = result.model
    with torch.no_grad():  # independent computation: bn1 first, then bn2 sees the recalibrated bn1
        y1 = [model.conv1(x) for x in batches]
        m1, v1 = _stats(y1)
        bn1 = nn.BatchNorm2d(5).eval()
        bn1.load_state_dict(model.bn1.state_dict())
        bn1.running_mean, bn1.running_var = m1.float(), v1.float()
        m2, v2 = _stats([model.conv2(torch.relu(bn1(y))) for y in y1])
    for bn, (m, v) in ((new.bn1, (m1, v1)), (new.bn2, (m2, v2))):
        torch.testing.assert_close(bn.running_mean.double(), m, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), v, rtol=1e-6, atol=1e-6)
    assert [(r.norm, r.level, r.values) for r in result.norms] == [
        ("bn1", 1, 4 * 8 * 16),
        ("bn2", 2, 4 * 8 * 4),
    ]
    assert result.passes == 2


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
        "nostats": "no running statistics (track_running_stats=False)",
        "unused": "never called as a module on the data",
    }
    with torch.no_grad():
        m, v = _stats([result.model.a(x) for x in xs])
    torch.testing.assert_close(result.model.bn_a.running_mean.double(), m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.model.bn_a.running_var.double(), v, rtol=1e-6, atol=1e-6)


def test_a_generator_of_batches_is_read_once_and_reused():
    result = recalibrate(randomize_bn(Chain()), (x for x in _batches()))
    assert result.passes == 2 and [r.values for r in result.norms] == [4 * 8 * 16, 4 * 8 * 4]


def test_no_batches_is_a_usage_error():
    with pytest.raises(UsageError, match="needs at least one batch"):
        recalibrate(Chain(), [])
