"""Structural reparameterization (normfold/engine/reparam.py): parallel branches summed into one conv."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from helpers import ZOO_MERGED, bn_ops, exported
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from normfold.models import ZOO, example_inputs
from normfold.models.zoo import _conv_bn, calibrate
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine.reparam_eager import MergedBranch
from normfold.io.export import export_onnx


def _ops(program: torch.export.ExportedProgram, names: tuple[str, ...]) -> int:
    return sum(
        n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in names
        for n in program.graph.nodes
    )


def _build(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """``model`` in eval mode with measured BatchNorm statistics and random affine parameters."""
    torch.manual_seed(seed)
    for p in model.parameters():  # realistic, not the defaults: every branch contributes
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
    calibrate(model, [shape], torch.Generator().manual_seed(seed))
    return model.eval()


def _assert_parity(model: nn.Module, result: normfold.FoldResult, x: torch.Tensor) -> None:
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()


# --- the zoo: every block ends as one conv --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO_MERGED))
def test_zoo_blocks_become_one_conv_each(name):
    model = ZOO[name].factory()
    x = example_inputs(name)
    result = normfold.reparameterize(model, x)
    blocks = ZOO_MERGED[name]
    assert {m.block for m in result.merged} == blocks
    assert all(m.where == "both" and m.note is None for m in result.merged)
    assert result.not_merged == [] and result.skipped == []
    assert result.replan_folds == 0
    assert bn_ops(result.program) == 0
    assert _ops(result.program, ("add", "add_")) == 0
    assert _ops(result.program, ("conv2d", "convolution")) == len(blocks)  # one conv per block
    assert not any(isinstance(m, _BatchNorm) for m in result.model.modules())
    branches = sum(len(m.branches) for m in result.merged)
    merged = sum(isinstance(m, MergedBranch) for m in result.model.modules())
    identity = sum(b == "identity" for m in result.merged for b in m.branches)
    assert merged == branches - len(blocks) - identity
    _assert_parity(model, result, x)


@pytest.mark.parametrize("name", sorted(ZOO_MERGED))
def test_zoo_onnx_has_no_batchnorm_and_no_add(tmp_path, name):
    model = ZOO[name].factory()
    x = example_inputs(name)
    result = normfold.reparameterize(model, x)
    path = tmp_path / f"{name}.onnx"
    export_onnx(result.model, x, path, program=result.program)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 0
    assert ops["Conv"] == len(ZOO_MERGED[name])


@pytest.mark.parametrize("name", sorted(ZOO_MERGED))
def test_without_reparameterize_the_blocks_stay(name):
    model = ZOO[name].factory()
    result = normfold.fold(model, example_inputs(name), reparameterize=False)
    assert result.merged == [] and result.not_merged == []
    assert _ops(result.program, ("add", "add_")) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_repvgg_parity_in_other_dtypes(dtype):
    model = ZOO["repvgg"].factory().to(dtype)
    x = example_inputs("repvgg")[0].to(dtype)
    result = normfold.reparameterize(model, x)
    assert len(result.merged) == len(ZOO_MERGED["repvgg"])
    assert result.program.state_dict["stages.1.rbr_dense.0.weight"].dtype == dtype
    _assert_parity(model, result, x)


def test_dynamic_batch_survives_the_merge():
    model = ZOO["mobileone"].factory()
    result = normfold.reparameterize(model, example_inputs("mobileone"))
    x5 = example_inputs("mobileone", batch=5)[0]
    with torch.no_grad():
        expected = model.double()(x5.double())
        model.float()
        got = result.program.module()(x5)
    assert got.shape == (5, 10)
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)


# --- the branch kinds ------------------------------------------------------------------------------


class PoolScaleBlock(nn.Module):
    """A 3x3 conv-BN, an avg-pool-BN and a per-channel scale of the input (``x * gamma``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense = _conv_bn(c, c, 3, 1, 1)
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.pool(x) + x * self.gamma[:, None, None])


def test_avg_pool_and_scale_branches_merge_in_the_export():
    model = _build(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PoolScaleBlock(), PoolScaleBlock()), (2, 3, 16, 16)
    )
    x = torch.randn(2, 3, 16, 16)
    result = normfold.reparameterize(model, x)
    assert [m.branches[1:] for m in result.merged] == [("1.pool.0 (avg_pool 3x3)", "1 (scale)"),
                                                       ("2.pool.0 (avg_pool 3x3)", "2 (scale)")]  # fmt: skip
    # the scale is written in forward code: nothing to swap in the module, so the export only
    assert all(
        m.where == "export" and "scale branch is not a module" in (m.note or "") for m in result.merged
    )
    merged_norms = {f.norm: f.pattern for f in result.folded if f.pattern.startswith("reparam")}
    assert merged_norms == {"1.pool.1": "reparam-bn", "1:mul": "reparam-affine",
                            "2.pool.1": "reparam-bn", "2:mul_1": "reparam-affine"}  # fmt: skip
    assert bn_ops(result.program) == 0 and _ops(result.program, ("add", "mul", "avg_pool2d")) == 0
    _assert_parity(model, result, x)


class BareIdentity(nn.Module):
    """``x + bn(conv(x))``: the identity branch is the input itself, added in forward."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = _conv_bn(c, c, 3, 1, 1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


def test_bare_identity_merges_in_the_export_only_and_the_module_stays_exact():
    model = _build(nn.Sequential(nn.Conv2d(3, 8, 1), BareIdentity()), (2, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    result = normfold.reparameterize(model, x)
    (merge,) = result.merged
    assert merge.branches == ("identity", "1.conv.0 (conv 3x3)") and merge.where == "export"
    assert (
        merge.note
        == "merged in the export only: the identity branch is the block's input itself, added in forward code"
    )
    assert isinstance(result.model[1].conv[0], nn.Conv2d)  # folded with its BN, not merged
    assert _ops(result.program, ("add",)) == 0
    _assert_parity(model, result, x)


class MobileOneNoAct(nn.Module):
    """timm's ``MobileOneBlock(use_act=False)``: identity BN, a 1x1 and ``convs`` kxk depthwise conv-BNs."""

    def __init__(self, c: int, convs: int, scale: bool = True) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(c)
        self.scale = _conv_bn(c, c, 1, 1, 0, c) if scale else None
        self.convs = nn.ModuleList(_conv_bn(c, c, 3, 1, 1, c) for _ in range(convs))

    def forward(self, x):
        out = self.skip(x) if self.scale is None else self.scale(x) + self.skip(x)
        for conv in self.convs:
            out = out + conv(x)
        return out


class RepMixer(nn.Module):
    """FastViT's token mixer: ``x + layer_scale * (mixer(x) - norm(x))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = MobileOneNoAct(c, 0, scale=False)
        self.mixer = MobileOneNoAct(c, 1)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) * 0.5 + 0.1)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


def test_fastvit_repmixer_difference_and_layer_scale_merge_in_both():
    model = _build(nn.Sequential(nn.Conv2d(3, 8, 1), RepMixer(8), nn.ReLU(), RepMixer(8)), (2, 3, 10, 10))
    x = torch.randn(2, 3, 10, 10)
    result = normfold.reparameterize(model, x)
    assert [m.block for m in result.merged] == ["1", "3"] and result.not_merged == []
    # the blocks' own forward subtracts and scales: the module is rebuilt to run the merged conv
    assert all(m.where == "both" and m.note is None for m in result.merged)
    assert type(result.model[1]).__name__ == "Remainder"
    assert result.merged[0].branches == ("identity", "1.mixer.scale.0 (conv 1x1)", "1.mixer.skip (norm)",
                                         "1.mixer.convs.0.0 (conv 3x3)", "1.norm.skip (norm)")  # fmt: skip
    patterns = {f.norm: f.pattern for f in result.folded if f.pattern.startswith("reparam")}
    expected = {f"{b}.{n}.skip": "reparam-bn" for b in "13" for n in ("mixer", "norm")}
    assert patterns == {**expected, "1:mul": "reparam-affine", "3:mul_1": "reparam-affine"}
    assert result.skipped == []
    assert bn_ops(result.program) == 0 and _ops(result.program, ("add", "sub", "mul")) == 0
    assert _ops(result.program, ("conv2d", "convolution")) == 3
    _assert_parity(model, result, x)


class Branches(nn.Module):
    """Two conv-BN branches of one input (and an identity BN when ``identity``), summed."""

    def __init__(self, a: nn.Module, b: nn.Module, identity: int = 0, expose: bool = False) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.identity = nn.BatchNorm2d(identity) if identity else None
        self.expose = expose

    def forward(self, x):
        b = self.b(x)
        y = self.a(x) + b + (self.identity(x) if self.identity is not None else 0)
        return (y, b.mean()) if self.expose else y


_WINDOWS = "do not see the same windows"


@pytest.mark.parametrize(
    ("a", "b", "size", "code", "reason"),
    [  # conv_bn(cin, cout, kernel, stride, padding[, groups]) x 2, input side: same output shapes
        (
            (8, 8, 5, 1, 0),
            (8, 8, 1, 2, 0),
            9,
            "reparam_stride",
            "conv 1x1 has stride (2, 2), conv 5x5 stride (1, 1)",
        ),
        ((8, 8, 5, 3, 1), (8, 8, 1, 3, 0), 9, "reparam_padding", f"(padding (1, 1)) {_WINDOWS}"),  # off by 1
        ((8, 8, 4, 2, 1), (8, 8, 1, 2, 0), 8, "reparam_padding", f"(padding (1, 1)) {_WINDOWS}"),  # odd gap
        (
            (8, 8, 3, 1, 1, 2),
            (8, 8, 1, 1, 0),
            8,
            "reparam_groups",
            "conv 1x1 has groups=1, conv 3x3 groups=2",
        ),
    ],
)
def test_blocks_that_cannot_merge_stay_with_their_code(a, b, size, code, reason):
    model = _build(nn.Sequential(Branches(_conv_bn(*a), _conv_bn(*b))), (2, 8, size, size))
    x = torch.randn(2, 8, size, size)
    result = normfold.reparameterize(model, x)
    assert result.merged == []
    (kept,) = result.not_merged
    assert (kept.block, kept.code) == ("0", code)
    assert reason in kept.reason
    assert bn_ops(result.program) == 0  # the branches' own BNs still fold into their convs
    _assert_parity(model, result, x)


def test_a_branch_used_elsewhere_keeps_the_block_and_its_identity_norm():
    model = _build(Branches(_conv_bn(8, 8, 3, 1, 1), _conv_bn(8, 8, 1, 1, 0), identity=8, expose=True),
                   (2, 8, 8, 8))  # fmt: skip
    x = torch.randn(2, 8, 8, 8)
    result = normfold.reparameterize(model, x)
    assert result.merged == []
    (kept,) = result.not_merged
    assert kept.code == "multiple_users"
    assert kept.reason.startswith("b.0 (conv2d) output is also used outside the sum")
    assert [(s.norm, s.code) for s in result.skipped] == [("identity", "after_input")]  # the model input
    _assert_parity(model, result, x)


def test_a_shared_branch_weight_keeps_the_block():
    conv = _conv_bn(8, 8, 3, 1, 1)
    blocks = [Branches(conv, _conv_bn(8, 8, 1, 1, 0)) for _ in range(2)]
    model = _build(nn.Sequential(*blocks), (2, 8, 8, 8))
    x = torch.randn(2, 8, 8, 8)
    result = normfold.reparameterize(model, x)
    assert result.merged == []
    assert {m.code for m in result.not_merged} == {"shared_producer"}
    _assert_parity(model, result, x)


def test_a_residual_add_of_different_tensors_is_no_block():
    model = ZOO["resnet"].factory()
    result = normfold.reparameterize(model, example_inputs("resnet"))
    assert result.merged == [] and result.not_merged == []


def test_merged_model_saves_and_loads(tmp_path):
    model = ZOO["repvgg"].factory()
    x = example_inputs("repvgg")
    result = normfold.reparameterize(model, x)
    path = tmp_path / "m.pt"
    torch.save(result.model.state_dict(), path)
    again = normfold.reparameterize(ZOO["repvgg"].factory(), x).model
    again.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x[0]), result.model(x[0]))


# --- random blocks -----------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma[:, None, None]


class RandomBlock(nn.Module):
    """Branches of one input, summed left to right, then ReLU."""

    def __init__(self, c: int, specs: list[tuple], stride: int, groups: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_random_branch(c, spec, stride, groups) for spec in specs)

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return torch.relu(out)


def _random_branch(c: int, spec: tuple, stride: int, groups: int) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        (kh, kw), bias = spec[1], spec[2]
        conv = nn.Conv2d(c, c, (kh, kw), stride, ((kh - 1) // 2, (kw - 1) // 2), groups=groups, bias=bias)
        return nn.Sequential(conv, nn.BatchNorm2d(c))
    return {
        "bn": lambda: nn.BatchNorm2d(c),
        "pool": lambda: nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c)),
        "identity": nn.Identity,
        "scale": lambda: Scale(c),
    }[kind]()


@st.composite
def random_blocks(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    c, stride, groups = (
        draw(st.sampled_from([4, 6])),
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from([1, 2])),
    )
    big = draw(st.sampled_from([3, 5]))
    sizes = [(big, big), (1, 1), (1, 3), (3, 1), (3, 3)]
    convs = [("conv", (big, big), draw(st.booleans()))]  # the covering kernel
    convs += [("conv", k, draw(st.booleans())) for k in draw(st.lists(st.sampled_from(sizes), max_size=3))]
    kinds = st.sampled_from(["bn", "pool", "identity", "scale"])
    others = [(o,) for o in draw(st.lists(kinds, max_size=3))] if stride == 1 else []
    if len(convs) + len(others) < 2:
        convs.append(("conv", (1, 1), True))
    specs = draw(st.permutations(convs + others))
    model = nn.Sequential(nn.Conv2d(3, c, 1), RandomBlock(c, specs, stride, groups))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(seed))
    return _build(model, (2, 3, 9, 9), seed), x


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(random_blocks())
def test_random_blocks_merge_into_one_conv_with_parity(case):
    model, x = case
    result = normfold.reparameterize(model, x)
    assert len(result.merged) == 1 and result.not_merged == []
    assert bn_ops(result.program) == 0 and _ops(result.program, ("add", "avg_pool2d", "mul")) == 0
    assert _ops(result.program, ("conv2d", "convolution")) == 2  # the stem and the block
    _assert_parity(model, result, x)


class NdBlock(nn.Module):
    """A RepVGG block in 1, 2 or 3 spatial dims: 3-kernel conv-BN + 1-kernel conv-BN + identity BN."""

    def __init__(self, dims: int, c: int = 6) -> None:
        super().__init__()
        conv, bn = {
            1: (nn.Conv1d, nn.BatchNorm1d),
            2: (nn.Conv2d, nn.BatchNorm2d),
            3: (nn.Conv3d, nn.BatchNorm3d),
        }[dims]
        self.dense = nn.Sequential(conv(c, c, 3, padding=1, bias=False), bn(c))
        self.one = nn.Sequential(conv(c, c, 1, bias=False), bn(c))
        self.identity = bn(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_blocks_merge_in_every_spatial_rank(dims):
    shape = (2, 6, *([7] * dims))
    model = _build(nn.Sequential(NdBlock(dims), NdBlock(dims)), shape)
    x = torch.randn(shape)
    result = normfold.reparameterize(model, x)
    assert [m.where for m in result.merged] == ["both", "both"]
    assert bn_ops(result.program) == 0 and _ops(result.program, ("add",)) == 0
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    assert type(result.model[0].dense) is conv and isinstance(result.model[0].one, MergedBranch)
    _assert_parity(model, result, x)


class _GhostLike(nn.Module):
    """timm's RepGhost module without the ReLU after its primary conv, inside a residual add:
    ``x1 = bn_p(conv_p(x))``, ``x2 = bn_c(dw(x1)) + bn_f(x1)``, ``out = x2 + bn_s(conv_s(x))``."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.fusion_bn = nn.BatchNorm2d(c)
        self.shortcut = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return self.cheap(x1) + self.fusion_bn(x1) + self.shortcut(x)


def test_a_block_summed_into_a_residual_add_merges_on_its_own() -> None:
    """The residual add's summands do not branch from one tensor, so the outer sum is no block;
    its inner sum (RepGhost's ``cheap(x1) + fusion_bn(x1)``) is one, and used to be skipped with
    it: repghostnet_050 kept 16 ``fusion_bn`` (``multiple_users``). It merges now, in both."""
    model = _build(_GhostLike(), (4, 6, 8, 8))
    x = torch.randn(2, 6, 8, 8)
    result = normfold.reparameterize(model, x)
    assert [(m.block, m.into, m.where) for m in result.merged] == [("forward", "cheap.0", "both")]
    assert result.skipped == [] and result.not_merged == []
    assert bn_ops(result.program) == 0 and bn_ops(torch.export.export(result.model, (x,))) == 0
    assert isinstance(result.model.fusion_bn, MergedBranch)
    _assert_parity(model, result, x)


class _GhostThenNorm(_GhostLike):
    """:class:`_GhostLike` with a BatchNorm after the residual add."""

    def __init__(self, c: int = 6) -> None:
        super().__init__(c)
        self.post = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(super().forward(x))


def test_a_fold_into_a_merged_branch_module_lands_in_the_export_only() -> None:
    """The merge swaps the branch module ``cheap`` (conv + BN) for one conv in the module, while the
    program keeps the name ``cheap.0.weight``; the next round's fold of ``post`` into that weight
    raised ``AttributeError: Conv2d has no attribute '0'``. It lands in the export only, said so."""
    model = _build(_GhostThenNorm(), (4, 6, 8, 8))
    x = torch.randn(2, 6, 8, 8)
    result = normfold.reparameterize(model, x)
    assert [(m.into, m.where) for m in result.merged] == [("cheap.0", "both")]
    post = next(f for f in result.folded if f.norm == "post")
    assert post.where == "export" and bn_ops(result.program) == 0
    _assert_parity(model, result, x)
