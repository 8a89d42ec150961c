"""Plain CNNs and MLPs: one producer per BatchNorm, every norm folds backwards into it.

Conv2d/Conv1d/Conv3d, ConvTranspose2d and Linear producers, with and without bias; strided,
grouped, depthwise, dilated and reflect-padded convs; residual adds; a model of two inputs.

* :class:`ResNet` (:class:`BasicBlock`), :class:`MobileNet` (:class:`InvertedResidual`),
  :class:`MLP`, :class:`AudioCNN` (1-D), :class:`VideoCNN` (3-D), :class:`Decoder`
  (ConvTranspose2d upsampler), :class:`TwoTower` (``forward(image, features)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class TwoTower(nn.Module):
    """Two inputs, ``forward(image, features)``: an image tower (Conv-BN-ReLU twice, global
    average pool: any height and width) and a feature tower (Linear-BatchNorm1d-ReLU), joined by
    concatenation into a Linear head."""

    def __init__(self, features: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(features, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.head = nn.Linear(32, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.relu(self.bn2(self.conv2(x))).mean((2, 3))  # (N, 16)
        y = F.relu(self.bn_fc(self.fc(features)))  # (N, 16)
        return self.head(torch.cat([x, y], 1))
