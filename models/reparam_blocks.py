"""Training-time multi-branch blocks that structural reparameterization merges into one conv.

Each block sums parallel branches of one input: kxk and 1x1 conv-BNs, asymmetric 1x3/3x1
conv-BNs, and a BatchNorm on the identity path where the shapes allow, written as the papers' code
writes them. After the BatchNorms fold into their convs, every branch is a conv of the same input
(the identity is a conv with an identity kernel, a 1x1 kernel is a kxk one padded with zeros), so
the sum is one kxk conv whose kernel and bias are the branches' sums.

* :class:`RepVGGBlock` / :class:`RepVGG`: 3x3 + 1x1 + identity BN, then ReLU.
* :class:`MobileOneBlock` / :class:`MobileOne`: ``branches`` kxk conv-BNs + a 1x1 "scale" conv-BN +
  identity BN (MobileOne's own in-place ``out += conv(x)``).
* :class:`ACBlock` / :class:`ACNet`: 3x3 + 1x3 + 3x1 conv-BNs (ACNet).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int, padding: int | tuple[int, int],
             groups: int = 1) -> nn.Sequential:  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block, written as the paper's code writes it: a 3x3 conv-BN, a 1x1
    conv-BN and, where the shapes allow, a BN on the identity path, summed, then ReLU. Without
    the identity branch its forward adds ``0`` (``id_out = 0``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


class RepVGG(nn.Module):
    """RepVGG-style CNN: stride-2 blocks without the identity branch, grouped 3x3 blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            RepVGGBlock(3, 16, stride=2),
            RepVGGBlock(16, 16),
            RepVGGBlock(16, 32, stride=2),
            RepVGGBlock(32, 32, groups=2),
            RepVGGBlock(32, 32),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(x)), 1))


class MobileOneBlock(nn.Module):
    """MobileOne's training-time block (its own forward: ``out = scale_out + identity_out``, then
    ``out += conv(x)`` per over-parameterized branch): ``branches`` kxk conv-BNs, a 1x1 conv-BN
    ("scale" branch, when ``k > 1``), a BN on the identity path when the shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 branches: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(branches)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return self.act(out)


class MobileOne(nn.Module):
    """MobileOne-style CNN: depthwise 3x3 then pointwise 1x1 blocks, stride-2 depthwise blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            MobileOneBlock(3, 16, 3, stride=2),
            MobileOneBlock(16, 16, 3, groups=16),
            MobileOneBlock(16, 32, 1),
            MobileOneBlock(32, 32, 3, stride=2, groups=32, branches=3),
            MobileOneBlock(32, 32, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(x)), 1))


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: 3x3, 1x3 and 3x1 conv-BNs of one input, summed."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)


class ACNet(nn.Module):
    """ACNet-style CNN: asymmetric convolution blocks with ReLU, one of stride 2."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ACBlock(3, 16), nn.ReLU(), ACBlock(16, 32, stride=2), nn.ReLU(), ACBlock(32, 32), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
