"""Tests for the reference model zoo (normfold.models)."""

from __future__ import annotations

import inspect

import normfold.models as zoo
import pytest
import torch
import torch.nn.functional as F
from normfold.models import ZOO, BatchNormAct2d, CustomNorm2d, LinearNorm, Mixed, example_inputs, spec_of
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

NAMES = sorted(ZOO)
NOT_FX_TRACEABLE = {"same_pad"}  # shape-dependent Python in forward; torch.export handles it


@pytest.fixture(scope="module", params=NAMES)
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    name = request.param
    return name, ZOO[name].factory()


def _tracked_bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def test_registry_names_are_factory_specs() -> None:
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.factory.__name__ == name
        assert getattr(zoo, name) is entry.factory  # "normfold.models:<name>" resolves
        assert entry.input_shape[0] >= 2
        assert entry.description


def test_builds_in_eval_mode_and_runs(built: tuple[str, nn.Module]) -> None:
    name, model = built
    assert not any(m.training for m in model.modules())
    xs = example_inputs(name)
    with torch.no_grad():
        out = model(*xs)
    assert out.shape[0] == xs[0].shape[0]
    assert torch.isfinite(out).all()


def test_every_parameter_reaches_the_output(built: tuple[str, nn.Module]) -> None:
    name, model = built
    model.zero_grad()
    model(*example_inputs(name)).square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} does not affect the output"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name: str) -> None:
    factory = ZOO[name].factory
    a, b, c = factory(seed=3).state_dict(), factory(seed=3).state_dict(), factory(seed=4).state_dict()
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_untouched(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    ZOO[name].factory()
    example_inputs(name)
    assert torch.equal(torch.get_rng_state(), before)


def test_batchnorm_state_is_realistic(built: tuple[str, nn.Module]) -> None:
    name, model = built
    bns = _tracked_bns(model)
    assert bns, f"{name} has no BatchNorm with running statistics"
    for bn_name, bn in bns:
        assert bn.running_mean.abs().max() > 0.05, f"{name}.{bn_name}: running_mean ~ 0"
        assert (bn.running_var - 1).abs().max() > 0.05, f"{name}.{bn_name}: running_var ~ 1"
        assert (bn.running_var > 0).all()
        assert not torch.all(bn.weight == 1), f"{name}.{bn_name}: weight all ones"
        assert not torch.all(bn.bias == 0), f"{name}.{bn_name}: bias all zeros"
        assert bn.momentum == 0.1  # restored after calibration


def test_symbolic_trace(built: tuple[str, nn.Module]) -> None:
    name, model = built
    if name in NOT_FX_TRACEABLE:
        with pytest.raises(fx.proxy.TraceError, match="control flow"):
            fx.symbolic_trace(model)
        return
    gm = fx.symbolic_trace(model)
    inputs = example_inputs(name, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


def test_torch_export(built: tuple[str, nn.Module]) -> None:
    name, model = built
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = example_inputs(name)
    program = torch.export.export(model, inputs, strict=False)
    batch = torch.export.Dim("batch", min=1, max=2**20)  # as normfold.io.export does by default
    shapes = tuple({0: batch} for _ in inputs)
    dynamic = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model(*inputs), rtol=0, atol=0)
        other = example_inputs(name, batch=3, seed=1)
        torch.testing.assert_close(dynamic.module()(*other), model(*other), rtol=0, atol=0)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # export changed nothing


class _BatchNormInputs(TorchFunctionMode):
    """Record (input, running_mean, running_var) of every eval-mode ``F.batch_norm`` call.

    Module BatchNorms, ``BatchNormAct2d`` and bare ``F.batch_norm`` calls all end up here.
    """

    _signature = inspect.signature(F.batch_norm)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = self._signature.bind(*args, **kwargs).arguments
            if not call.get("training", False) and call.get("running_mean") is not None:
                self.calls.append((call["input"], call["running_mean"].clone(), call["running_var"].clone()))
        return func(*args, **kwargs)


def _assert_stats_match(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, what: str) -> None:
    """Channel (axis 1) statistics of ``x`` are close to ``mean``/``var``: they were measured.

    Loose on purpose: a ``(N, C)`` norm is calibrated on only 48 samples, so its mean is off by
    ~0.15 std per channel (up to ~0.5 std over 128 channels) and its variance by ~20%.
    Defaults (0 / 1) or made-up statistics are typically off by far more.
    """
    dims = [d for d in range(x.ndim) if d != 1]
    std = var.sqrt()
    assert ((x.mean(dims) - mean).abs() <= 0.75 * std + 1e-4).all(), f"{what}: mean does not match the data"
    ratio = x.var(dims) / var
    assert ((ratio > 1 / 3) & (ratio < 3)).all(), f"{what}: var does not match the data"


def test_batchnorm_statistics_match_the_data(built: tuple[str, nn.Module]) -> None:
    """Running statistics are those of the activations a fresh batch produces, not merely non-default."""
    name, model = built
    xs = example_inputs(name, batch=256, seed=5)
    with torch.no_grad(), _BatchNormInputs() as mode:
        model(*xs)
    assert len(mode.calls) == len(_tracked_bns(model)) > 0  # each tracked BatchNorm runs once
    for i, (inp, mean, var) in enumerate(mode.calls):
        _assert_stats_match(inp, mean, var, f"{name}: F.batch_norm call {i}")


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs(name: str) -> None:
    shapes = ZOO[name].input_shapes
    xs = example_inputs(name)
    assert [tuple(x.shape) for x in xs] == list(shapes)
    ys = example_inputs(name, batch=5)
    assert [tuple(y.shape) for y in ys] == [(5, *shape[1:]) for shape in shapes]
    assert torch.equal(example_inputs(name, seed=7)[0], example_inputs(name, seed=7)[0])
    assert not torch.equal(example_inputs(name, seed=7)[0], xs[0])


def test_example_inputs_unknown_name_lists_names() -> None:
    with pytest.raises(KeyError) as info:
        example_inputs("no_such_model")
    message = str(info.value)
    assert "no_such_model" in message
    assert all(name in message for name in ZOO)


def test_spec_of() -> None:
    assert spec_of(zoo.resnet) is ZOO["resnet"]
    assert spec_of(zoo.resnet).input_shape == (2, 3, 32, 32)
    assert spec_of(lambda: nn.Linear(1, 1)) is None


def test_mixed_structure() -> None:
    model = zoo.mixed()
    assert isinstance(model, Mixed)
    gm = fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]

    # shared is called twice; only the first call site feeds bn_shared
    shared_calls = [n for n in calls if n.target == "shared"]
    assert len(shared_calls) == 2
    assert [u.target for u in shared_calls[0].users] == ["bn_shared"]
    assert "bn_shared" not in [u.target for u in shared_calls[1].users]

    assert nodes["bn_a"].args[0].target == "conv_a"
    assert not model.bn_nostats.track_running_stats and model.bn_nostats.running_mean is None
    assert nodes["bn_after_relu"].args[0].target == "relu"
    assert [u.target for u in nodes["bn_after_relu"].users] == ["conv_after"]
    assert len(nodes["conv_two_users"].users) == 2

    # fc_seq's features match bn_seq's channels, but the BN normalizes the token axis
    assert model.fc_seq.out_features == model.bn_seq.num_features == 16
    assert nodes["bn_seq"].args[0].target == "fc_seq"
    seen: list[tuple[int, ...]] = []
    model.fc_seq.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        model(*example_inputs("mixed"))
    assert seen == [(2, 16, 16)]

    for bn_name in ("bn_a", "bn_shared", "bn_nostats", "bn_after_relu", "bn_two_users", "bn_seq"):
        assert isinstance(getattr(model, bn_name), nn.BatchNorm1d | nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------
# structure of the newer models: the pattern each one is meant to exercise is really there


def _fx_nodes(model: nn.Module) -> dict[str, fx.Node]:
    return {n.name: n for n in fx.symbolic_trace(model).graph.nodes}


def _first_inputs(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The first positional input each of ``modules`` receives on ``example_inputs(name)``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, key=key: seen.setdefault(key, args[0]))
        for key, m in modules.items()
    ]
    with torch.no_grad():
        model(*example_inputs(name))
    for h in handles:
        h.remove()
    return seen


def test_levit_linear_norms_normalize_the_linear_features() -> None:
    model = zoo.levit()
    linear_norms = {n: m for n, m in model.named_modules() if isinstance(m, LinearNorm)}
    assert sorted(linear_norms) == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    inputs = _first_inputs(model, "levit", {n: m.bn for n, m in linear_norms.items()})
    for n, m in linear_norms.items():
        assert m.linear.bias is None
        out = m.linear.out_features
        assert m.bn.num_features == out
        assert inputs[n].shape == (2 * 64, out)  # (N * L, C_out): channel axis = Linear features
    # BN_Linear head: BatchNorm1d on the pooled (N, C), consumed only by the Linear
    nodes = _fx_nodes(model)
    assert nodes["head_bn"].args[0].target == "mean"
    assert [u.target for u in nodes["head_bn"].users] == ["head"]
    assert isinstance(model.head_bn, nn.BatchNorm1d)


def test_inception_next_norm_feeds_a_1x1_conv() -> None:
    model = zoo.inception_next()
    nodes = _fx_nodes(model)
    for i, block in enumerate(model.blocks):
        norm = nodes[f"blocks_{i}_norm"]
        assert norm.args[0].target is torch.cat  # the mixer's concat, first slice untouched
        assert [u.target for u in norm.users] == [f"blocks.{i}.fc1"]
        fc1 = block.fc1
        assert fc1.kernel_size == (1, 1) and fc1.padding == (0, 0) and fc1.bias is not None
        assert block.token_mixer.split_sizes == (20, 4, 4, 4)
        assert block.gamma.min() >= 0.5  # not a near-identity layer scale
    assert nodes["stem_norm"].args[0].target == "stem"


def test_bn_head_norm_sits_between_relu_and_pool() -> None:
    model = zoo.bn_head()
    nodes = _fx_nodes(model)
    head = nodes["head_norm"]
    assert head.args[0].target == "features.5"
    assert isinstance(model.features[5], nn.ReLU)
    assert [u.target for u in head.users] == ["pool"]
    assert [u.target for u in nodes["pool"].users] == ["flatten"]
    assert [u.target for u in nodes["flatten"].users] == ["fc"]


def test_same_pad_is_exportable_but_not_fx_traceable() -> None:
    model = zoo.same_pad()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    program = torch.export.export(model, example_inputs("same_pad"), strict=False)
    pads = [n.args[1] for n in program.graph.nodes if n.op == "call_function" and "pad" in str(n.target)]
    assert pads == [[0, 1, 0, 1], [1, 2, 1, 2]]  # asymmetric SAME padding; the 1x1 conv pads nothing
    assert all(m.padding == (0, 0) for m in (model.stem, model.depthwise, model.project))


def test_functional_calls_no_submodule() -> None:
    model = zoo.functional()
    graph = fx.symbolic_trace(model).graph
    assert not [n for n in graph.nodes if n.op == "call_module"]
    norms = [n for n in graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    assert [n.args[1].target for n in norms] == ["bn1.running_mean", "bn2.running_mean", "bn_fc.running_mean"]
    assert all(n.kwargs["training"] is False for n in norms)  # fx passes weight .. eps as kwargs
    assert [n.args[0].target for n in norms] == [F.conv2d, F.conv2d, F.linear]


def test_bn_act_norms_apply_their_activation() -> None:
    model = zoo.bn_act()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    assert sorted(norms) == ["bn_depthwise", "bn_project", "bn_stem"]
    assert all(isinstance(m, nn.BatchNorm2d) for m in norms.values())
    assert isinstance(model.bn_stem.act, nn.ReLU) and isinstance(model.bn_depthwise.act, nn.SiLU)
    assert isinstance(model.bn_depthwise.drop, nn.Dropout) and isinstance(model.bn_project.act, nn.Identity)
    x = torch.randn(4, 16, 5, 5)
    with torch.no_grad():
        for m in norms.values():
            plain = nn.BatchNorm2d.forward(m, x)
            torch.testing.assert_close(m(x), m.act(plain))  # the affine part is a plain eval BatchNorm
        assert not torch.equal(model.bn_stem(x), nn.BatchNorm2d.forward(model.bn_stem, x))  # ReLU applied


def test_custom_norms_have_realistic_measured_state() -> None:
    model = zoo.custom_bn()
    assert [n for n, _ in _tracked_bns(model)] == ["bn1"]  # the custom norms are no _BatchNorm
    norm = model.norm2
    assert isinstance(norm, CustomNorm2d) and norm.eps == 1e-5
    inline = {"gain": model.bn_gain, "bias": model.bn_bias, "mean": model.bn_mean, "std": model.bn_std}
    assert model.bn_gain.shape == model.bn_bias.shape == (1, 32, 1, 1)
    assert model.bn_mean.shape == model.bn_std.shape == (32,)
    for what, gain, bias in (("norm2", norm.gain, norm.bias), ("inline", inline["gain"], inline["bias"])):
        assert not torch.all(gain == 1) and (gain >= 0.5).all() and (gain <= 1.5).all(), what
        assert not torch.all(bias == 0), what
    assert norm.mean.abs().max() > 0.05 and (norm.var - 1).abs().max() > 0.05 and (norm.var > 0).all()
    assert model.bn_mean.abs().max() > 0.05 and (model.bn_std - 1).abs().max() > 0.05
    assert (model.bn_std > 0).all()

    # the statistics are those of the data: measure the inputs on a fresh batch
    seen: dict[str, torch.Tensor] = {}
    handles = [
        norm.register_forward_pre_hook(lambda m, args: seen.setdefault("norm2", args[0])),
        model.conv3.register_forward_hook(lambda m, args, out: seen.setdefault("inline", out)),
    ]
    with torch.no_grad():
        model(*example_inputs("custom_bn", batch=256, seed=5))
    for h in handles:
        h.remove()
    _assert_stats_match(seen["norm2"], norm.mean, norm.var, "norm2")
    _assert_stats_match(seen["inline"], model.bn_mean, model.bn_std.square() - 1e-5, "inline")

    # both compute an eval BatchNorm
    x = torch.randn(4, 32, 5, 5)
    with torch.no_grad():
        want = F.batch_norm(x, norm.mean, norm.var, norm.gain, norm.bias, False, 0.0, norm.eps)
        torch.testing.assert_close(norm(x), want)


def test_mixed_kernel_concats_under_one_norm() -> None:
    model = zoo.mixed_kernel()
    assert model.mix.splits == [12, 10, 10]
    assert [c.kernel_size for c in model.mix.convs] == [(3, 3), (5, 5), (7, 7)]
    assert all(c.groups == c.in_channels == c.out_channels for c in model.mix.convs)
    nodes = _fx_nodes(model)
    cats = [n for n in nodes.values() if n.target is torch.cat]
    assert len(cats) == 2
    mix_cat, branch_cat = cats
    assert [a.target for a in mix_cat.args[0]] == ["mix.convs.0", "mix.convs.1", "mix.convs.2"]
    assert [a.target for a in branch_cat.args[0]] == ["branch1", "branch3", "branch5"]
    assert [u.target for u in mix_cat.users] == ["bn_mix"]
    assert [u.target for u in branch_cat.users] == ["bn_branches"]
    assert {a.args[0].name for a in branch_cat.args[0]} == {"add"}  # the three branches share one input
    by_module = {n.target: n for n in nodes.values() if n.op == "call_module"}
    for conv in ("mix.convs.0", "mix.convs.1", "mix.convs.2", "branch1", "branch3", "branch5"):
        assert len(by_module[conv].users) == 1, conv  # each conv feeds only the concat
