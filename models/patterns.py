"""Norms whose place decides how, or whether, they fold.

* :class:`Mixed`: foldable and non-foldable norms side by side (a shared conv, no running
  statistics, a ReLU between, a second user of the conv's output, the wrong axis).
* :class:`BNHead`: a BatchNorm2d before pooling, flatten and the Linear head (forward fold only).
* :class:`MixedKernel`: concatenations under one BatchNorm2d (:class:`MixConv`'s split/concat and
  parallel branches of one input), folded slice by slice.
"""

from __future__ import annotations

import torch
from torch import nn


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


class BNHead(nn.Module):
    """Conv-BN-ReLU features, then a head that normalizes *before* pooling.

    * ``features.1``, ``features.4``: Conv2d -> BatchNorm2d, backward into the convs.
    * ``head_norm``: ``ReLU -> BatchNorm2d -> AdaptiveAvgPool2d(1) -> Flatten -> Linear``. Not
      foldable backwards (the ReLU); foldable forward into ``fc`` because a per-channel affine
      map commutes with average pooling and the flatten keeps channel ``c`` at feature ``c``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head_norm = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.head_norm(self.features(x)))))


def _split_channels(channels: int, groups: int) -> list[int]:
    """timm's MixNet split: equal parts, the remainder goes to the first group."""
    split = [channels // groups] * groups
    split[0] += channels - sum(split)
    return split


class MixConv(nn.Module):
    """MixNet's mixed depthwise conv: channel groups ``[12, 10, 10]`` get 3x3, 5x5 and 7x7 kernels."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.splits = _split_channels(channels, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
            for c, k in zip(self.splits, kernels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, self.splits, dim=1)
        return torch.cat([conv(xs[i]) for i, conv in enumerate(self.convs)], dim=1)


class MixedKernel(nn.Module):
    """Concatenations normalized by one BatchNorm: each folds into the convs slice by slice.

    * ``stem -> bn_stem``, ``expand -> bn_expand``, ``project -> bn_project``: plain conv-BN.
    * ``mix -> bn_mix``: :class:`MixConv` on ``split`` slices of one tensor, ``cat``, then one
      ``BatchNorm2d(32)``. Channels ``0:12`` fold into ``mix.convs.0``, ``12:22`` into
      ``mix.convs.1``, ``22:32`` into ``mix.convs.2``.
    * ``branch{1,3,5} -> bn_branches``: three convs (1x1, 3x3 with bias, 5x5) on the *same* input,
      ``cat`` to 8 + 12 + 12 channels, one ``BatchNorm2d(32)``; folds slice by slice likewise.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(32)
        self.mix = MixConv(32)
        self.bn_mix = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 16, 1, bias=False)
        self.bn_project = nn.BatchNorm2d(16)
        self.branch1 = nn.Conv2d(16, 8, 1, bias=False)
        self.branch3 = nn.Conv2d(16, 12, 3, padding=1, bias=True)
        self.branch5 = nn.Conv2d(16, 12, 5, padding=2, bias=False)
        self.bn_branches = nn.BatchNorm2d(32)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn_stem(self.stem(x)))
        out = self.act(self.bn_expand(self.expand(x)))
        out = self.act(self.bn_mix(self.mix(out)))
        x = x + self.bn_project(self.project(out))
        x = torch.cat([self.branch1(x), self.branch3(x), self.branch5(x)], dim=1)
        x = self.act(self.bn_branches(x))
        return self.fc(torch.flatten(self.pool(x), 1))
