"""verify(): parity passes exactly when outputs agree within tolerance, and every failure is named."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, state_bytes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import normfold
from normfold.check.parity import (
    DEFAULT_TOLERANCES,
    OutputParity,
    ParityReport,
    Tolerance,
)
from normfold.check.reference import verify
from normfold.errors import TraceError, UsageError

FP32 = DEFAULT_TOLERANCES[torch.float32]


class Fn(nn.Module):
    """Wraps a function of the inputs so each test states its forward in one line."""

    def __init__(self, fn, *, param_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fn = fn
        if param_dtype is not None:
            self.p = nn.Parameter(torch.zeros(1, dtype=param_dtype))

    def forward(self, *args):
        return self.fn(*args)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _given(report: ParityReport) -> list[OutputParity]:
    """The comparisons on the caller's own inputs (verify also runs generated input sets)."""
    return [o for o in report.outputs if o.inputs == "given"]


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- basics


def test_public_exports() -> None:
    assert callable(normfold.verify) and normfold.verify is verify
    for name, obj in [
        ("ParityReport", ParityReport),
        ("OutputParity", OutputParity),
        ("Tolerance", Tolerance),
        ("DEFAULT_TOLERANCES", DEFAULT_TOLERANCES),
    ]:
        assert getattr(normfold, name) is obj
    assert set(DEFAULT_TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    with pytest.raises(TypeError):
        DEFAULT_TOLERANCES[torch.float32] = Tolerance(1.0, 1.0)  # type: ignore[index]


def test_identical_models_pass_with_zero_error() -> None:
    model = _mlp()
    report = verify(model, copy.deepcopy(model), _x(5, 8))
    assert report.passed
    assert report.failures() == []
    assert report.max_abs_error == 0.0 and report.max_rel_error == 0.0
    assert [o.inputs for o in report.outputs] == ["given", "normal", "uniform[0,255]"]
    (out,) = _given(report)
    assert out.name == "output" and out.shape == (5, 4) and out.dtype == "float32"
    assert out.passed and out.problem is None and out.mean_abs_error == 0.0
    assert out.tolerance == FP32
    assert out.max_abs_reference > 0


def test_weight_perturbed_by_1e3_fails_and_names_output() -> None:
    model = _mlp()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].weight[1, 3] += 1e-3
    report = verify(model, other, _x(5, 8))
    assert not report.passed
    assert report.max_abs_error > 1e-5
    line = report.failures()[0]
    assert line.startswith("output on given inputs: error vs the float64 reference ")
    assert "> allowed" in line and "rtol 1e-05" in line and "atol 1e-06" in line
    assert "the model's own noise" in line
    assert not any(o.passed for o in report.outputs)  # every input set sees the change


def test_tiny_relative_perturbation_passes_fp32() -> None:
    model = _mlp()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 1e-7)
    report = verify(model, other, _x(5, 8))
    assert report.passed, report.failures()
    assert 0 < report.max_abs_error  # it really was perturbed, just within tolerance


def test_failure_line_names_indexed_output() -> None:
    ref = Fn(lambda x: (x, x * 2))
    cand = Fn(lambda x: (x, x * 2 + 3.2e-3))
    report = verify(ref, cand, torch.ones(3))
    assert [o.passed for o in _given(report)] == [True, False]
    line = report.failures()[0]
    assert line == (
        "output[1] on given inputs: error vs the float64 reference 3.2e-03 > allowed 2.1e-05 "
        "(floor: rtol 1e-05 x max|ref| 2.0e+00 + atol 1e-06; the model's own noise 0.0e+00)"
    )


# --------------------------------------------------------------------------- output structure


def test_nested_output_names() -> None:
    def fn(x):
        return ({"a": [x, x + 1], "b": x * 2}, [{"c": x - 1}], 7, None)

    report = verify(Fn(fn), Fn(fn), torch.ones(2))
    assert [o.name for o in _given(report)] == [
        "output[0]['a'][0]",
        "output[0]['a'][1]",
        "output[0]['b']",
        "output[1][0]['c']",
    ]
    assert report.passed


def test_namedtuple_output_fields() -> None:
    Out = namedtuple("Out", ["logits", "aux"])
    report = verify(Fn(lambda x: Out(x, x + 1)), Fn(lambda x: Out(x, x + 1)), torch.ones(2))
    assert [o.name for o in _given(report)] == ["output.logits", "output.aux"]
    assert report.passed


def test_dict_key_mismatch_is_a_problem() -> None:
    ref = Fn(lambda x: {"a": x, "b": x})
    cand = Fn(lambda x: {"a": x, "c": x})
    report = verify(ref, cand, torch.ones(2))
    assert not report.passed
    assert [o.name for o in _given(report)] == ["output['a']"]  # the matchable part is still compared
    assert all(o.passed for o in report.outputs)
    (problem,) = report.problems
    assert "keys differ" in problem and "'b'" in problem and "'c'" in problem
    assert report.failures() == [problem]


def test_length_and_leaf_mismatches_are_problems() -> None:
    report = verify(Fn(lambda x: (x, x, 1)), Fn(lambda x: (x, x)), torch.ones(2))
    assert not report.passed
    assert any("reference has 3 elements, candidate has 2" in p for p in report.problems)

    report = verify(Fn(lambda x: (x, 1)), Fn(lambda x: (x, 2)), torch.ones(2))
    assert not report.passed
    assert report.problems == ("output[1]: non-tensor values differ: reference 1, candidate 2",)

    report = verify(Fn(lambda x: (x, x)), Fn(lambda x: (x, None)), torch.ones(2))
    assert not report.passed
    assert "output[1]: reference is a tensor of shape (2,)" in report.problems[0]


def test_empty_report_fails_even_without_problems() -> None:
    report = ParityReport(outputs=(), problems=())
    assert not report.passed
    assert report.failures() == []
    assert report.worst is None


@pytest.mark.parametrize("empty", [(), {}, [], None])
def test_zero_outputs_is_a_failure(empty) -> None:
    report = verify(Fn(lambda x: empty), Fn(lambda x: empty), torch.ones(2))
    assert report.outputs == ()
    assert not report.passed
    assert any("no outputs were compared" in p for p in report.problems)
    assert report.worst is None
    assert report.max_rel_error == math.inf and report.max_abs_error == math.inf
    json.dumps(report.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- inputs


def test_multiple_inputs() -> None:
    seen = []

    def fn(x, y):
        seen.append((x.shape, y.shape))
        return x @ y

    report = verify(Fn(fn), Fn(fn), [torch.ones(2, 3), torch.ones(3, 4)])
    assert report.passed and report.outputs[0].shape == (2, 4)
    assert seen == [(torch.Size([2, 3]), torch.Size([3, 4]))] * 3 * 3  # 3 sets: original, float64, candidate

    bad = Fn(lambda x, y: x @ y + (x.sum() > 1000).float() + 1e-3 * y[0, 0])
    report = verify(Fn(fn), bad, (torch.ones(2, 3), torch.ones(3, 4)))
    assert not report.passed  # the second input really reaches the candidate


def test_input_shapes_are_seeded_and_deterministic() -> None:
    model = _mlp()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    a = verify(model, other, input_shapes=[(4, 8)], seed=3)
    b = verify(model, other, input_shapes=[(4, 8)], seed=3)
    c = verify(model, other, input_shapes=[(4, 8)], seed=4)
    assert a.to_dict() == b.to_dict()
    assert a.max_abs_error != c.max_abs_error


def test_generated_inputs_follow_model_dtype_and_input_dtype() -> None:
    seen: list[torch.dtype] = []

    def fn(x, y):
        seen.extend([x.dtype, y.dtype])
        return x + y

    verify(Fn(fn, param_dtype=torch.float64), Fn(fn), input_shapes=[(2, 3), (2, 3)])
    assert seen == [torch.float64] * 8  # 2 sets (normal, uniform), original and candidate
    seen.clear()
    verify(Fn(fn), Fn(fn), input_shapes=[(2, 3), (3,)], input_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] * 4 + [torch.float64] * 4 + [torch.bfloat16] * 4  # float64: exact run
    seen.clear()
    verify(Fn(fn), Fn(fn), input_shapes=[(2,), (2,)])  # no parameters: float32
    assert seen == [torch.float32] * 4 + [torch.float64] * 4 + [torch.float32] * 4


def test_integer_inputs_pass_through_untouched() -> None:
    emb = nn.Embedding(10, 3)
    idx = torch.tensor([[1, 2, 9]])
    report = verify(emb, copy.deepcopy(emb), idx, input_dtype=torch.float64)
    assert report.passed and report.outputs[0].shape == (1, 3, 3)


def test_inputs_cloned_per_model() -> None:
    def inplace(x):
        x.mul_(2)
        return x

    x = torch.ones(3)
    report = verify(Fn(inplace), Fn(inplace), x)
    assert report.passed  # each model doubled its own copy
    assert torch.equal(x, torch.ones(3))


def test_missing_inputs_is_usage_error() -> None:
    with pytest.raises(UsageError, match=r"inputs.*input_shapes"):
        verify(_mlp(), _mlp())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"inputs": torch.ones(1, 8), "input_shapes": [(1, 8)]},
        {"input_shapes": (1, 8)},
        {"input_shapes": [(1, -8)]},
        {"input_shapes": [(1, 8)], "input_dtype": torch.int64},
        {"inputs": [torch.ones(1, 8), 3]},
        {"inputs": torch.ones(1, 8), "rtol": -1.0},
        {"inputs": torch.ones(1, 8), "atol": math.nan},
        {"inputs": torch.ones(1, 8), "tolerances": {"float32": Tolerance(1, 1)}},
    ],
)
def test_bad_arguments_are_usage_errors(kwargs) -> None:
    with pytest.raises(UsageError):
        verify(_mlp(), _mlp(), **kwargs)


def test_tolerance_validates() -> None:
    with pytest.raises(UsageError):
        Tolerance(rtol=-1e-5, atol=0.0)
    with pytest.raises(UsageError):
        Tolerance(rtol=1e-5, atol=math.inf)
    assert Tolerance(rtol=0, atol=1).atol == 1.0


# --------------------------------------------------------------------------- eval mode and flags


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Flatten())

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class EvalBNNet(BNNet):
    """Computes the eval-mode BatchNorm by hand, whatever the training flags say."""

    def forward(self, x):
        bn = self.bn
        y = F.batch_norm(
            self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
        )
        return torch.flatten(torch.relu(y), 1)


def test_runs_in_eval_and_restores_flags_and_stats() -> None:
    torch.manual_seed(0)
    model = randomize_bn(BNNet()).train()
    model.head[1].eval()  # a mixed pattern must come back exactly
    by_hand = EvalBNNet()
    by_hand.load_state_dict(model.state_dict())
    flags = {name: m.training for name, m in model.named_modules()}
    before = state_bytes(model)

    report = verify(model, by_hand, input_shapes=[(2, 3, 6, 6)])

    assert report.passed, report.failures()  # train-mode BN or dropout would differ from by_hand
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert by_hand.training
    assert state_bytes(model) == before  # running stats and num_batches_tracked untouched

    swapped = verify(by_hand, model, input_shapes=[(2, 3, 6, 6)])  # the candidate runs in eval too
    assert swapped.passed, swapped.failures()
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert state_bytes(model) == before


def test_folded_model_verifies() -> None:
    torch.manual_seed(0)
    model = randomize_bn(BNNet())
    x = _x(2, 3, 6, 6)
    folded = normfold.fold(model, x).model
    report = verify(model, folded, x)
    assert report.passed, report.failures()
    assert 0 < report.max_rel_error <= FP32.rtol


def test_candidate_raising_is_trace_error() -> None:
    def boom(x):
        raise RuntimeError("kaboom")

    with pytest.raises(TraceError, match=r"candidate.*RuntimeError.*\(2, 8\) float32.*kaboom") as info:
        verify(_mlp(), Fn(boom), torch.ones(2, 8))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(TraceError, match="reference"):
        verify(_mlp(), _mlp(), torch.ones(2, 5))  # wrong width: the reference fails first


def test_flags_restored_after_trace_error() -> None:
    model = _mlp().train()

    def boom(x):
        raise ValueError("no")

    with pytest.raises(TraceError):
        verify(model, Fn(boom), torch.ones(1, 8))
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------- tolerances


def test_rtol_atol_overrides() -> None:
    ref = Fn(lambda x: x)
    cand = Fn(lambda x: x + 1e-4)  # max|ref| = 1
    x = torch.ones(4)
    assert not verify(ref, cand, x).passed
    assert verify(ref, cand, x, rtol=1e-3).passed
    assert verify(ref, cand, x, atol=2e-4).passed
    assert not verify(ref, cand, x, rtol=0.0, atol=5e-5).passed
    report = verify(ref, cand, x, rtol=1e-3, atol=0)
    assert report.outputs[0].tolerance == Tolerance(rtol=1e-3, atol=0.0)


def test_tolerances_mapping_merges_over_defaults() -> None:
    ref = Fn(lambda x, y: (x, y))
    cand = Fn(lambda x, y: (x + 1e-4, y + 1e-4))
    inputs = [torch.ones(4), torch.ones(4, dtype=torch.float64)]
    report = verify(ref, cand, inputs, tolerances={torch.float32: Tolerance(rtol=1e-3, atol=0.0)})
    fp32, fp64 = _given(report)
    assert fp32.passed and fp32.tolerance == Tolerance(rtol=1e-3, atol=0.0)
    assert not fp64.passed and fp64.tolerance == DEFAULT_TOLERANCES[torch.float64]
    # rtol/atol win over the mapping
    report = verify(ref, cand, inputs, tolerances={torch.float32: Tolerance(1e-3, 0.0)}, rtol=0.0, atol=0.0)
    assert not report.outputs[0].passed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_default_tolerances(dtype: torch.dtype) -> None:
    x = _x(64, dtype=dtype).abs() + 1  # max|ref| in [1, ~5]
    cand_ok = Fn(lambda t: (t.double() * (1 + DEFAULT_TOLERANCES[dtype].rtol / 4)).to(dtype))
    report = verify(Fn(lambda t: t), cand_ok, x)
    assert report.outputs[0].tolerance == DEFAULT_TOLERANCES[dtype]
    assert report.outputs[0].dtype == str(dtype).removeprefix("torch.")
    assert report.passed, report.failures()
    assert report.max_abs_error > FP32.atol + FP32.rtol * 5  # would fail under fp32 tolerances
    cand_bad = Fn(lambda t: (t.double() * (1 + 3 * DEFAULT_TOLERANCES[dtype].rtol)).to(dtype))
    assert not verify(Fn(lambda t: t), cand_bad, x).passed


def test_integer_outputs_must_be_exact() -> None:
    ref = Fn(lambda x: x.argmax(-1))
    cand = Fn(lambda x: x.argmax(-1) + (x[:, 0] > 0.5).long())
    x = torch.tensor([[0.9, 0.1, 0.0]])
    report = verify(ref, cand, x, rtol=1.0, atol=1.0)  # overrides do not loosen integer outputs
    assert report.outputs[0].tolerance == Tolerance(0.0, 0.0)
    assert not report.passed
    assert verify(ref, ref, x).passed
    # an explicit entry for the integer dtype is honoured, and rtol/atol still leave it alone
    loose = verify(ref, cand, x, tolerances={torch.int64: Tolerance(rtol=0.0, atol=1.0)}, atol=0.0)
    assert loose.outputs[0].tolerance == Tolerance(0.0, 1.0)
    assert loose.passed


# --------------------------------------------------------------------------- non-finite, shape, dtype


def test_nan_same_positions_passes() -> None:
    x = torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0])
    report = verify(Fn(lambda t: t * 1), Fn(lambda t: t * 1), x)
    assert report.passed
    assert report.outputs[0].max_abs_reference == 2.0  # only finite elements count


def test_nan_in_candidate_only_fails() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    cand = Fn(lambda t: torch.where(t > 2.5, torch.nan, t))
    report = verify(Fn(lambda t: t * 1), cand, x)
    assert not report.passed
    out = report.outputs[0]
    assert out.problem == "non-finite values differ (1 positions)"
    assert out.max_abs_error == 0.0  # finite part matches
    assert report.failures()[0] == "output on given inputs: non-finite values differ (1 positions)"


def test_inf_sign_must_match() -> None:
    x = torch.tensor([1.0, math.inf])
    report = verify(Fn(lambda t: t * 1), Fn(lambda t: t * torch.tensor([1.0, -1.0])), x)
    assert not report.passed and report.outputs[0].problem == "non-finite values differ (1 positions)"


def test_shape_mismatch_names_both_shapes() -> None:
    report = verify(Fn(lambda x: x), Fn(lambda x: x.t()), torch.ones(2, 3))
    out = report.outputs[0]
    assert not report.passed and not out.passed
    assert out.problem == "shape mismatch: reference (2, 3) vs candidate (3, 2)"
    assert out.max_abs_error == math.inf
    json.dumps(report.to_dict(), allow_nan=False)


def test_dtype_mismatch_fails() -> None:
    report = verify(Fn(lambda x: x), Fn(lambda x: x.double()), torch.ones(3))
    out = report.outputs[0]
    assert not out.passed and out.max_abs_error == 0.0
    assert out.problem == "dtype mismatch: reference float32 vs candidate float64"


def test_to_dict_is_json() -> None:
    ref = Fn(lambda x: {"a": x, "b": (x * 2, 3)})
    cand = Fn(lambda x: {"a": x + 1, "b": (x * 2, 3)})
    report = verify(ref, cand, torch.ones(2))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["worst"] == "output['a']"
    assert [(o["name"], o["inputs"]) for o in data["outputs"][:2]] == [
        ("output['a']", "given"),
        ("output['b'][0]", "given"),
    ]
    assert {"noise", "exact_error", "allowed_error"} <= set(data["outputs"][0])
    assert data["outputs"][0]["tolerance"] == {"rtol": FP32.rtol, "atol": FP32.atol}
    assert data["failures"] == report.failures()


def test_never_prints(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="normfold.check.parity"):
        verify(_mlp(), _mlp(), torch.ones(1, 8))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert any(r.name == "normfold.check.parity" for r in caplog.records)


# --------------------------------------------------------------------------- property


class Scale(nn.Module):
    def __init__(self, s: float, perturb: float = 0.0) -> None:
        super().__init__()
        self.s = s
        self.perturb = perturb

    def forward(self, x):
        y = x * self.s
        return y * (1 + self.perturb) if self.perturb else y


_values = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=24
)
_scales = st.floats(1e-3, 1e3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=_values, s=_scales, factor=st.floats(10.5, 1e4))
def test_property_scale_invariant_pass_fail(values: list[float], s: float, factor: float) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    model = Scale(s)
    same = verify(model, model, x)
    assert same.passed
    assert same.max_abs_error == 0.0 and same.max_rel_error == 0.0

    assume(float(x.abs().max()) >= 1e-3)  # a non-trivial output scale to perturb
    rel = factor * FP32.rtol  # strictly more than 10x rtol
    # atol=0: the claim is about the relative part; atol only floors tiny outputs.
    report = verify(model, Scale(s, perturb=rel), x, atol=0.0)
    assert not report.passed
    assert report.max_rel_error > 10 * FP32.rtol
