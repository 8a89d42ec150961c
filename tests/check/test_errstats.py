"""Error statistics per output (normfold.check.errstats) on hand-made outputs whose errors are known,
and the smallest tolerances they report: the rule passes at them and fails just below."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normfold.check.parity import ParityRule, compare

EXACT = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
ERRORS = torch.tensor([0.1, -0.2, 0.0, 0.8], dtype=torch.float64)
OWN = torch.tensor([0.05, 0.0, 0.0, 0.0], dtype=torch.float64)  # the original's own error


def _compare(rule: ParityRule, exact: bool = True):
    return compare(EXACT + OWN, EXACT + ERRORS, exact_outputs=EXACT if exact else None, rule=rule)


def test_statistics_against_the_float64_run_are_the_known_errors() -> None:
    (o,) = _compare(ParityRule(rtol=0.01, atol=0.0)).outputs
    s = o.stats
    assert s is not None and s.against == "float64"
    # |errors| = 0.1, 0.2, 0, 0.8; sorted 0, 0.1, 0.2, 0.8: median the 2nd, p99 the 4th
    assert (s.mean_abs, s.median_abs, s.p99_abs, s.max_abs) == pytest.approx((0.275, 0.1, 0.8, 0.8))
    # relative to |exact| = 1, 2, 4, 8: 0.1, 0.1, 0, 0.1
    assert (s.mean_rel, s.median_rel, s.p99_rel, s.max_rel) == pytest.approx((0.075, 0.1, 0.1, 0.1))
    # error 0.8 - floor 0.01 * 8 over the noise 0.05 (the own error: no perturbed run here)
    assert s.min_noise_factor == pytest.approx(0.72 / 0.05)
    assert s.min_atol == pytest.approx(0.8 - 0.01 * 8)


@pytest.mark.parametrize("exact", [True, False])
def test_the_smallest_tolerances_are_where_the_rule_turns(exact: bool) -> None:
    rule = ParityRule(rtol=0.01, atol=0.0)
    s = _compare(rule, exact).outputs[0].stats
    assert s is not None and s.against == ("float64" if exact else "original")
    if exact:
        k = s.min_noise_factor
        assert _compare(ParityRule(rtol=0.01, atol=0.0, noise_factor=k * (1 + 1e-9))).passed
        assert not _compare(ParityRule(rtol=0.01, atol=0.0, noise_factor=k * (1 - 1e-6))).passed
    else:
        assert math.isnan(s.min_noise_factor)  # no noise is measured without an exact run
    a = s.min_atol
    assert _compare(ParityRule(rtol=0.01, atol=a * (1 + 1e-9), noise_factor=0.0), exact).passed
    assert not _compare(ParityRule(rtol=0.01, atol=a * (1 - 1e-6), noise_factor=0.0), exact).passed


def test_a_small_scale_slice_sets_the_smallest_tolerances() -> None:
    """A part of the output at 1/1000 of its scale, off by 10x its floor with no noise: no noise
    factor admits it (``inf``), and the atol it needs is its own error minus its own floor."""
    exact = torch.tensor([[8.0, 1.0], [0.008, 0.004]], dtype=torch.float64)
    errors = torch.tensor([[0.0, 0.0], [8e-4, 0.0]], dtype=torch.float64)
    rule = ParityRule(rtol=0.01, atol=0.0)
    report = compare(exact.clone(), exact + errors, exact_outputs=exact, rule=rule)
    s = report.outputs[0].stats
    assert not report.passed and s is not None
    assert s.min_noise_factor == math.inf
    assert s.min_atol == pytest.approx(8e-4 - 0.01 * 0.008)
    assert compare(exact.clone(), exact + errors, exact_outputs=exact,
                   rule=ParityRule(rtol=0.01, atol=s.min_atol * (1 + 1e-9))).passed  # fmt: skip


def test_the_json_report_holds_each_outputs_closest_call() -> None:
    """``to_dict`` has every comparison's statistics and, per output, those of the input set on
    which it came closest to failing."""
    rule = ParityRule(rtol=0.01, atol=0.0)
    near = compare((EXACT + OWN, EXACT), (EXACT + ERRORS, EXACT + 1e-3), exact_outputs=(EXACT, EXACT),
                   rule=rule, inputs="near")  # fmt: skip
    far = compare((EXACT + OWN, EXACT), (EXACT, EXACT + 0.1), exact_outputs=(EXACT, EXACT), rule=rule,
                  inputs="far")  # fmt: skip
    from normfold.check.parity import ParityReport

    report = ParityReport(outputs=near.outputs + far.outputs)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["outputs"][0]["stats"]["max_abs"] == pytest.approx(0.8)
    summary = data["error_stats"]
    assert set(summary) == {"output[0]", "output[1]"}
    assert summary["output[0]"]["inputs"] == "near" and summary["output[0]"]["max_abs"] == pytest.approx(0.8)
    assert summary["output[1]"]["inputs"] == "far" and summary["output[1]"]["max_abs"] == pytest.approx(0.1)
    assert summary["output[1]"]["min_noise_factor"] == "inf"  # over its floor, no noise: JSON-safe
