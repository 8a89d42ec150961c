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
from normfold.cli.app import app
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from normfold.errors import TraceError, UsageError
from normfold.transforms.calibration import NotRecalibrated, recalibrate


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
        fn = [F.batch_norm(y, m1.float(), v1.float(), model.fn.w, model.fn.b, False, 0.1, 1e-3) for y in y1]
        m2, v2 = _stats([model.conv2(torch.relu(h)) for h in fn])
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


# ------------------------------------------------------------------------------------------------
# data whose statistics are not finite: refused before anything changes


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0"), (float("-inf"), "0 NaN and 1")])
def test_non_finite_data_is_refused_naming_batch_and_input_and_nothing_changes(value, counts):
    model = randomize_bn(Branches())
    before = state_bytes(model)
    xs, ys = _batches(seed=1), _batches(seed=2)
    ys[2][5, 1, 2, 3] = value
    with pytest.raises(UsageError) as e:
        recalibrate(model, list(zip(xs, ys, strict=True)), inplace=True)
    assert str(e.value) == (
        f"batch 2, input 1 (shape (8, 3, 6, 6), float32) holds {counts} infinite value(s): the statistics "
        "of non-finite data are not finite; recalibrate() needs finite batches (nothing was changed)"
    )
    assert state_bytes(model) == before


def test_an_empty_batch_is_refused_naming_it_and_nothing_changes():
    model = randomize_bn(Chain())
    before = state_bytes(model)
    batches = _batches()
    batches.insert(1, torch.empty(0, 3, 6, 6))
    with pytest.raises(UsageError) as e:
        recalibrate(model, batches, inplace=True)
    assert str(e.value) == (
        "batch 1, input 0 (shape (0, 3, 6, 6), float32) has no values: the statistics of an empty batch are "
        "NaN; recalibrate() needs at least one sample in every batch (nothing was changed)"
    )
    assert state_bytes(model) == before


class Overflow(nn.Module):
    """Finite data, but bn2's input overflows once bn1 holds its recalibrated statistics."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv1(x)) * 1e38)


def test_a_norm_input_that_overflows_after_an_earlier_level_is_stored_puts_everything_back():
    model = randomize_bn(Overflow())
    with torch.no_grad():  # stale statistics shrink bn1's output 1e4x: finite until recalibrated
        model.bn1.running_var.fill_(1e8)
    before = state_bytes(model)
    with pytest.raises(TraceError) as e:
        recalibrate(model, _batches(), inplace=True)
    assert re.fullmatch(
        r"the input of bn2's batch-norm op holds [1-9][\d,]* non-finite value\(s\) on batch 0 "
        r"\(finite data; the model overflows or divides by zero before it\): its statistics would be NaN; "
        r"nothing was changed",
        str(e.value),
    ), str(e.value)
    assert state_bytes(model) == before  # bn1 had been stored (level 1): it was put back


def test_statistics_the_buffers_dtype_cannot_hold_are_left_unchanged_with_a_code():
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(4))).half()
    before = state_bytes(model)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 4, generator=g) * 1000 + 5).half() for _ in range(3)]  # var ~1e6 > 65504
    result = recalibrate(model, batches, inplace=True)
    mean, var = _stats(batches)
    assert result.norms == [] and result.skipped == {
        "0": NotRecalibrated(
            "0",
            "bad_statistics",
            f"its statistics (largest |mean| {float(mean.abs().max()):.3g}, largest variance "
            f"{float(var.max()):.3g}) do not fit its float16 buffers: left unchanged",
        )
    }
    assert state_bytes(model) == before


# ------------------------------------------------------------------------------------------------
# norms whose statistics cannot be exact: left unchanged, with a code


class Twice(nn.Module):
    """One BN module called at two places of a chain: ``bn(conv(bn(x)))``."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1)
        self.head, self.bn_out = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_out(self.head(self.bn(self.conv(self.bn(x)))))


def test_a_norm_called_at_several_places_is_left_unchanged_with_a_code():
    model = randomize_bn(Twice())
    before = state_bytes(model)
    batches = _batches()
    result = recalibrate(model, batches)
    assert result.skipped == {
        "bn": NotRecalibrated(
            "bn",
            "multiple_calls",
            "its batch-norm op runs 2 times in one forward (a module called at several places): its inputs "
            "mix the call sites, so no one set of statistics is exact for every call: left unchanged",
        )
    }
    after = state_bytes(result.model)
    assert {k for k in before if before[k] != after[k]} == {"bn_out.running_mean", "bn_out.running_var"}
    with torch.no_grad():  # bn_out: the exact statistics of its input, with bn as it was
        m, v = _stats([model.head(model.bn(model.conv(model.bn(x)))) for x in batches])
    _assert_stats(result.model.bn_out, m, v)
    assert [(r.norm, r.level) for r in result.norms] == [("bn_out", 1)] and result.passes == 1
    second = recalibrate(result.model, batches)  # nothing moves on a second pass
    assert second.norms[0].mean_drift < 1e-5 and second.norms[0].std_drift < 1e-5


class AlwaysBatch(nn.BatchNorm2d):
    """Normalizes with batch statistics even in eval mode (and would update its running ones)."""

    def forward(self, x):
        stats = self.running_mean, self.running_var
        return F.batch_norm(x, *stats, self.weight, self.bias, True, 0.1, self.eps)


class BatchStatsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 5, 3), AlwaysBatch(5)
        self.head, self.bn_out = nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_out(self.head(self.bn(self.conv(x))))


def test_an_op_with_batch_statistics_in_eval_is_left_unchanged_and_not_updated():
    model = randomize_bn(BatchStatsNet())
    before = state_bytes(model)
    batches = _batches()
    result = recalibrate(model, batches, inplace=True)
    assert result.skipped == {
        "bn": NotRecalibrated(
            "bn",
            "batch_statistics",
            "its batch-norm op normalizes with each batch's own statistics in eval mode (training=True), "
            "not with the running statistics: left unchanged",
        )
    }
    after = state_bytes(model)  # its running-average updates during the passes did not land
    assert {k for k in before if before[k] != after[k]} == {"bn_out.running_mean", "bn_out.running_var"}
    with torch.no_grad():
        m, v = _stats([model.head(model.bn(model.conv(x))) for x in batches])
    _assert_stats(model.bn_out, m, v)


# ------------------------------------------------------------------------------------------------
# data the model cannot run: a trace error naming the batch, expected and given


def test_the_wrong_channel_count_is_a_trace_error_naming_batch_and_shapes():
    model = randomize_bn(Chain())
    before = state_bytes(model)
    with pytest.raises(TraceError) as e:
        recalibrate(model, _batches(shape=(8, 4, 6, 6)), inplace=True)
    message = str(e.value)
    assert message.startswith(
        "the model (Chain) raised RuntimeError during forward on batch 0 (inputs (8, 4, 6, 6) float32): "
        "RuntimeError: "
    ), message
    assert "expected input[8, 4, 6, 6] to have 3 channels, but got 4 channels instead" in message
    assert state_bytes(model) == before


def test_a_dtype_other_than_the_weights_is_a_trace_error_naming_both():
    model = randomize_bn(Chain())
    batches = _batches()
    batches[3] = batches[3].double()
    with pytest.raises(TraceError) as e:
        recalibrate(model, batches)
    assert str(e.value).startswith(
        "the model (Chain) raised RuntimeError during forward on batch 3 (inputs (8, 3, 6, 6) float64): "
    ), str(e.value)
    assert str(e.value).endswith(
        "; the data is float64 but the model's weights are float32: give batches of the weights' dtype"
    )


# ------------------------------------------------------------------------------------------------
# the command line: a user-data mistake is named, never an internal error

RESNET = "normfold.models:resnet"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def _data(path: Path, shape=(4, 3, 32, 32), dtype=torch.float32, nan=False) -> Path:
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(shape, generator=g) * 1.5 + 0.2).to(dtype) for _ in range(3)]
    if nan:
        batches[1][2, 0, 5, 7] = float("nan")
    torch.save(batches, path)
    return path


@pytest.mark.parametrize(
    "data, code, text",
    [
        (dict(shape=(4, 5, 32, 32)), 4, "to have 3 channels, but got 5 channels instead"),
        (dict(dtype=torch.float64), 4, "the data is float64 but the model's weights are float32"),
        (dict(nan=True), 2, "batch 1, input 0 (shape (4, 3, 32, 32), float32) holds 1 NaN and 0 infinite"),
    ],
)
def test_the_command_names_a_data_mistake_and_writes_nothing(tmp_path: Path, data, code, text):
    path = _data(tmp_path / "batches.pt", **data)
    for command in (["recalibrate", RESNET, "--data", path, "--out", tmp_path / "r.pt"],
                    ["fold", RESNET, "--calibrate", path, "--out", tmp_path / "m.onnx"]):  # fmt: skip
        result = _cli(*command)
        assert result.exit_code == code, f"{command[0]}: exit {result.exit_code}\n{result.output}"
        assert text in result.output and "a bug" not in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["batches.pt"]


class Cropped(nn.Module):
    """Norms whose ops only ever see a zero-size axis (the model crops it away): through the
    module (``torch.batch_norm`` returns an empty input before any op runs) and through the ATen
    op itself, as generated code (an exported program's module) calls it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.empty, self.aten_empty = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        e = self.aten_empty
        z = torch.ops.aten._native_batch_norm_legit_no_training(
            y[:, :, :0], e.weight, e.bias, e.running_mean, e.running_var, 0.1, e.eps
        )[0]
        return self.bn(y), self.empty(y[:, :, :0]), z


def test_a_norm_whose_op_sees_no_values_is_left_unchanged_with_a_code():
    model = randomize_bn(Cropped())
    before = state_bytes(model)
    result = recalibrate(model, _batches())
    assert result.skipped == {
        "aten_empty": NotRecalibrated(
            "aten_empty", "no_values", "its batch-norm op's input has no values: left unchanged"
        ),
        "empty": NotRecalibrated("empty", "unused", "no batch-norm op ran with its statistics on the data"),
    }
    after = state_bytes(result.model)
    assert {k for k in before if before[k] != after[k]} == {"bn.running_mean", "bn.running_var"}
    assert [n.norm for n in result.norms] == ["bn"]


def test_an_exported_programs_module_gets_the_same_statistics_as_the_eager_model():
    model = randomize_bn(Chain())
    exported = torch.export.export(model, (_batches()[0],)).run_decompositions().module()
    eager, result = recalibrate(model, _batches()), recalibrate(exported, _batches())
    assert [(r.norm, r.level) for r in result.norms] == [("bn1", 1), ("bn2", 2)] and result.passes == 2
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert torch.equal(result.model.get_buffer(name), eager.model.get_buffer(name)), name


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        for name in ("rm1", "rm2"):
            self.register_buffer(name, torch.randn(5, generator=g) + 0.3)
        for name in ("rv1", "rv2"):
            self.register_buffer(name, torch.rand(5, generator=g) + 0.4)


class InPlace(nn.Module):
    """Changes its input in place, and runs two functional norms with buffers of one module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.stats = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 5, 1), Buffers()

    def forward(self, x):
        x.mul_(2.0).sub_(0.5)
        s = self.stats
        h = F.batch_norm(self.conv1(x), s.rm1, s.rv1, None, None, False, 0.1, 1e-5)
        return F.batch_norm(self.conv2(torch.relu(h)), s.rm2, s.rv2, None, None, False, 0.1, 1e-5)


def test_a_forward_that_changes_its_input_in_place_sees_the_same_data_on_every_pass():
    model = InPlace()
    batches = _batches()
    copies = [x.clone() for x in batches]
    result = recalibrate(model, batches)
    assert all(torch.equal(x, c) for x, c in zip(batches, copies, strict=True))  # the caller's data
    with torch.no_grad():
        y1 = [model.conv1(x * 2.0 - 0.5) for x in batches]
        m1, v1 = _stats(y1)
        m2, v2 = _stats([model.conv2(torch.relu(F.batch_norm(y, m1.float(), v1.float()))) for y in y1])
    # two pairs of one module: the first is named by the module, the second by its buffer
    assert [(r.norm, r.level) for r in result.norms] == [("stats", 1), ("stats.rm2", 2)]
    for name, expected in (("rm1", m1), ("rv1", v1), ("rm2", m2), ("rv2", v2)):
        name = f"stats.{name}"
        torch.testing.assert_close(result.model.get_buffer(name).double(), expected, rtol=1e-6, atol=1e-6)


class InPlaceChain(Chain):
    def forward(self, x):
        x.mul_(2.0).sub_(0.5)
        return super().forward(x)


def test_a_forward_that_changes_its_input_in_place_does_not_change_the_data_between_passes():
    model = randomize_bn(InPlaceChain())
    batches = _batches()
    copies = [x.clone() for x in batches]
    result = recalibrate(model, batches)
    assert all(torch.equal(x, c) for x, c in zip(batches, copies, strict=True))
    with torch.no_grad():
        y1 = [model.conv1(x * 2.0 - 0.5) for x in copies]
        m1, v1 = _stats(y1)
        bn1 = _with_stats(model.bn1, m1, v1)
        m2, v2 = _stats([model.conv2(torch.relu(bn1(y))) for y in y1])
    _assert_stats(result.model.bn1, m1, v1)
    _assert_stats(result.model.bn2, m2, v2)


class Tied(nn.Module):
    """``shadow`` shares ``bn``'s statistics tensors (tied buffers) and is never called itself."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.shadow = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def tie(self):
        self.shadow.running_mean, self.shadow.running_var = self.bn.running_mean, self.bn.running_var
        return self

    def forward(self, x):
        return self.bn(self.conv(x))


def test_tied_buffers_stay_tied_and_are_not_reported_unused():
    model = randomize_bn(Tied()).tie()
    batches = _batches()
    result = recalibrate(model, batches)
    new = result.model
    assert new.shadow.running_mean is new.bn.running_mean and new.shadow.running_var is new.bn.running_var
    with torch.no_grad():
        m, v = _stats([model.conv(x) for x in batches])
    _assert_stats(new.bn, m, v)
    assert [r.norm for r in result.norms] == ["bn"] and result.skipped == {}
