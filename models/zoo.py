"""Reference model zoo: small, deterministic models that exercise every fold pattern.

Each factory builds a tiny model in eval mode whose BatchNorms carry *realistic* state: running
statistics measured on real (shifted, scaled) batches rather than the ``0``/``1`` defaults, and
randomized affine parameters. With default statistics every BatchNorm is nearly the identity and a
broken fold would still pass a parity check; with these it cannot.

Factories are keyword-only, seeded and side-effect free: the same ``seed`` gives a byte-identical
``state_dict`` and the caller's global RNG state is left untouched. Their names match the
:data:`ZOO` registry, so ``"normfold.models:<name>"`` works as a factory spec, and
:func:`example_inputs` gives seeded inputs of each entry's ``input_shape``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

M = TypeVar("M", bound=nn.Module)

CALIBRATION_BATCH = 16
CALIBRATION_PASSES = 3


# --------------------------------------------------------------------------------------------
# models


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus a (possibly downsampling) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """Stem conv-bn-relu, three basic blocks (the middle one strided), pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: pointwise expand, depthwise 3x3, (grouped) pointwise projection."""

    def __init__(
        self, cin: int, cout: int, *, expand: int, stride: int = 1, dilation: int = 1, proj_groups: int = 1
    ) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(hidden)
        self.act_expand = nn.ReLU6()
        self.depthwise = nn.Conv2d(
            hidden, hidden, 3, stride=stride, padding=dilation, dilation=dilation, groups=hidden, bias=False
        )
        self.bn_depthwise = nn.BatchNorm2d(hidden)
        self.act_depthwise = nn.ReLU6()
        self.project = nn.Conv2d(hidden, cout, 1, groups=proj_groups, bias=False)
        self.bn_project = nn.BatchNorm2d(cout)
        self.use_residual = stride == 1 and cin == cout  # fixed at build time: fx-traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act_expand(self.bn_expand(self.expand(x)))
        out = self.act_depthwise(self.bn_depthwise(self.depthwise(out)))
        out = self.bn_project(self.project(out))
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """Reflect-padded stem, three inverted residual blocks (grouped projections, one dilated)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.act_stem = nn.ReLU6()
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, expand=2),
            InvertedResidual(16, 24, expand=4, stride=2, proj_groups=2),
            InvertedResidual(24, 24, expand=4, dilation=2, proj_groups=4),
        )
        self.head = nn.Conv2d(24, 64, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(64)
        self.act_head = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_stem(self.bn_stem(self.stem(x)))
        x = self.blocks(x)
        x = self.act_head(self.bn_head(self.head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """Linear-BatchNorm1d-ReLU twice (the first Linear without bias), then a Linear head."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 128, bias=False)
        self.bn1 = nn.BatchNorm1d(128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.bn2 = nn.BatchNorm1d(64)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.fc1(x)))
        x = self.relu2(self.bn2(self.fc2(x)))
        return self.head(x)


class AudioCNN(nn.Module):
    """1-D CNN over raw audio: three Conv1d-BN1d-ReLU blocks (two strided), pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4, padding=4, bias=True),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VideoCNN(nn.Module):
    """3-D CNN over short clips: Conv3d-BN3d-ReLU blocks (one spatially strided), pool, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 16, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(16),
            nn.ReLU(),
            nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1), bias=True),
            nn.BatchNorm3d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Decoder(nn.Module):
    """Upsampler: ConvTranspose2d-BN2d-ReLU stages, 4x4 -> 16x16, then a Conv2d to the output.

    ``up1``: groups=1, stride 2, output_padding=1. ``up2``: groups=2, stride 2, bias=True.
    ``up3``: depthwise (groups = in = out = 8), dilation=2.
    """

    def __init__(self, in_channels: int = 16, out_channels: int = 3) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(in_channels, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.up3 = nn.ConvTranspose2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.out = nn.Conv2d(8, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.up1(x)))  # 4x4 -> 8x8
        x = self.relu(self.bn2(self.up2(x)))  # 8x8 -> 16x16
        x = self.relu(self.bn3(self.up3(x)))  # 16x16 -> 16x16
        return self.out(x)


class Mixed(nn.Module):
    """Foldable and non-foldable norms side by side; every path feeds the output.

    Input ``(N, 8, 8, 8)``. Only ``bn_a`` folds into its producer:

    * ``conv_a -> bn_a``: foldable (a plain conv with one user, BN with running stats).
    * ``shared -> bn_shared``: not foldable. ``shared`` is called twice; only the first call site
      feeds ``bn_shared``, so folding into ``shared`` would corrupt the second call.
    * ``conv_nostats -> bn_nostats``: not foldable. ``track_running_stats=False`` means batch
      statistics are used even in eval mode; there is no fixed affine map to fold.
    * ``conv_r -> ReLU -> bn_after_relu -> conv_after``: not foldable backwards (the ReLU sits
      between producer and norm); a fold *forward* into ``conv_after`` would be valid.
    * ``conv_two_users -> bn_two_users``: not foldable. The conv output also feeds a residual
      add, which must see the unnormalized values.
    * ``fc_seq -> bn_seq``: not foldable. ``fc_seq`` maps tokens ``(N, L=16, 8) -> (N, 16, 16)``
      on the last axis, while ``BatchNorm1d(16)`` normalizes axis 1 (the 16 tokens), not the
      Linear's 16 output features, even though the channel counts match.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        c = 8
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(c)
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(c)
        self.conv_nostats = nn.Conv2d(c, c, 3, padding=1)
        self.bn_nostats = nn.BatchNorm2d(c, track_running_stats=False)
        self.conv_r = nn.Conv2d(c, c, 1)
        self.bn_after_relu = nn.BatchNorm2d(c)
        self.conv_after = nn.Conv2d(c, c, 3, padding=1)
        self.conv_two_users = nn.Conv2d(c, c, 3, padding=1)
        self.bn_two_users = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)  # 8x8 -> 4x4: L = 16 tokens of C = 8 channels
        self.fc_seq = nn.Linear(c, 16)
        self.bn_seq = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_shared(self.shared(x))  # first call site: feeds bn_shared
        z = self.shared(self.relu(y))  # second call site: must stay unfolded
        x = self.relu(self.bn_nostats(self.conv_nostats(z)))
        x = self.conv_after(self.bn_after_relu(self.relu(self.conv_r(x))))
        c = self.conv_two_users(x)
        x = self.relu(self.bn_two_users(c)) + c  # conv output has two users
        tokens = torch.flatten(self.pool(x), 2).transpose(1, 2)  # (N, 16, 8)
        seq = self.relu(self.bn_seq(self.fc_seq(tokens)))  # (N, 16, 16), BN over axis 1
        return self.head(seq.mean(dim=1))


# --------------------------------------------------------------------------------------------
# building and calibration


def _random_input(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Shifted, scaled Gaussian: pushes BatchNorm statistics well away from 0 / 1."""
    return torch.randn(shape, generator=generator) * 2.0 + 0.5


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def calibrate(model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and real statistics, then switch to eval.

    Affine weights become ``U(0.5, 1.5)``, biases ``N(0, 0.2)``. They are set *before* measuring
    the statistics: with the default ``weight=1, bias=0`` a train-mode BN outputs exactly
    zero-mean activations, so a later norm fed only through bias-free convs would measure a
    running mean of ~0. Running statistics are the cumulative average (``momentum=None``) over
    a few train-mode passes on random batches of ``input_shape`` (batch dimension replaced); the
    momentum is restored afterwards. Norms with ``track_running_stats=False`` keep no statistics.
    """
    bns = _batchnorms(model)
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            if bn.affine:
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.2)
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None
        shape = (CALIBRATION_BATCH, *input_shape[1:])
        model.train()
        for _ in range(CALIBRATION_PASSES):
            model(_random_input(shape, generator))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def _build(name: str, seed: int, make: Callable[[], M]) -> M:
    """Construct with the global RNG forked and seeded, calibrate with a private generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    calibrate(model, ZOO[name].input_shape, torch.Generator().manual_seed(seed))
    return model


# --------------------------------------------------------------------------------------------
# factories (names match the ZOO keys, so "normfold.models:<name>" is a valid factory spec)


def resnet(*, seed: int = 0, num_classes: int = 10) -> ResNet:
    """ResNet-style CNN for ``(N, 3, 32, 32)`` images."""
    return _build("resnet", seed, lambda: ResNet(num_classes))


def mobilenet(*, seed: int = 0, num_classes: int = 10) -> MobileNet:
    """MobileNetV2-style CNN for ``(N, 3, 32, 32)`` images."""
    return _build("mobilenet", seed, lambda: MobileNet(num_classes))


def mlp(*, seed: int = 0, num_classes: int = 10) -> MLP:
    """Linear-BatchNorm1d MLP for ``(N, 64)`` features."""
    return _build("mlp", seed, lambda: MLP(64, num_classes))


def audio_cnn(*, seed: int = 0, num_classes: int = 10) -> AudioCNN:
    """1-D CNN for ``(N, 1, 400)`` waveforms."""
    return _build("audio_cnn", seed, lambda: AudioCNN(num_classes))


def video_cnn(*, seed: int = 0, num_classes: int = 10) -> VideoCNN:
    """3-D CNN for ``(N, 3, 4, 16, 16)`` clips."""
    return _build("video_cnn", seed, lambda: VideoCNN(num_classes))


def decoder(*, seed: int = 0, out_channels: int = 3) -> Decoder:
    """ConvTranspose2d upsampler, ``(N, 16, 4, 4) -> (N, out_channels, 16, 16)``."""
    return _build("decoder", seed, lambda: Decoder(16, out_channels))


def mixed(*, seed: int = 0, num_classes: int = 10) -> Mixed:
    """Foldable and non-foldable norms side by side (see :class:`Mixed`)."""
    return _build("mixed", seed, lambda: Mixed(num_classes))


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: a factory plus the shape of an example input (batch first)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "resnet", resnet, (2, 3, 32, 32), "ResNet-style CNN: conv-bn pairs, strided block, 1x1 shortcut"
        ),
        ZooModel(
            "mobilenet",
            mobilenet,
            (2, 3, 32, 32),
            "MobileNetV2-style: depthwise, grouped, dilated and reflect-padded convs",
        ),
        ZooModel("mlp", mlp, (4, 64), "Linear-BatchNorm1d MLP, one Linear without bias"),
        ZooModel("audio_cnn", audio_cnn, (2, 1, 400), "1-D CNN: strided Conv1d-BatchNorm1d blocks"),
        ZooModel("video_cnn", video_cnn, (2, 3, 4, 16, 16), "3-D CNN: Conv3d-BatchNorm3d blocks"),
        ZooModel(
            "decoder",
            decoder,
            (2, 16, 4, 4),
            "ConvTranspose2d upsampler: output_padding, grouped, depthwise, dilated",
        ),
        ZooModel("mixed", mixed, (2, 8, 8, 8), "foldable and non-foldable norms side by side"),
    )
}


def example_inputs(name: str, *, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs for zoo entry ``name``; ``batch`` overrides the batch dimension."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(ZOO)}") from None
    shape = entry.input_shape if batch is None else (batch, *entry.input_shape[1:])
    return (_random_input(shape, torch.Generator().manual_seed(seed)),)


def spec_of(factory: Callable[..., nn.Module]) -> ZooModel | None:
    """The zoo entry whose factory is ``factory`` (by identity), or None."""
    return next((m for m in ZOO.values() if m.factory is factory), None)
