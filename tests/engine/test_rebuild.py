"""Eager = export: a module whose norm folds but whose forward runs more (a BatchNorm subclass with
its own activation) is rebuilt to run only the rest; paths through a sliced container are the
registered modules' (a forward iterating ``self.model[:-1]``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import exported, randomize_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine.apply import eager_plan
from normfold.engine.capture import Capture, CaptureOptions, Constants, capture
from normfold.engine.plan import plan
from normfold.engine.rebuild import Recipe, Remainder, Step, rebuilt_modules
from normfold.engine.recipes import CallIndex, recipe
from normfold.io.roundtrip import load_folded, save_folded

BN_OPS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default}


def bn_op_count(module_or_program: nn.Module | torch.export.ExportedProgram, x: torch.Tensor) -> int:
    """Batch-norm ops a module runs (counted on its export) or a program holds."""
    program = module_or_program
    if isinstance(program, nn.Module):
        program = torch.export.export(program, (x,), strict=False)
    return sum(n.target in BN_OPS for n in program.graph.nodes)


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in small: the norm, then ``self.drop`` and ``self.act``, in its own
    ``forward`` (not ``super().forward``)."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class FloorBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward applies its own ops after the norm: a clamp and a learned floor."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.floor = nn.Parameter(torch.linspace(-0.5, 0.5, channels).view(channels, 1, 1))

    def forward(self, x):
        return torch.maximum(F.hardtanh(super().forward(x), -2.0, 3.0), self.floor)


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct(6, nn.PReLU(6))
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = BatchNormAct(6, nn.SiLU(inplace=True))
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.bn3 = FloorBatchNorm(4)

    def forward(self, x):
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


def _act_net() -> nn.Module:
    model = randomize_bn(ActNet())
    with torch.no_grad():
        model.bn1.act.weight.copy_(torch.linspace(0.05, 0.4, 6))  # not PReLU's default 0.25 everywhere
    return model


def test_batchnorm_subclasses_with_an_activation_lose_their_norm_op_in_the_eager_module():
    model, x = _act_net(), _x((2, 3, 8, 8))
    result = normfold.fold(model, x)
    assert {f.norm: f.where for f in result.folded} == {"bn1": "both", "bn2": "both", "bn3": "both"}
    assert bn_op_count(model, x) == 3
    assert bn_op_count(result.model, x) == bn_op_count(result.program, x) == 0  # gone, not neutralized
    assert not [n for n, m in result.model.named_modules() if isinstance(m, _BatchNorm)]
    assert rebuilt_modules(result.model) == {
        "bn1": "BatchNormAct rebuilt, runs: act",
        "bn2": "BatchNormAct rebuilt, runs: act",
        "bn3": "FloorBatchNorm rebuilt, runs: aten.hardtanh.default -> aten.maximum.default",
    }
    assert isinstance(result.model.bn1.act, nn.PReLU) and result.model.bn1.act is not model.bn1.act
    assert type(result.model) is ActNet
    # the module paths and the names of the parameters that stay are the user's
    assert {n for n, _ in result.model.named_modules()} == {n for n, _ in model.named_modules()}
    assert set(result.model.state_dict()) == {
        "conv1.weight", "conv1.bias", "bn1.act.weight", "conv2.weight", "conv2.bias", "conv3.weight",
        "conv3.bias", "bn3.floor",
    }  # fmt: skip
    assert torch.equal(result.model.bn1.act.weight, model.bn1.act.weight)
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()
        assert report.max_rel_error <= 5e-6
    with torch.no_grad():  # the original is untouched (its in-place SiLU ran on a new tensor)
        assert bn_op_count(model, x) == 3 and isinstance(model.bn2, BatchNormAct)


def test_the_eager_plan_names_the_rebuilt_modules_and_their_steps():
    model, x = _act_net(), _x((2, 3, 8, 8))
    cap = capture(model, (x,), CaptureOptions())
    eager = eager_plan(plan(cap), cap, model)
    assert eager.neutral == set() and eager.identity == set()
    assert eager.rebuilt == {
        "bn1": Recipe("BatchNormAct", (Step(module="act", args=({"$": 0},)),)),
        "bn2": Recipe("BatchNormAct", (Step(module="act", args=({"$": 0},)),)),
        "bn3": Recipe(
            "FloorBatchNorm",
            (
                Step(op="hardtanh.default", args=({"$": 0}, -2.0, 3.0)),
                Step(op="maximum.default", args=({"$": 1}, {"$attr": "floor"})),
            ),
        ),
    }


def test_a_rebuilt_module_called_twice_runs_the_same_steps_on_both_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = BatchNormAct(4, nn.ReLU())
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.head(y) + y

    model, x = randomize_bn(Twice()), _x((2, 3, 6, 6))
    result = normfold.fold(model, x)
    assert bn_op_count(result.model, x) == bn_op_count(result.program, x) == 0
    assert isinstance(result.model.bn, Remainder)
    assert normfold.verify(model, result.model, x).passed


def _bn_removed(cap: Capture) -> dict:
    """The capture's one batch_norm op, as if folded: its output becomes its input."""
    [bn] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    return {bn.name: bn.args[0]}


def test_an_in_place_step_on_an_input_other_ops_read_is_not_rebuilt():
    class Shortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = BatchNormAct(4, nn.ReLU(inplace=True))

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    model, x = randomize_bn(Shortcut()), _x((2, 3, 6, 6))
    cap = capture(model, (x,), CaptureOptions())
    # as if the norm folded: the in-place ReLU would then write to h, which the sum reads
    got = recipe(CallIndex(cap), "bn", model.bn, _bn_removed(cap), Constants(cap).is_const)
    assert got == "bn would change its input in place (relu_), which other ops read"
    model.bn.act.inplace = False
    cap = capture(model, (x,), CaptureOptions())
    got = recipe(CallIndex(cap), "bn", model.bn, _bn_removed(cap), Constants(cap).is_const)
    assert got == Recipe("BatchNormAct", (Step(module="act", args=({"$": 0},)),))


class Swish(nn.BatchNorm2d):
    def forward(self, x):  # the norm's output is read twice: steps on values, not only a chain
        y = super().forward(x)
        return y * torch.sigmoid(y)


class Scaled(nn.BatchNorm2d):
    def forward(self, x, gain):  # a second tensor input: nothing to rebuild it from
        return torch.relu(super().forward(x)) * gain


class TwoNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), Swish(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), Scaled(4)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(h), h.mean((1, 2, 3), keepdim=True))


def test_steps_may_read_any_earlier_value_and_a_module_with_two_inputs_keeps_a_neutral_norm():
    model, x = randomize_bn(TwoNorms()), _x((2, 3, 8, 8))
    cap = capture(model, (x,), CaptureOptions())
    eager = eager_plan(plan(cap), cap, model)
    assert [f.unit.name for f in eager.folds] == ["bn1", "bn2"]
    assert eager.rebuilt == {
        "bn1": Recipe(
            "Swish",
            (Step(op="sigmoid.default", args=({"$": 0},)), Step(op="mul.Tensor", args=({"$": 0}, {"$": 1}))),
        )
    }
    assert eager.neutral == {"bn2"}
    assert eager.not_rebuilt == {"bn2": "bn2 takes 2 tensor inputs (one expected)"}
    result = normfold.fold(model, x)
    assert bn_op_count(result.model, x) == 1 and bn_op_count(result.program, x) == 0  # the known gap
    assert normfold.verify(model, result.model, x).passed


class Block(nn.Module):
    def __init__(self, c: int, shared: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.shared = shared  # one module in every block: export then records sliced paths

    def forward(self, x):
        return self.shared(torch.relu(self.bn(self.conv(x))))


class Sliced(nn.Module):
    def __init__(self, container: type[nn.Module], start: int) -> None:
        super().__init__()
        shared = nn.Conv2d(4, 4, 1)
        self.model = (
            container([Block(4, shared) for _ in range(4)])
            if container is nn.ModuleList
            else (container(*[Block(4, shared) for _ in range(4)]))
        )
        self.start = start

    def forward(self, x):
        for m in self.model[self.start : -1]:
            x = m(x)
        return x


@pytest.mark.parametrize(("container", "start"), [(nn.Sequential, 0), (nn.Sequential, 1), (nn.ModuleList, 1)])
def test_norms_in_blocks_of_a_sliced_container_fold_in_the_eager_module(container, start):
    model, x = randomize_bn(Sliced(container, start)), _x((2, 4, 6, 6))
    cap = capture(model, (x,), CaptureOptions())
    recorded = {v[0] for n in cap.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()}
    assert any("slice(" in p for p in recorded), "export recorded real paths: this test proves nothing"
    result = normfold.fold(model, x)
    blocks = [f"model.{i}.bn" for i in range(start, 3)]
    assert sorted((f.norm, f.into, f.where) for f in result.folded) == [
        (b, b.replace(".bn", ".conv"), "both") for b in blocks
    ]
    assert bn_op_count(result.model, x) == bn_op_count(result.program, x) == 0
    assert all(isinstance(result.model.get_submodule(b), nn.Identity) for b in blocks)
    assert isinstance(result.model.model[3].bn, nn.BatchNorm2d)  # never called: left alone
    report = normfold.verify(model, result.model, x)
    assert report.passed and report.max_rel_error <= 5e-6


def test_sliced_paths_resolve_to_registered_modules():
    model = Sliced(nn.ModuleList, 1).eval()
    cap: Capture = capture(model, (_x((2, 4, 6, 6)),), CaptureOptions())
    assert cap.canonical("model.slice(1, -1, None).0.bn") == "model.1.bn"
    assert cap.canonical("model.slice(1, -1, None).1.conv") == "model.2.conv"
    assert cap.canonical("model.slice(1, -1, None).1.shared") == "model.0.shared"  # its first name
    assert cap.canonical("model.slice(1, -1, None).7.bn") == "model.slice(1, -1, None).7.bn"  # no such


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_model_with_rebuilt_modules_loads_back_into_its_class(tmp_path: Path, suffix: str) -> None:
    model, x = _act_net(), _x((2, 3, 8, 8))
    result = normfold.fold(model, x)
    assert rebuilt_modules(result.model), "nothing rebuilt: the round trip would prove nothing"
    path = save_folded(result.model, tmp_path / f"folded{suffix}")
    fresh = ActNet()  # other random weights and default statistics: every value comes from the file
    loaded = load_folded(fresh, path)
    assert rebuilt_modules(loaded) == rebuilt_modules(result.model)
    assert sorted(loaded.state_dict()) == sorted(result.model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert bn_op_count(loaded, x) == 0


def test_a_manifest_naming_an_op_outside_aten_is_refused(tmp_path: Path) -> None:
    model, x = _act_net(), _x((2, 3, 8, 8))
    result = normfold.fold(model, x)
    result.model.bn3.recipe = Recipe("FloorBatchNorm", (Step(op="system.default", args=({"$": 0},)),))
    path = save_folded(result.model, tmp_path / "bad.pt")
    with pytest.raises(normfold.errors.LoadError, match="the folded weights do not fit ActNet"):
        load_folded(ActNet(), path)


class FlatBatchNorm(nn.BatchNorm2d):
    def forward(self, x):  # sizes read off the input: a capture with static shapes records literals
        return torch.relu(super().forward(x)).reshape(x.shape[0], -1)


def test_a_module_whose_rest_takes_sizes_is_not_rebuilt_so_other_batch_sizes_still_run():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), FlatBatchNorm(4)))
    result = normfold.fold(model, _x((2, 3, 6, 6)), dynamic_batch=False)
    assert [(f.norm, f.where) for f in result.folded] == [("1", "both")]
    assert not rebuilt_modules(result.model)  # its norm part is the identity map instead
    other = _x((3, 3, 6, 6), seed=1)
    assert result.model(other).shape == (3, 64)
    assert normfold.verify(model, result.model, other).passed
    cap = capture(model, (_x((2, 3, 6, 6)),), CaptureOptions(dynamic_batch=False))
    got = recipe(CallIndex(cap), "1", model[1], _bn_removed(cap), Constants(cap).is_const)
    assert got == "1 runs reshape, whose shape the capture may have fixed to this input"


class LayerScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.2, 0.7, c).view(c, 1, 1))

    def forward(self, x):
        return x * self.gamma


class Mixer(nn.Module):
    """A sum of branches: an identity BatchNorm, a 1x1 and a 3x3 depthwise conv-BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(c)
        self.small = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.large = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.skip(x) + self.small(x) + self.large(x)


class WeightedBlock(nn.Module):
    """FastViT's RepMixer with an activation after the sum: its forward subtracts and scales."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.mixer = Mixer(c)
        self.layer_scale = LayerScale(c)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(x + self.layer_scale(self.mixer(x) - self.norm(x)))


def _weighted_net() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 1), WeightedBlock(8), WeightedBlock(8)), seed=4)


def test_a_block_that_subtracts_and_scales_branches_is_rebuilt_around_the_merged_conv():
    model, x = _weighted_net(), _x((2, 3, 8, 8))
    result = normfold.fold(model, x, reparameterize=True)
    assert [(m.block, m.into, m.where) for m in result.merged] == [
        ("1", "1.mixer.large.0", "both"),
        ("2", "2.mixer.large.0", "both"),
    ]
    assert bn_op_count(model, x) == 8
    assert bn_op_count(result.model, x) == bn_op_count(result.program, x) == 0
    assert rebuilt_modules(result.model) == {
        "1": "WeightedBlock rebuilt, runs: mixer.large -> act",
        "2": "WeightedBlock rebuilt, runs: mixer.large -> act",
    }
    block = result.model[1]
    assert isinstance(block.act, nn.GELU) and isinstance(block.mixer.large, nn.Conv2d)  # the merged conv
    for gone in (block.norm, block.mixer.skip, block.mixer.small, block.layer_scale):
        assert isinstance(gone, nn.Identity)  # nothing runs them any more
    assert sorted(result.model.state_dict()) == [
        "0.bias", "0.weight", "1.mixer.large.bias", "1.mixer.large.weight", "2.mixer.large.bias",
        "2.mixer.large.weight",
    ]  # fmt: skip
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


def test_a_rebuilt_weighted_block_loads_back_into_its_class(tmp_path: Path) -> None:
    model, x = _weighted_net(), _x((2, 3, 8, 8))
    result = normfold.fold(model, x, reparameterize=True)
    path = save_folded(result.model, tmp_path / "w.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 1), WeightedBlock(8), WeightedBlock(8))
    loaded = load_folded(fresh, path)
    assert rebuilt_modules(loaded) == rebuilt_modules(result.model)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_the_fold_report_lists_the_rebuilt_modules(tmp_path: Path) -> None:
    import json

    from normfold.pipeline import WriteOptions, fold_and_export

    report = tmp_path / "r.json"
    fold_and_export(_act_net(), None, inputs=_x((2, 3, 8, 8)), write=WriteOptions(report=report))
    assert json.loads(report.read_text())["rebuilt_modules"] == {
        "bn1": "BatchNormAct rebuilt, runs: act",
        "bn2": "BatchNormAct rebuilt, runs: act",
        "bn3": "FloorBatchNorm rebuilt, runs: aten.hardtanh.default -> aten.maximum.default",
    }


@pytest.mark.parametrize("net", ["act", "weighted"])
def test_a_rebuilt_model_pickles_scripts_and_traces(net: str) -> None:
    import pickle

    model, x = (_act_net(), _x((2, 3, 8, 8))) if net == "act" else (_weighted_net(), _x((2, 3, 8, 8)))
    folded = normfold.fold(model, x, reparameterize=True).model
    assert rebuilt_modules(folded), "nothing rebuilt: this test would prove nothing"
    with torch.no_grad():
        expected = folded(x)
        assert torch.equal(pickle.loads(pickle.dumps(folded))(x), expected)
        assert torch.equal(torch.jit.script(folded)(x), expected)
        assert torch.equal(torch.jit.trace(folded, (x,))(x), expected)


class FrozenNormAct(nn.Module):
    """timm's ``FrozenBatchNormAct2d`` in small: buffers, the map written in ``forward``, then
    its activation child (not a ``_BatchNorm``: the plan sees affine arithmetic)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("weight", torch.rand(c, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(c, generator=g) * 0.3)
        self.register_buffer("running_mean", torch.randn(c, generator=g) + 0.5)
        self.register_buffer("running_var", torch.rand(c, generator=g) * 2 + 0.2)
        self.act = nn.Hardswish()

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


class ScaledBlock(nn.Module):
    """A block whose own forward runs more than the folded layer scale: it stays whole."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.3, 0.9, c).view(1, c, 1, 1))

    def forward(self, x):
        return x + self.conv(x) * self.gamma


def _affine_ops(module_or_program: nn.Module | torch.export.ExportedProgram, x: torch.Tensor) -> int:
    program = module_or_program
    if isinstance(program, nn.Module):
        program = torch.export.export(program, (x,), strict=False)
    ops = {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}
    return sum(n.target in ops and not n.name.startswith("_") for n in program.graph.nodes)


def test_a_hand_written_norm_module_with_an_activation_child_is_rebuilt_a_block_is_not():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), FrozenNormAct(6), ScaledBlock(6)).eval()
    x = _x((2, 3, 8, 8))
    result = normfold.fold(model, x, reparameterize=False)
    assert {f.norm: f.where for f in result.folded} == {"1:mul_2": "both", "2:mul_3": "export"}
    assert rebuilt_modules(result.model) == {"1": "FrozenNormAct rebuilt, runs: act"}
    assert set(result.model.state_dict()) == {"0.weight", "0.bias", "2.conv.weight", "2.conv.bias", "2.gamma"}
    # the block's layer scale is folded in the export only: the eager module runs one mul more
    assert _affine_ops(result.model, x) == _affine_ops(result.program, x) + 1 == 2
    assert normfold.verify(model, result.model, x).passed
