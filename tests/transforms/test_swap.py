"""swap_norms(): every target on every BatchNorm kind, group-count rules, exact frozen parity,
training at batch size 1, names and state_dict keys kept, the input untouched, exact records."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, state_bytes
from torch import nn

from normfold.errors import UsageError
from normfold.transforms.swap import (
    ChannelsLayerNorm,
    FrozenBatchNorm,
    NotSwapped,
    default_num_groups,
    swap_norms,
)

C = 12  # default groups: 6 (largest divisor <= 32 leaving 2 channels per group)


class Net(nn.Module):
    """A user's own class: producer -> norm -> relu -> head."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.norm = norm
        self.head = nn.Linear(C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.producer(x)))
        return self.head(h.flatten(2).mean(2) if h.dim() > 2 else h)


#: kind -> (norm class, producer, input shape)
KINDS = {
    "bn1d_nc": (nn.BatchNorm1d, lambda: nn.Linear(5, C), (4, 5)),
    "bn1d_ncl": (nn.BatchNorm1d, lambda: nn.Conv1d(3, C, 3), (4, 3, 9)),
    "bn2d": (nn.BatchNorm2d, lambda: nn.Conv2d(3, C, 3), (4, 3, 6, 5)),
    "bn3d": (nn.BatchNorm3d, lambda: nn.Conv3d(3, C, 2), (2, 3, 4, 4, 3)),
    "sync_nc": (nn.SyncBatchNorm, lambda: nn.Linear(5, C), (4, 5)),
    "sync_ncl": (nn.SyncBatchNorm, lambda: nn.Conv1d(3, C, 3), (4, 3, 9)),
    "sync2d": (nn.SyncBatchNorm, lambda: nn.Conv2d(3, C, 3), (4, 3, 6, 5)),
    "sync3d": (nn.SyncBatchNorm, lambda: nn.Conv3d(3, C, 2), (2, 3, 4, 4, 3)),
}
PLAIN = [k for k in KINDS if not k.startswith("sync")]
TARGETS = ["group", "layer", "frozen", "batch"]
BATCH_CLASS = {"sync_nc": nn.BatchNorm1d, "sync_ncl": nn.BatchNorm1d, "sync2d": nn.BatchNorm2d,
               "sync3d": nn.BatchNorm3d}  # fmt: skip


def _model(kind: str, seed: int = 0, **bn_kwargs) -> tuple[Net, torch.Tensor]:
    norm_cls, producer, shape = KINDS[kind]
    torch.manual_seed(seed)
    model = randomize_bn(Net(producer(), norm_cls(C, **bn_kwargs)), seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    return model, x


def _expected_type(to: str, kind: str) -> type[nn.Module] | None:
    if to == "group":
        return nn.GroupNorm
    if to == "layer":
        return nn.LayerNorm if kind.endswith("_nc") else ChannelsLayerNorm
    if to == "frozen":
        return FrozenBatchNorm
    return BATCH_CLASS.get(kind)  # None: a plain BN is left alone by "batch"


def _reference(to: str, h: torch.Tensor, groups: int | None, bn: nn.Module) -> torch.Tensor:
    """GroupNorm / LayerNorm over C, written out in float64 from the BN's gamma, beta, eps."""
    h = h.double()
    z = h.reshape(h.shape[0], groups, -1) if to == "group" else h
    dims = (2,) if to == "group" else (1,)
    z = (z - z.mean(dims, keepdim=True)) / (z.var(dims, unbiased=False, keepdim=True) + bn.eps).sqrt()
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return z.reshape(h.shape) * bn.weight.double().view(shape) + bn.bias.double().view(shape)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("to", TARGETS)
def test_every_target_on_every_kind(to: str, kind: str) -> None:
    model, x = _model(kind)
    bn, before = model.norm, state_bytes(model)
    result = swap_norms(model, to, example_inputs=x)
    assert state_bytes(model) == before and model.norm is bn  # inplace=False: input untouched
    new = result.model
    assert type(new) is Net and new is not model
    assert [n for n, _ in new.named_modules()] == [n for n, _ in model.named_modules()]
    expected = _expected_type(to, kind)
    if expected is None:
        assert result.skipped == (
            NotSwapped("norm", type(bn).__name__, "not_sync", "already a BatchNorm"
                       f"{KINDS[kind][0].__name__[-2:]}: to='batch' converts SyncBatchNorm only"),
        )  # fmt: skip
        assert result.swapped == () and result.drift is None and type(new.norm) is type(bn)
        return
    assert type(new.norm) is expected and result.skipped == ()
    (record,) = result.swapped
    groups = 6 if to == "group" else None
    assert (record.module, record.from_type, record.to_type) == ("norm", type(bn).__name__, expected.__name__)
    assert (record.num_features, record.num_groups, record.input_ranks) == (C, groups, (len(x.shape),))
    assert record.note is None and record.aliases == ()
    sd_old, sd_new = model.state_dict(), new.state_dict()
    for key in ("norm.weight", "norm.bias"):  # gamma/beta copied under the same keys
        assert torch.equal(sd_new[key], sd_old[key])
    assert new.norm.training == bn.training
    with torch.no_grad():
        ref, out = model.eval()(x), new.eval()(x)
    if to in ("frozen", "batch"):
        assert sd_new.keys() == sd_old.keys()
        assert all(torch.equal(sd_new[k], sd_old[k]) for k in sd_old)
        assert torch.equal(out, ref)
        assert (result.drift.max_rel_error, result.drift.cosine_similarity) == (0.0, 1.0)
    else:
        with torch.no_grad():
            h = new.producer(x)
            assert torch.allclose(new.norm(h).double(), _reference(to, h, groups, bn), rtol=1e-5, atol=1e-5)
        _check_drift(result.drift, ref, out)


def _check_drift(drift, ref: torch.Tensor, out: torch.Tensor) -> None:
    ref, out = ref.double(), out.double()
    rel = float((ref - out).abs().max() / ref.abs().max())
    cos = float(F.cosine_similarity(ref.reshape(-1), out.reshape(-1), dim=0))
    assert drift.outputs == 1
    assert drift.max_rel_error == pytest.approx(rel, rel=1e-9) and drift.max_rel_error > 1e-3
    assert drift.cosine_similarity == pytest.approx(cos, rel=1e-9, abs=1e-12)


# --- group counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (48, 24), (30, 15), (7, 1), (2, 1), (1, 1)])
def test_default_group_rule(channels: int, groups: int) -> None:
    assert default_num_groups(channels) == groups
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels)))
    result = swap_norms(model, "group")
    assert result.model[1].num_groups == groups and result.swapped[0].num_groups == groups


def test_default_group_rule_never_per_channel() -> None:
    for c in range(2, 300):
        g = default_num_groups(c)
        assert c % g == 0 and g <= 32 and c // g >= 2


@pytest.mark.parametrize(
    ("options", "groups"),
    [({"num_groups": 4}, 4), ({"num_groups": C}, C), ({"group_size": 3}, 4), ({"group_size": 1}, C)],
    ids=["num_groups", "num_groups_per_channel", "group_size", "group_size_per_channel"],
)
def test_group_options(options: dict, groups: int) -> None:
    model, x = _model("bn2d")
    result = swap_norms(model, "group", example_inputs=x, **options)
    assert (result.model.norm.num_groups, result.model.norm.num_channels) == (groups, C)
    assert result.swapped[0].num_groups == groups


@pytest.mark.parametrize(
    ("option", "value"), [("num_groups", 5), ("num_groups", 24), ("group_size", 5), ("group_size", 24)]
)
def test_impossible_groups_name_layer_and_channels(option: str, value: int) -> None:
    model = nn.Sequential()
    model.block = nn.Sequential()
    model.block.norm = nn.BatchNorm2d(C)
    with pytest.raises(UsageError) as e:
        swap_norms(model, "group", inplace=True, **{option: value})
    assert str(e.value) == (
        "swap_norms(to='group'): block.norm (BatchNorm2d) has C=12 channels, "
        f"not divisible by {option}={value}"
    )
    assert type(model.block.norm) is nn.BatchNorm2d  # raised before anything changed


@pytest.mark.parametrize(
    ("to", "options", "message"),
    [
        ("instance", {},
         "swap_norms(): to must be one of 'group', 'layer', 'frozen', 'batch', got 'instance'"),
        ("group", {"num_groups": 2, "group_size": 2},
         "swap_norms(): pass num_groups or group_size, not both (got num_groups=2, group_size=2)"),
        ("layer", {"num_groups": 2}, "swap_norms(): num_groups applies to to='group' only, got to='layer'"),
        ("frozen", {"group_size": 2}, "swap_norms(): group_size applies to to='group' only, got to='frozen'"),
        ("group", {"num_groups": 0}, "swap_norms(): num_groups must be a positive int, got 0"),
        ("group", {"num_groups": True}, "swap_norms(): num_groups must be a positive int, got True"),
        ("group", {"group_size": 2.0}, "swap_norms(): group_size must be a positive int, got 2.0"),
        ("group", {"trainable_affine": True},
         "swap_norms(): trainable_affine applies to to='frozen' only, got to='group'"),
        ("frozen", {"example_inputs": [1.0]},
         "example_inputs must be a tensor or a tuple of tensors, got list"),
    ],
)  # fmt: skip
def test_bad_requests(to: str, options: dict, message: str) -> None:
    with pytest.raises(UsageError) as e:
        swap_norms(nn.BatchNorm1d(4), to, **options)
    assert str(e.value) == message


def test_not_a_module() -> None:
    with pytest.raises(UsageError, match=r"^swap_norms\(\) expects a torch.nn.Module, got dict$"):
        swap_norms({}, "group")


# --- frozen ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", [False, True], ids=["buffers", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_is_bn_eval_exactly(kind: str, mode: str, dtype: torch.dtype, trainable: bool) -> None:
    # fp16 batch_norm runs on the CPU (torch >= 2.x), so fp16 is checked directly on CPU
    model, x = _model(kind)
    model, x = model.to(dtype), x.to(dtype)
    with torch.no_grad():
        ref = model.norm.eval()(x_mid := model.producer(x))
    result = swap_norms(model, "frozen", trainable_affine=trainable)
    frozen = result.model.norm.train(mode == "train")
    stats = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = frozen(x_mid)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert all(torch.equal(v, stats[k]) for k, v in frozen.state_dict().items())  # nothing updates


def test_frozen_fp16_scale_is_computed_wide() -> None:
    """fp16 state, eps below fp16's range: var + eps and the scale are not rounded to fp16."""
    bn = nn.BatchNorm1d(3, eps=1e-8).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1e-7, 6e4]))
        bn.running_mean.copy_(torch.tensor([0.5, -0.25, 3.0]))
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
    frozen = swap_norms(bn.half(), "frozen").model.train()
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 9.0]])
    ref = (x.double() - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
    ref = ref * bn.weight.double() + bn.bias.double()
    out = frozen(x.half())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_affine_parameters_or_buffers(trainable: bool) -> None:
    model, x = _model("bn2d")
    new = swap_norms(model, "frozen", trainable_affine=trainable).model
    frozen = new.norm
    assert new.state_dict().keys() == model.state_dict().keys()
    assert set(dict(frozen.named_parameters())) == ({"weight", "bias"} if trainable else set())
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(dict(frozen.named_buffers()))
    new.train()(x).sum().backward()
    assert new.producer.weight.grad is not None  # gradients flow through the frozen map
    if trainable:
        assert frozen.weight.grad is not None and frozen.bias.grad is not None
    else:
        assert not frozen.weight.requires_grad


def test_frozen_skips_bn_without_statistics_or_with_bad_ones() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    randomize_bn(model)
    with torch.no_grad():
        model[2].running_var[1] = -1.0
    result = swap_norms(model, "frozen")
    assert [s.module for s in result.swapped] == ["1"]
    assert result.skipped == (
        NotSwapped("0", "BatchNorm2d", "no_statistics",
                   "track_running_stats=False: no stored statistics to freeze"),
        NotSwapped("2", "BatchNorm2d", "bad_statistics",
                   "non-finite statistics or running_var + eps <= 0: frozen outputs not finite"),
    )  # fmt: skip
    # group/layer need no stored statistics: the same BN swaps
    assert [s.module for s in swap_norms(model, "group").swapped] == ["0", "1", "2"]


# --- training at batch size 1 -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bn1d_nc", "bn2d"])
@pytest.mark.parametrize("to", ["group", "layer", "frozen"])
def test_swapped_model_trains_at_batch_one(to: str, kind: str) -> None:
    model, x = _model(kind)
    x, y = x[:1], torch.tensor([[1.5]])
    if kind == "bn1d_nc":
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.train()(x)
    new = swap_norms(model, to).model.train()
    optimizer = torch.optim.SGD(new.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(new(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- layer and batch specifics -----------------------------------------------------------------------


def test_layer_without_example_inputs_notes_the_assumption() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.SyncBatchNorm(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4))
    result = swap_norms(randomize_bn(model), "layer")
    assert [type(m) for m in result.model] == [nn.LayerNorm, ChannelsLayerNorm, ChannelsLayerNorm,
                                               ChannelsLayerNorm]  # fmt: skip
    assert [s.note for s in result.swapped] == [
        "input rank unknown (no example_inputs): assumed (N, C), not (N, C, L)",
        "input rank unknown (no example_inputs): channels LayerNorm, exact for any rank",
        None,
        None,
    ]
    assert result.drift is None


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 7), (2, 5, 4, 3), (2, 5, 3, 2, 2)])
def test_channels_layer_norm_is_layer_norm_over_channels(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1
    layer = nn.LayerNorm(5, eps=1e-3)
    channels = ChannelsLayerNorm(5, eps=1e-3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        channels.load_state_dict(layer.state_dict())
        assert torch.equal(channels(x), layer(x.movedim(1, -1)).movedim(-1, 1))


def test_batch_needs_example_inputs() -> None:
    model, _ = _model("sync2d")
    with pytest.raises(UsageError) as e:
        swap_norms(model, "batch")
    assert str(e.value) == (
        "swap_norms(to='batch') needs example_inputs to choose BatchNorm1d/2d/3d for norm (SyncBatchNorm): "
        "its input rank is only known from a run"
    )


def test_batch_copies_every_setting() -> None:
    sync = nn.SyncBatchNorm(C, eps=1e-3, momentum=None, affine=False).train()
    with torch.no_grad():
        sync.num_batches_tracked.fill_(7)
    model = randomize_bn(Net(nn.Conv2d(3, C, 3), sync)).train()
    x = torch.randn(4, 3, 6, 5)
    bn = swap_norms(model, "batch", example_inputs=x).model.norm
    assert type(bn) is nn.BatchNorm2d and bn.training
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-3, None, False, True)
    assert int(bn.num_batches_tracked) == 7 and torch.equal(bn.running_var, sync.running_var)
    assert sync.training  # the original's flags are restored after the example run


class TwoInputs(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(a), self.norm(b)


def test_batch_skips_an_uncalled_sync_bn_and_rejects_mixed_ranks() -> None:
    model, x = _model("sync2d")
    model.spare = nn.SyncBatchNorm(C)
    result = swap_norms(model, "batch", example_inputs=x)
    assert result.skipped == (
        NotSwapped("spare", "SyncBatchNorm", "not_called",
                   "never called on example_inputs: its input rank (BatchNorm1d/2d/3d) is unknown"),
    )  # fmt: skip
    both = TwoInputs(nn.SyncBatchNorm(3))
    with pytest.raises(UsageError) as e:
        swap_norms(both, "batch", example_inputs=(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2, 2)))
    assert str(e.value) == (
        "swap_norms(to='batch'): norm (SyncBatchNorm) sees inputs of rank [4, 5]; one BatchNorm class "
        "needs ranks 2-3 (BatchNorm1d), 4 (BatchNorm2d) or 5 (BatchNorm3d)"
    )


# --- which modules swap, names, aliases, inplace --------------------------------------------------------


class BNAct(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("to", TARGETS)
def test_subclass_with_own_forward_is_kept(to: str) -> None:
    model = randomize_bn(Net(nn.Conv2d(3, C, 3), BNAct(C)))
    result = swap_norms(model, to, example_inputs=torch.randn(2, 3, 5, 5))
    assert result.skipped == (
        NotSwapped("norm", "BNAct", "custom_forward",
                   "BNAct overrides forward: a swap would lose its extra behaviour"),
    )  # fmt: skip
    assert type(result.model.norm) is BNAct and result.swapped == ()


def test_subclass_without_own_forward_swaps_and_lazy_uninitialized_is_kept() -> None:
    model = nn.Sequential(PlainSubclass(4), nn.LazyBatchNorm2d())
    result = swap_norms(model, "group", inplace=True)  # an uninitialized lazy module cannot be deep-copied
    assert [(s.module, s.from_type, s.to_type) for s in result.swapped] == [
        ("0", "PlainSubclass", "GroupNorm")
    ]
    assert result.skipped == (
        NotSwapped("1", "LazyBatchNorm2d", "uninitialized",
                   "LazyBatchNorm2d has uninitialized parameters: run the model once before swapping"),
    )  # fmt: skip


@pytest.mark.parametrize("to", ["group", "layer", "frozen"])
def test_module_registered_twice_is_replaced_under_both_names(to: str) -> None:
    model, x = _model("bn2d")
    model.alias = model.norm
    result = swap_norms(model, to, example_inputs=x)
    assert result.model.alias is result.model.norm and type(result.model.norm) is not nn.BatchNorm2d
    assert [(s.module, s.aliases) for s in result.swapped] == [("norm", ("alias",))]
    assert result.model.state_dict().keys() >= {"norm.weight", "alias.weight", "norm.bias", "alias.bias"}


def test_inplace_replaces_in_the_model_and_shares_parameters() -> None:
    model, x = _model("bn2d")
    gamma = model.norm.weight
    result = swap_norms(model, "group", inplace=True, example_inputs=x)
    assert result.model is model and type(model.norm) is nn.GroupNorm
    assert model.norm.weight is gamma  # an optimizer built before the swap still holds it


def test_a_bare_batchnorm_is_returned_as_its_replacement() -> None:
    result = swap_norms(randomize_bn(nn.BatchNorm2d(4)), "layer")
    assert type(result.model) is ChannelsLayerNorm and result.swapped[0].module == ""


def test_uncopyable_model_asks_for_inplace() -> None:
    model, _ = _model("bn2d")
    model.lock = threading.Lock()
    with pytest.raises(
        UsageError, match=r"^could not copy Net \(pass inplace=True to change it in place\): "
    ):
        swap_norms(model, "frozen")
    assert type(swap_norms(model, "frozen", inplace=True).model.norm) is FrozenBatchNorm


def test_to_dict_is_json() -> None:
    model, x = _model("bn1d_ncl")
    model.extra = BNAct(2)
    data = swap_norms(model, "group", example_inputs=x).to_dict()
    json.dumps(data)
    assert data["model_type"] == "Net" and data["to"] == "group"
    assert data["swapped"] == [
        {"module": "norm", "from_type": "BatchNorm1d", "to_type": "GroupNorm", "num_features": C,
         "num_groups": 6, "input_ranks": (3,), "aliases": (), "note": None}
    ]  # fmt: skip
    assert [s["code"] for s in data["skipped"]] == ["custom_forward"]
    assert set(data["drift"]) == {"max_rel_error", "cosine_similarity", "outputs"}
