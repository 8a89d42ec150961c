"""fold()'s post-condition (normfold.engine.postcheck) and verify() judging every artifact of a result."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import normfold
from normfold.engine.postcheck import check_artifacts_agree, check_replan, shares_tensors
from normfold.errors import ConsistencyError


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    return randomize_bn(net, seed).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_verify_judges_the_module_and_the_program_of_a_result() -> None:
    model = _net(0)
    result = normfold.fold(model, X)
    report = normfold.verify(model, result, X)
    assert report.passed
    names = {o.name.split(":")[0] for o in report.outputs}
    assert names == {"module", "program"}
    # a result whose program is another model's: the module passes, the program fails
    result.program = normfold.fold(_net(1), X).program
    report = normfold.verify(model, result, X)
    assert not report.passed and report.decided
    failed = {o.name.split(":")[0] for o in report.outputs if not o.passed}
    assert failed == {"program"}
    assert report.failures()[0].startswith("program: output on given inputs: error vs the float64 reference")


def test_verify_runs_an_exported_program() -> None:
    model = _net(0)
    program = normfold.fold(model, X).program
    assert normfold.verify(model, program, X).passed
    assert not normfold.verify(model, normfold.fold(_net(2), X).program, X).passed


def test_verify_refuses_other_candidates() -> None:
    with pytest.raises(normfold.UsageError, match="an ExportedProgram or a FoldResult, got str"):
        normfold.verify(_net(0), "model.onnx", X)


def test_artifacts_that_disagree_raise_naming_the_suspects() -> None:
    model = _net(0)
    module = normfold.fold(model, X).model
    other = normfold.fold(_net(3), X).program
    check_artifacts_agree(module, normfold.fold(model, X).program, (X,), [])  # the same fold: agree
    scale = r"output 0: max difference .* > .*\(0\.001 x the output's scale"
    with pytest.raises(ConsistencyError, match=scale) as e:
        check_artifacts_agree(module, other, (X,), ["1 (batchnorm) into 0 (conv-bn, export only)"])
    assert "bug in normfold" in str(e.value) and "1 (batchnorm) into 0" in str(e.value)


def test_inf_in_one_artifact_only_is_a_disagreement() -> None:
    class Blow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 1e30

    program = torch.export.export(nn.Identity(), (X.half(),))
    with pytest.raises(ConsistencyError, match="non-finite values at"):
        check_artifacts_agree(Blow().half(), program, (X.half(),), [])


def test_a_replan_that_finds_work_raises() -> None:
    check_replan([])
    with pytest.raises(ConsistencyError, match=r"finds 1 fold\(s\) or merge\(s\) the first plan missed: bn"):
        check_replan(["bn (conv-bn into c)"])


class _Noisy(nn.Module):
    """A forward that draws from the global RNG (dropout forced on), next to a foldable BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + 0 * torch.rand_like(x).sum()


def test_fold_and_verify_leave_the_global_rng_alone() -> None:
    """fold() runs the model for its post-condition and verify() runs it on every input set:
    neither consumes the caller's seeded RNG, even when the forward draws from it."""
    model = randomize_bn(_Noisy()).eval()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = normfold.fold(model, X)
    normfold.verify(model, result, X)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_exact_export_only_fold_of_an_ill_conditioned_map_is_no_disagreement() -> None:
    """Differential fuzz seed 5151, example 160: an F.batch_norm (export only) with mean 30 under a
    tiny gamma folds exactly, but module and program differ by 1.26e-6 on outputs of scale
    6.5e-5, past the quick bound: the parity rule with the module as reference (its own rounding)
    decides, and fold returns instead of raising ConsistencyError."""
    from diff_programs import Add, Conv, Linear, Norm, Program, Scale, build

    program = Program(
        shape=(4, 4, 2, 2),
        ops=(
            Conv(cout=4, groups=2, bias=False, src=0),
            Norm(act="leaky", eps=0.001, mean=0.0, var=(-7.0, -5.0), gamma="mixed", src=1),
            Conv(cout=4, k=3, padding=1, groups=2, src=0),
            Norm(kind="functional", eps=0.001, mean=30.0, var=(-5.0, -5.0), gamma="tiny", beta=5.0, src=3),
            Norm(act="abs", affine=False, eps=0.0, mean=0.1, var=(-4.0, 0.0), gamma="mixed", beta=0.0, src=0),
            Add(other=4, src=2),
            Add(other=5, src=6),
            Linear(fout=6, axis="channel"),
            Scale(op="add", value=0.001, src=8),
            Norm(kind="affine_module", mean=0.0, var=(-4.0, -3.0), beta=0.0),
            Norm(
                kind="functional",
                affine=False,
                track=False,
                eps=0.1,
                mean=30.0,
                var=(2.0, 3.0),
                gamma="negative",
                beta=0.0,
                src=4,
            ),
            Linear(fout=6, bias=False, axis="channel"),
        ),
        outputs=(1, 2, 5, 6, 7, 8, 9, 10),
        seed=65536,
        scale=0.01,
    )
    built = build(program)
    result = normfold.fold(built.model, built.inputs)
    assert any(f.where == "export" for f in result.folded)


def test_the_check_is_skipped_only_where_the_program_holds_the_modules_own_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fold() skips the module-vs-program run only for a plan that lands in both alike whose
    program reads the module's own tensors (shares_tensors); a program with a tensor of its own
    is checked, and a disagreement raises."""
    import normfold.folding as folding

    model = _net(0)
    result = normfold.fold(model, X)
    assert shares_tensors(result.model, result.program)
    other = normfold.fold(_net(3), X)
    assert not shares_tensors(result.model, other.program)  # another model's tensors
    copy_of_one = dict(result.program.state_dict)
    name = next(iter(copy_of_one))
    result.program.state_dict[name] = copy_of_one[name].clone()
    assert not shares_tensors(result.model, result.program)  # one tensor of its own is enough

    calls: list[list[str]] = []
    monkeypatch.setattr(folding, "check_artifacts_agree", lambda m, p, x, s: calls.append(list(s)))
    normfold.fold(model, X)
    assert calls == []  # shared tensors, no export-only fold: not run
    monkeypatch.setattr(folding, "shares_tensors", lambda m, p: False)
    normfold.fold(model, X)
    assert calls == [[]]  # a program with tensors of its own: run
