"""The parity rule end to end: an exact fold of a model whose own fp32 rounding is far above the
fixed tolerance passes; every real change fails; nothing passes with nothing compared."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import normfold
from normfold.check.exact import perturb
from normfold.check.parity import ParityRule, compare
from normfold.check.reference import check, make_reference, parity_sets, random_inputs, verify
from normfold.errors import UsageError
from normfold.io.limits import MAX_INPUT_ELEMENTS

X = (torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0)),)


class ClampBN(nn.BatchNorm2d):
    """A BN subclass that clamps after normalizing: never triggers on N(0, 1) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-20, 20)


class SiLUBN(nn.BatchNorm2d):
    """A BN subclass with an activation after normalizing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(super().forward(x))


def noisy_net(bn: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> nn.Module:
    """Conv -> BN whose statistics cancel a large conv bias: in fp32 the original loses ~1e-4 of
    its output scale to rounding (conv(x) + 1000 - 1000), the float64 fold computes it exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        conv, norm = model[0], model[1]
        conv.bias.fill_(1000.0)
        norm.running_mean.copy_(1000.0 + torch.randn(8) * 0.5)
        norm.running_var.copy_(torch.rand(8) * 0.02 + 0.01)
        norm.weight.copy_(torch.rand(8) + 0.5)
        norm.bias.copy_(torch.randn(8))
    return model.eval()


def _own_error(model: nn.Module, x: tuple[torch.Tensor, ...]) -> float:
    """The model's own fp32 rounding error relative to its output scale (vs a float64 run)."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(*(t.double() for t in x))
        return float((model(*x).double() - exact).abs().max() / exact.abs().max())


def test_exact_fold_of_a_noisy_model_passes_where_the_fixed_tolerance_refuses() -> None:
    model = noisy_net()
    assert _own_error(model, X) > 1e-5  # the model's own fp32 error is over the fixed floor
    folded = normfold.fold(model, X).model
    # the fixed rule (the fp32 original as the reference, 1e-5 of the output scale) refuses it
    assert not compare(normfold.run_model(model, X), normfold.run_model(folded, X)).passed
    report = verify(model, folded, X)
    assert report.passed, report.failures()
    for o in report.outputs:
        assert o.noise > 0 and o.exact_error <= o.allowed_error
        assert o.exact_error < o.noise  # the fold is closer to the exact result than the original
    given = next(o for o in report.outputs if o.inputs == "given")
    assert given.max_abs_error > 1e-5 * given.max_abs_reference  # and differs from the fp32 original


def _shift_one_channel(model: nn.Module) -> None:
    bn = model[1]
    bn.running_mean[2] += 0.1 * bn.running_var[2].sqrt()  # a tenth of that channel's std


def _wrong_axis(model: nn.Module) -> None:
    bn = model[1]
    bn.weight.copy_(bn.weight.roll(1))  # the scale applied to the neighbouring channel
    bn.bias.copy_(bn.bias.roll(1))


def _dropped_bias(model: nn.Module) -> None:
    model[1].bias.zero_()  # a fold that forgot the BN's beta


@pytest.mark.parametrize("change", [_shift_one_channel, _wrong_axis, _dropped_bias])
def test_real_changes_fail(change) -> None:
    model = noisy_net()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        change(changed)
    report = verify(model, changed, X)
    assert not report.passed
    assert all(not o.passed for o in report.outputs if o.inputs == "given"), report.failures()
    assert "error vs the float64 reference" in report.failures()[0]


def clamp_net(bn: type[nn.BatchNorm2d]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn(8), nn.Conv2d(8, 4, 1))
    return randomize_bn(model)


def test_a_dropped_clamp_fails_on_the_wide_range_inputs_only() -> None:
    model = clamp_net(ClampBN)
    plain = clamp_net(nn.BatchNorm2d)  # the clamp dropped: a fold that took ClampBN for plain BN
    report = verify(model, plain, input_shapes=[(2, 3, 10, 10)])
    assert not report.passed
    by_set = {o.inputs: o.passed for o in report.outputs}
    assert by_set == {"normal": True, "uniform[0,255]": False}  # N(0, 1) never reaches the clamp
    # the real fold keeps the clamp and passes
    folded = normfold.fold(model, X).model
    assert verify(model, folded, X).passed


def test_a_failing_candidate_is_judged_once_against_a_fixed_number_of_runs() -> None:
    """No second round: the reference's runs are made up front (``rule.perturbations`` per set),
    a failing check runs the candidate once per set and adds nothing."""
    model, plain = clamp_net(ClampBN), clamp_net(nn.BatchNorm2d)
    rule = ParityRule(perturbations=3)
    ref = make_reference(model, parity_sets((torch.randn(2, 3, 10, 10),), rule, given=False), rule)
    assert [len(runs) for runs in ref.perturbed] == [3, 3]
    calls: list[str] = []

    def run(x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls.append("run")
        return plain(*x)

    report = check(ref, run, rule)
    assert not report.passed and len(calls) == len(ref.sets) == 2
    assert [len(runs) for runs in ref.perturbed] == [3, 3]
    assert not hasattr(ref, "widen")


class Counting(nn.Module):
    """Records the dtype of every forward (of the original and of every copy of it)."""

    calls: ClassVar[list[torch.dtype]] = []

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counting.calls.append(self.lin.weight.dtype)
        return self.lin(x)


def test_one_float64_run_per_set_and_perturbed_runs_only_for_a_candidate_that_needs_them() -> None:
    """The original and its float64 copy run once per set up front; the perturbed runs (a fixed
    count) are made once, for the first candidate not within the rule by the original's own error
    alone: a candidate within it passes with any perturbed runs too (they only add noise)."""
    torch.manual_seed(0)
    model, rule = Counting(), ParityRule(perturbations=3)
    Counting.calls = []
    ref = make_reference(model, parity_sets((torch.randn(2, 3),), rule), rule)
    assert len(ref.sets) == 3
    assert Counting.calls == [torch.float32] * 3 + [torch.float64] * 3  # the original, then float64
    Counting.calls = []
    twin = copy.deepcopy(model.lin)  # the same computation, not counted
    within = check(ref, lambda x: twin(*x), rule)
    assert within.passed and within.decided and Counting.calls == []  # no perturbed run made
    assert ref._perturbed is None
    assert not check(ref, lambda x: torch.zeros(2, 3), rule).passed
    assert Counting.calls == [torch.float32] * 9  # 3 perturbed copies, each run on the 3 sets
    assert [len(runs) for runs in ref.perturbed] == [3, 3, 3]
    Counting.calls = []
    assert not check(ref, lambda x: torch.zeros(2, 3) + 1, rule).passed
    assert Counting.calls == []  # made once: a second failing candidate runs nothing more


def test_value_range_sets_the_uniform_inputs() -> None:
    rule = ParityRule(value_range=(-1, 1))
    sets = parity_sets(X, rule, seed=0)
    assert [s.name for s in sets] == ["given", "normal", "uniform[-1,1]"]
    wide = sets[2].inputs[0]
    assert wide.dtype == X[0].dtype and wide.shape == X[0].shape
    assert -1 <= float(wide.min()) and float(wide.max()) <= 1 and float(wide.max() - wide.min()) > 1.5
    # generated from shapes: the first set is the normal one, not repeated
    assert [s.name for s in parity_sets(random_inputs([(2, 3)]), rule, given=False)] == [
        "normal",
        "uniform[-1,1]",
    ]


def test_integer_inputs_are_kept_in_every_set() -> None:
    tokens = torch.tensor([[1, 2, 3]])
    assert [s.inputs[0] is tokens for s in parity_sets((tokens,), ParityRule())] == [True]
    x = torch.randn(1, 3)
    sets = parity_sets((tokens, x), ParityRule())
    assert all(s.inputs[0] is tokens for s in sets) and len(sets) == 3


def test_set_where_the_original_overflows_is_dropped_with_a_note() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)  # 0..255 inputs overflow fp16 (max 65504)
    x = (torch.randn(2, 4).half(),)
    ref = make_reference(model, parity_sets(x, ParityRule()), ParityRule())
    assert [s.name for s in ref.sets] == ["given", "normal"]
    assert ref.notes == ["input set uniform[0,255] dropped: the original model's output is not finite on it"]


def test_no_float64_reference_above_the_limit_says_so() -> None:
    model = noisy_net()
    rule = ParityRule(exact_limit_bytes=100)
    report = verify(model, copy.deepcopy(model), X, rule=rule)
    assert report.passed and all(math.isnan(o.noise) for o in report.outputs)
    (note,) = report.notes
    size = 8 * sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert note == (
        f"no float64 reference: a float64 copy of the model needs {size:,} bytes, over the limit of 100 "
        "(0.0 GiB); judged by the fixed tolerance alone"
    )


class CastsToFloat32(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ torch.eye(3)  # a float32 constant: no float64 run


def test_model_that_cannot_run_in_float64_falls_back_to_the_floor_with_a_note() -> None:
    model = CastsToFloat32()
    report = verify(model, copy.deepcopy(model), torch.randn(2, 3))
    assert report.passed
    assert report.notes and report.notes[0].startswith("no float64 reference (")


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        (
            lambda x: torch.full_like(x, math.nan),
            "the original's output has no finite value: nothing to compare",
        ),
        (lambda x: x[:0], "empty output (0 elements): nothing to compare"),
    ],
)
def test_outputs_with_nothing_finite_fail(output, problem) -> None:
    class Fn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return output(x)

    report = verify(Fn(), Fn(), torch.randn(2, 3))
    assert not report.passed
    assert all(o.problem is not None and problem in o.problem for o in report.outputs)


def test_all_zero_outputs_compare_nothing() -> None:
    report = compare(torch.zeros(3), torch.zeros(3))
    assert not report.passed
    assert report.problems[0].startswith("nothing was compared: every output of the original is all zeros")
    assert compare((torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))).passed


def test_huge_shapes_are_refused_before_allocating() -> None:
    message = r"^inputs of shape \(1, 3, 100000, 100000\): 30,000,000,000 input elements in total, "
    with pytest.raises(UsageError, match=message + r"over the limit of 268,435,456 \(2\*\*28\)"):
        random_inputs([(1, 3, 100000, 100000)])
    with pytest.raises(UsageError, match="over the limit"):
        random_inputs([(10**19, 1)])
    assert MAX_INPUT_ELEMENTS == 2**28


def test_perturbed_runs_measure_rounding_without_touching_the_model() -> None:
    """Each perturbed run (in the model's own dtype) is about one rounding away from the exact
    run: a nonzero distance of rounding size, different per seed; the original's tensors are
    bit-identical afterwards."""
    model = noisy_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sets = parity_sets(X, ParityRule())
    ref = make_reference(model, sets, ParityRule())
    assert [len(p) for p in ref.perturbed] == [ParityRule().perturbations] * len(ref.sets) == [4] * 3
    for exact, runs in zip(ref.exact, ref.perturbed, strict=True):
        assert all(p.dtype == torch.float32 for p in runs)  # run in the model's dtype, not float64
        distances = [float((p.double() - exact).abs().max() / exact.abs().max()) for p in runs]
        assert all(0 < d < 1e-3 for d in distances), distances
        assert len(set(distances)) > 1  # different seeded draws
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert make_reference(model, sets, ParityRule(perturbations=0)).perturbed == [[]] * len(ref.sets)


def test_a_perturbation_moves_parameters_by_at_most_one_rounding_in_their_dtype() -> None:
    """``perturb`` rounds ``t * (1 + d)``, ``|d| < u``, to the tensor's own dtype: every entry
    stays put or moves to a neighbouring representable value, and some of them move."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = noisy_net().to(dtype)
        moved = copy.deepcopy(model)
        perturb(moved, model, seed=3)
        for t, w in zip(model.state_dict().values(), moved.state_dict().values(), strict=True):
            if not t.is_floating_point():
                assert torch.equal(t, w)
                continue
            assert w.dtype == dtype
            up = torch.nextafter(t, torch.full_like(t, math.inf))
            down = torch.nextafter(t, torch.full_like(t, -math.inf))
            assert bool(((w == t) | (w == up) | (w == down)).all()), dtype
        changed = [float((w != t).float().mean()) for t, w in
                   zip(model.parameters(), moved.parameters(), strict=True)]  # fmt: skip
        assert 0.1 < sum(changed) / len(changed) < 0.6, (dtype, changed)


def test_perturbed_noise_admits_a_fold_the_lucky_own_error_would_refuse() -> None:
    """The model's noise is the larger of its own error and the perturbed runs' distance; a
    candidate within 4x the perturbed noise but not within 4x a lucky-small own error passes."""
    exact = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    orig = (exact + 1e-9).float()  # a lucky original: almost no rounding error
    perturbed = exact + torch.tensor([3e-6, 0.0, 0.0], dtype=torch.float64)
    cand = (exact + 1e-5).float()
    rule = ParityRule(rtol=0, atol=0)
    alone = compare(orig, cand, exact_outputs=exact, rule=rule)
    widened = compare(orig, cand, exact_outputs=exact, perturbed_outputs=[perturbed], rule=rule)
    assert not alone.passed and widened.passed
    assert widened.outputs[0].noise == pytest.approx(3e-6, rel=1e-3)
    real_change = (exact + 1e-3).float()
    assert not compare(
        orig, real_change, exact_outputs=exact, perturbed_outputs=[perturbed], rule=rule
    ).passed


def test_rule_arguments_are_validated() -> None:
    with pytest.raises(UsageError, match="noise_factor must be finite and >= 0"):
        ParityRule(noise_factor=-1)
    for bad in (-1, 17, True, 1.5):
        with pytest.raises(UsageError, match=r"perturbations must be an int in 0\.\.16"):
            ParityRule(perturbations=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="value_range must be finite with low < high"):
        ParityRule(value_range=(5, 1))
    with pytest.raises(UsageError, match="value_range must be two numbers"):
        ParityRule(value_range="wide")  # type: ignore[arg-type]


def test_a_dropped_activation_inside_a_bn_subclass_fails() -> None:
    model = noisy_net(SiLUBN)
    plain = noisy_net(nn.BatchNorm2d)  # the SiLU dropped: a fold that took SiLUBN for plain BN
    report = verify(model, plain, X)
    assert not report.passed
    assert all(not o.passed for o in report.outputs), report.failures()
    # the real fold keeps the activation and passes, on every input set
    result = normfold.fold(model, X)
    assert [f.norm for f in result.folded] == ["1"]
    report = verify(model, result.model, X)
    assert report.passed, report.failures()
    assert {o.inputs for o in report.outputs} == {"given", "normal", "uniform[0,255]"}


def test_a_bfloat16_models_perturbed_runs_compute_in_float32() -> None:
    """Differential fuzz seed 5: a bfloat16 norm of mean 30 under variance 1e-5. Perturbed runs
    in bfloat16 added bfloat16's forward rounding to the noise, 4x of which reached the output's
    scale: "cannot decide" on a fold the float64 truth judges right. In float32 they measure the
    parameters' rounding, as a float64 run would, and the fold passes (module and program)."""
    from diff_programs import Call, Linear, Norm, Program, Scale, build

    program = Program(shape=(4,), ops=(
        Norm(act="neg", affine=False, eps=0.001, mean=30.0, var=(-5.0, -4.0), beta=0.0),
        Scale(op="add", value=3.0), Call(),
        Norm(track=False, mean=0.0, var=(0.0, 0.0), gamma="tiny", beta=0.0), Linear(fout=5, bias=False),
        Norm(track=False, mean=0.0, var=(0.0, 0.0), beta=0.0, src=4), Linear(bias=False),
    ), dtype="bfloat16", train=True)  # fmt: skip
    built = build(program)
    rule = ParityRule()
    ref = make_reference(built.model, parity_sets(built.inputs, rule), rule)
    assert all(p.dtype == torch.float32 for runs in ref.perturbed for p in runs) and ref.perturbed[0]
    report = verify(built.model, normfold.fold(built.model, built.inputs, reparameterize=False), built.inputs)
    assert report.passed, report.failures()


class _NoDouble(nn.Module):
    """A float32 model with no float64 forward (its op refuses double inputs, as an op without a
    float64 kernel does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            raise RuntimeError("no float64 kernel")
        return self.lin(x) * 1.5


def test_a_given_exact_run_is_the_reference_and_no_float64_copy_runs() -> None:
    """make_reference(exact=...) (the widened captured graph of widened_parity) takes that runner as
    the float64 reference; the model's own float64 copy is not made or run (it would fail here);
    over the rule's exact_limit_bytes the runner is not even built."""
    torch.manual_seed(3)
    model = _NoDouble().eval()
    x = torch.randn(4, 3)
    sets = parity_sets((x,), ParityRule())
    calls: list[torch.dtype] = []

    def exact_run(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls.append(inputs[0].dtype)
        w, b = model.lin.weight.double(), model.lin.bias.double()
        return (inputs[0] @ w.T + b) * 1.5

    reference = make_reference(model, sets, ParityRule(), exact=lambda: exact_run)
    assert calls == [torch.float64] * len(sets) and reference.exact is not None
    assert not any(n.startswith("no float64 reference") for n in reference.notes)
    assert torch.equal(reference.exact[0], exact_run((sets[0].inputs[0].double(),)))
    assert check(reference, lambda inputs: model(*inputs), ParityRule()).passed
    without = make_reference(model, sets, ParityRule())  # the copy's run fails: a note, no reference
    assert without.exact is None and any("no float64 kernel" in n for n in without.notes)

    def never() -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
        raise AssertionError("built over the limit")

    small = ParityRule(exact_limit_bytes=8)
    over = make_reference(model, sets, small, exact=never)
    assert over.exact is None and any("over the limit" in n for n in over.notes)


def test_a_candidates_verdict_does_not_depend_on_an_earlier_candidate() -> None:
    """Review of 782e403: judging by the own error first happened only until some candidate had
    made the perturbed runs, so the same candidate passed alone and failed after a worse one."""
    from normfold.check.input_sets import InputSet
    from normfold.check.reference import Reference

    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, generator=gen, dtype=torch.float64)
    orig = (exact + 1e-7 * torch.randn(64, generator=gen, dtype=torch.float64)).float()
    pert = (exact + 1.0).float()  # an ill-conditioned original: its perturbed run is far off
    sets = [InputSet("a", (torch.zeros(1),))]
    rule = ParityRule()

    def reference() -> Reference:
        return Reference(sets, [orig], [exact], [], lambda: [[pert]])

    alone = check(reference(), lambda x: orig.clone(), rule)
    shared = reference()
    assert not check(shared, lambda x: (exact + 0.05).float(), rule).passed  # made the perturbed runs
    after = check(shared, lambda x: orig.clone(), rule)
    assert alone.passed and after.passed and after.decided
