"""Applying a plan: the exported program (new bias placeholders, pruned norm inputs, renamed outputs)
and the eager module (Identity, identity-map BN subclasses, export-only folds, new parameters)."""

from __future__ import annotations

import pytest
import torch
from helpers import Pair, bn_ops, exported, randomize_bn
from torch import nn
from torch.export.graph_signature import InputKind

import normfold
from normfold.engine.apply import eager_plan
from normfold.engine.capture import CaptureOptions, capture
from normfold.engine.plan import plan


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def test_program_gets_a_bias_parameter_and_loses_the_norm_inputs():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    x = _x((2, 3, 6, 6))
    program = normfold.fold(model, x).program
    params = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    buffers = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.BUFFER}
    assert params == {"0.weight", "0.bias"} and buffers == set()
    assert set(program.state_dict) == {"0.weight", "0.bias"}
    [conv] = [n for n in program.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert conv.args[2].name == "p_0_bias"
    # the output now returns the conv: the signature names it
    assert [s.arg.name for s in program.graph_signature.output_specs] == [conv.name]
    assert normfold.verify(model, exported(program), x).max_rel_error <= 1e-5


def test_program_parameters_are_new_tensors_the_model_keeps_its_own():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = model[0].weight.detach().clone()
    result = normfold.fold(model, _x((2, 3, 6, 6)), inplace=True)
    assert result.program.state_dict["0.weight"] is not before
    assert torch.equal(result.program.state_dict["0.weight"], result.model[0].weight)
    assert not torch.equal(result.model[0].weight, before)


class Functional(nn.Module):
    """F.batch_norm on a module's buffers, in the parent's forward: foldable in the export only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        bn = self.bn
        return torch.nn.functional.batch_norm(
            self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )


def test_eager_plan_is_pure_and_names_why_a_fold_is_export_only():
    model = randomize_bn(Functional())
    x = _x((2, 3, 6, 6))
    cap = capture(model, (x,), CaptureOptions())
    the_plan = plan(cap)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = eager_plan(the_plan, cap, model)
    assert eager.folds == [] and eager.identity == set() and eager.neutral == set()
    assert list(eager.export_only.values()) == [
        "the norm is a functional call in forward code, not a norm module"
    ]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_export_only_fold_leaves_the_eager_model_exact_and_the_export_folded():
    model = randomize_bn(Functional())
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    [f] = result.folded
    assert (f.norm, f.into, f.where) == ("bn", "conv", "export")
    assert torch.equal(result.model(x), model(x))
    assert bn_ops(result.program) == 0
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5


class NoBiasSubclass(nn.Conv2d):
    """A conv subclass with its own forward that still adds ``self.bias`` (as timm's Conv2dSame)."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class IgnoresBias(nn.Conv2d):
    def forward(self, x):
        return nn.functional.conv2d(x, self.weight)


def test_bias_is_added_to_a_subclass_only_when_its_forward_uses_it():
    for cls, where in ((NoBiasSubclass, "both"), (IgnoresBias, "export")):
        model = randomize_bn(nn.Sequential(cls(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
        x = _x((2, 3, 6, 6))
        result = normfold.fold(model, x)
        assert [f.where for f in result.folded] == [where], cls
        if where == "export":
            assert (
                result.folded[0].note
                == "folded in the export only: 0 has no bias parameter to receive the norm's shift"
            )
        for candidate in (result.model, exported(result.program)):
            assert normfold.verify(model, candidate, x).max_rel_error <= 1e-5


def test_probing_a_subclass_leaves_the_global_rng_alone():
    """The probe of a subclass's own forward draws from a private generator: a user's seeded
    pipeline draws the same numbers after fold() as without it."""
    model = randomize_bn(nn.Sequential(NoBiasSubclass(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    x = _x((2, 3, 6, 6))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    result = normfold.fold(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert [f.where for f in result.folded] == ["both"]  # the probe ran and accepted the bias


def test_new_bias_of_a_module_whose_name_is_not_an_identifier():
    model = nn.Sequential()
    model.add_module("block1-0", nn.Conv2d(3, 4, 3, bias=False))  # torchvision RegNet names its blocks so
    model.add_module("bn", nn.BatchNorm2d(4))
    model = randomize_bn(model)
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert "block1-0.bias" in result.program.state_dict
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5


class FunctionalThenModule(nn.Module):
    """conv -> F.batch_norm in forward (export only) -> a BatchNorm module folding through it."""

    def __init__(self):
        super().__init__()
        self.conv, self.inner, self.outer = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        i = self.inner
        y = torch.nn.functional.batch_norm(self.conv(x), i.running_mean, i.running_var, i.weight, i.bias)
        return self.outer(y)


def test_a_fold_through_an_export_only_fold_is_export_only_too():
    model = randomize_bn(FunctionalThenModule())
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert [(f.norm, f.where, f.note) for f in result.folded] == [
        (
            "inner",
            "export",
            "folded in the export only: the norm is a functional call in forward code, not a norm module",
        ),
        (
            "outer",
            "export",
            "folded in the export only: it passes through batch_norm, which stays in the eager model",
        ),
    ]
    assert torch.equal(result.model(x), model(x))  # the eager model is untouched, conv included
    assert bn_ops(result.program) == 0
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5


class ReadsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.running_var.mean()  # reads the norm's state directly


def test_a_norm_whose_state_is_read_elsewhere_stays_in_the_eager_model():
    model = randomize_bn(ReadsBuffer())
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    [f] = [f for f in result.folded if f.norm == "bn"]
    assert (
        f.where == "export" and f.note == "folded in the export only: mean reads bn's state outside the norm"
    )
    assert torch.equal(result.model(x), model(x))
    assert normfold.verify(model, exported(result.program), x).max_rel_error <= 1e-5


class GainNorm(nn.Module):
    """A hand-written affine norm module: ``x * gain + bias``."""

    def __init__(self, c: int, seed: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gain = nn.Parameter(torch.rand(c, 1, generator=gen) + 0.5)
        self.bias = nn.Parameter(torch.randn(c, 1, generator=gen))

    def forward(self, x):
        return x * self.gain + self.bias


class StdNorm(nn.Module):
    """The tutorials' ``(x - mean) / std * g + b`` as a module of its own."""

    def __init__(self, c: int, seed: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", torch.randn(c, 1, generator=gen) + 0.5)
        self.register_buffer("var", torch.rand(c, 1, generator=gen) * 2 + 0.2)
        self.g = nn.Parameter(torch.rand(c, 1, generator=gen) + 0.5)
        self.b = nn.Parameter(torch.randn(c, 1, generator=gen))

    def forward(self, x):
        return (x - self.mean) / torch.sqrt(self.var + 1e-5) * self.g + self.b


class UpsampledNorm(nn.Module):
    """Conv1d -> nearest upsample -> a hand-written norm module -> ``* 0.5`` in the caller."""

    def __init__(self, norm: nn.Module, upsample: bool) -> None:
        super().__init__()
        self.conv, self.norm, self.upsample = nn.Conv1d(3, 4, 3), norm, upsample

    def forward(self, x):
        h = self.conv(x)
        if self.upsample:
            h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        return self.norm(h) * 0.5


@pytest.mark.parametrize("upsample", [True, False], ids=["upsample", "direct"])
@pytest.mark.parametrize("norm", [GainNorm, StdNorm])
def test_a_norm_module_becomes_identity_only_with_its_own_ops(norm, upsample):
    """The caller's ``* 0.5`` right after the module is folded too, but it is code in the caller's
    forward: the module becomes nn.Identity with exactly its own arithmetic folded, the ``* 0.5``
    is folded in the export only (it used to be folded into the conv of the eager module as well,
    while its op stayed there: the eager model was scaled twice)."""
    model = UpsampledNorm(norm(4), upsample).eval()
    x = _x((2, 3, 10))
    result = normfold.fold(model, x)
    first = "sub" if norm is StdNorm else "mul"
    assert [(f.norm, f.into, f.where) for f in result.folded] == [
        (f"norm:{first}", "conv", "both"),
        ("forward:mul_1", "conv", "export"),
    ]
    assert isinstance(result.model.norm, nn.Identity)
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


class NormWithHelper(nn.Module):
    """A hand-written norm module that also holds a conv its caller runs (``self.norm.aux``)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.g = nn.Parameter(torch.rand(4, 1, 1, generator=gen) + 0.5)
        self.b = nn.Parameter(torch.randn(4, 1, 1, generator=gen))
        self.aux = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * self.g + self.b


class CallsTheHelper(nn.Module):
    def __init__(self, read_only: bool) -> None:
        super().__init__()
        self.conv, self.norm, self.read_only = nn.Conv2d(3, 4, 3), NormWithHelper(), read_only

    def forward(self, x):
        h = self.norm(self.conv(x))
        if self.read_only:  # reads the submodule's weight, runs no module
            return h * self.norm.aux.weight.mean()
        return self.norm.aux(h)


@pytest.mark.parametrize("read_only", [False, True], ids=["called", "read"])
def test_a_norm_module_whose_submodule_is_used_elsewhere_stays(read_only):
    """nn.Identity in its place would take ``norm.aux`` away from the caller (the eager model
    raised AttributeError): the fold is export only."""
    model = CallsTheHelper(read_only).eval()
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    [fold] = [f for f in result.folded if f.norm == "norm:mul"]
    assert fold.where == "export" and "reads norm's state outside the norm" in fold.note
    assert isinstance(result.model.norm, NormWithHelper)
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


class TappedNorm(NormWithHelper):
    """The norm's output goes through ``self.tap`` (an nn.Identity a user hooked to record it)."""

    def __init__(self) -> None:
        super().__init__()
        self.tap = nn.Identity()

    def forward(self, x):
        return self.tap(x * self.g + self.b)


def test_a_norm_module_whose_submodule_has_hooks_stays_in_the_eager_model():
    model = Pair(nn.Conv2d(3, 4, 3), TappedNorm()).eval()
    seen = []
    model.norm.tap.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert [(f.where, f.note) for f in result.folded] == [
        ("export", "folded in the export only: norm has forward hooks that would be lost")
    ]
    seen.clear()
    result.model(x)
    assert seen == [(2, 4, 4, 4)]  # the copy's hook still runs
    for candidate in (result.model, exported(result.program)):
        assert normfold.verify(model, candidate, x).passed
