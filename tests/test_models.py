"""Tests for the reference model zoo (normfold.models)."""

from __future__ import annotations

import normfold.models as zoo
import pytest
import torch
from normfold.models import ZOO, Mixed, example_inputs, spec_of
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

NAMES = sorted(ZOO)


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
    (x,) = example_inputs(name)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == x.shape[0]
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
    gm = fx.symbolic_trace(model)
    inputs = example_inputs(name, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs(name: str) -> None:
    shape = ZOO[name].input_shape
    (x,) = example_inputs(name)
    assert tuple(x.shape) == shape
    (y,) = example_inputs(name, batch=5)
    assert tuple(y.shape) == (5, *shape[1:])
    assert torch.equal(example_inputs(name, seed=7)[0], example_inputs(name, seed=7)[0])
    assert not torch.equal(example_inputs(name, seed=7)[0], x)


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
