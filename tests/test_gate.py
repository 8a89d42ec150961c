"""The measured gate for folds that cancel (normfold.gate): the float64 rule decides."""

from __future__ import annotations

import copy

import pytest
import torch
from fuzz_models import ActBatchNorm1d
from torch import nn

import normfold
from normfold.folding import analyse
from normfold.gate import CODE, at_risk


def _planned(model: nn.Module, x: torch.Tensor) -> tuple:
    analysis = analyse(copy.deepcopy(model), x)
    return analysis.capture, analysis.plan


def _cancelling(seed: int, mean_scale: float = 1000.0) -> tuple[nn.Module, torch.Tensor]:
    """Item 7's model: ``Linear(2, 3) -> BN(running_mean ~ mean_scale, var 10)`` then a
    batch-statistics BN subclass with a ReLU, then ``Linear(3, 1)``: the first BN's fold cancels
    numbers ~1e3 into outputs ~1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(2, 3, bias=False),
            nn.BatchNorm1d(3),
            ActBatchNorm1d(3, affine=False, track_running_stats=False),
            nn.Linear(3, 1),
        )
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(3, generator=gen, dtype=torch.float64) * mean_scale)
        model[1].running_var.fill_(10.0)
        model[1].weight.copy_(torch.randn(3, generator=gen))
        model[1].bias.copy_(torch.randn(3, generator=gen))
    return model.eval(), torch.randn(4, 2, generator=gen)


def test_a_fold_far_beyond_the_rule_is_kept_with_its_code() -> None:
    """Seeds 9 and 40: the fold's error is 16x and 33x the model's own noise (far beyond the
    rule's 4x on any CPU): kept as ``cancellation``, with the statistics in the reason, and the
    result passes the rule on the module and the program."""
    for seed in (9, 40):
        model, x = _cancelling(seed)
        result = normfold.fold(model, x)
        assert [f.norm for f in result.folded] == []
        (kept,) = [s for s in result.skipped if s.norm == "1"]
        assert kept.code == CODE == "cancellation"
        assert "standard deviations from zero" in kept.reason and "parity rule" in kept.reason
        assert result.replan_folds == 0
        assert normfold.verify(model, result, x).passed


def test_every_result_of_a_cancelling_family_passes_and_folds_where_the_rule_allows() -> None:
    """Whatever the CPU's rounding decides per seed, what fold returns passes the rule, a kept
    norm is the one at risk, and most seeds fold (the gate refuses only what the rule refuses)."""
    folded = 0
    for seed in range(12):
        model, x = _cancelling(seed)
        result = normfold.fold(model, x)
        assert normfold.verify(model, result, x).passed, seed
        assert {s.norm for s in result.skipped if s.code == CODE} <= {"1"}
        folded += [f.norm for f in result.folded] == ["1"]
    assert folded >= 6


def test_a_fold_not_at_risk_is_not_judged() -> None:
    """Statistics a few stds from zero: no measured check (the plan has no fold at risk)."""
    model, x = _cancelling(9, mean_scale=1.0)
    analysis = analyse(copy.deepcopy(model), x)
    assert at_risk(analysis.capture, analysis.plan) == {}
    assert at_risk(*_planned(_cancelling(9)[0], x)) == {"1": pytest.approx(1e3 * 0.68, rel=0.5)}
    result = normfold.fold(model, x)
    assert [f.norm for f in result.folded] == ["1"]


def test_inplace_decides_as_a_copy_does() -> None:
    model, x = _cancelling(40)
    twin = copy.deepcopy(model)
    result = normfold.fold(twin, x, inplace=True)
    assert result.model is twin
    decided = [(s.norm, s.code) for s in normfold.fold(model, x).skipped]
    assert [(s.norm, s.code) for s in result.skipped] == decided
    assert normfold.verify(model, result, x).passed
