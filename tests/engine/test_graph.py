"""Capture and graph reading: schema-bound arguments, dynamic batch with a static fallback, constants."""

from __future__ import annotations

import torch
from torch import nn

from normfold.engine.capture import CaptureOptions, Constants, bind, capture, set_arg, shape
from normfold.engine.plan import plan


def test_capture_has_a_dynamic_batch_and_maps_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    cap = capture(model, (torch.randn(2, 3, 6, 6),), CaptureOptions())
    [conv] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert isinstance(conv.meta["val"].shape[0], torch.SymInt)
    assert shape(conv) == (2, 4, 4, 4)  # symbolic sizes read through their example value
    args = bind(conv)
    assert cap.state_of(args["weight"]) == "0.weight" and args["groups"] == 1 and args["stride"] == [1, 1]
    assert cap.kind[args["weight"].name] == "parameter"


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)  # hard-codes the batch size


def test_a_model_that_fixes_its_batch_is_captured_with_static_shapes():
    cap = capture(FixedBatch(), (torch.randn(2, 3),), CaptureOptions())
    [x] = [n for n in cap.graph.nodes if n.op == "placeholder"]
    assert x.meta["val"].shape == (2, 3) and not isinstance(x.meta["val"].shape[0], torch.SymInt)


def test_set_arg_fills_skipped_positional_defaults():
    model = nn.Conv2d(3, 4, 3, bias=False).eval()
    cap = capture(model, (torch.randn(2, 3, 6, 6),), CaptureOptions(dynamic_batch=False))
    [conv] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    weight = bind(conv)["weight"]
    set_arg(conv, "bias", weight)  # any node: only the argument position matters here
    assert conv.args[2] is weight and bind(conv)["stride"] == [1, 1]


class Inline(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("var", torch.tensor([0.25, 4.0]))

    def forward(self, x):
        return x / torch.sqrt(self.var[:, None] + 1e-5)


def test_constants_are_evaluated_in_float64():
    cap = capture(Inline(), (torch.randn(2, 2, 3),), CaptureOptions())
    consts = Constants(cap)
    [sqrt] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.sqrt.default]
    value = consts.value(sqrt)
    assert value.dtype == torch.float64
    expected = torch.sqrt(torch.tensor([0.25, 4.0], dtype=torch.float64)[:, None] + 1e-5)
    assert torch.equal(value, expected)
    [div] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.div.Tensor]
    assert consts.value(div) is None and not consts.is_const[div]


class RandomScale(nn.Module):
    """``conv(x) * (g + rand_like(g))``: a scale drawn anew at every call, no constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.g = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        return self.conv(x) * (self.g + torch.rand_like(self.g))


def test_a_random_draw_from_parameters_is_no_constant():
    """Evaluating it would draw from the global RNG and bake one draw into the weights."""
    model = RandomScale().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cap = capture(model, (x,), CaptureOptions())
    torch.manual_seed(7)
    state = torch.get_rng_state()
    consts = Constants(cap)
    [draw] = [n for n in cap.graph.nodes if n.target is torch.ops.aten.rand_like.default]
    assert not consts.is_const[draw] and not consts.is_const[next(iter(draw.users))]
    the_plan = plan(cap)
    assert torch.equal(torch.get_rng_state(), state)
    assert the_plan.folds == []  # conv(x) * (g + draw) is no affine map of the conv output
