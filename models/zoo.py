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

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from normfold.factory import register_input_shapes

M = TypeVar("M", bound=nn.Module)

CALIBRATION_BATCH = 16
CALIBRATION_PASSES = 3


# --------------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int, padding: int | tuple[int, int],
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
        self.rbr_dense = _conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)
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
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(branches)
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
        self.square = _conv_bn(cin, cout, 3, stride, 1)
        self.hor = _conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = _conv_bn(cin, cout, (3, 1), stride, (1, 0))

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


class LinearNorm(nn.Module):
    """LeViT's ``Linear_BN``: bias-free Linear on tokens ``(N, L, C_in)``, BatchNorm1d over ``C_out``.

    The BatchNorm sees ``(N * L, C_out)``: ``flatten(0, 1)`` merges batch and tokens, so its channel
    axis *is* the Linear's output-feature axis, and ``reshape_as`` restores ``(N, L, C_out)``. Unlike
    :class:`Mixed`'s ``fc_seq -> bn_seq``, this BN is foldable backwards into ``linear`` (through
    the two reshapes), which has no bias: a fold must create one.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    """LeViT attention: ``qkv`` and ``proj`` are :class:`LinearNorm`; Hardswish before ``proj``."""

    def __init__(self, dim: int, heads: int = 2, key_dim: int = 8, value_dim: int = 16) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + value_dim))
        self.act = nn.Hardswish()
        self.proj = LinearNorm(heads * value_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape[0], x.shape[1]
        qkv = self.qkv(x).view(n, length, self.heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (N, heads, L, d)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, length, self.heads * self.value_dim)
        return self.proj(self.act(out))


class LeViTMlp(nn.Module):
    """LeViT MLP: ``LinearNorm(C, 2C) -> Hardswish -> LinearNorm(2C, C)``."""

    def __init__(self, dim: int, ratio: int = 2) -> None:
        super().__init__()
        self.fc1 = LinearNorm(dim, dim * ratio)
        self.act = nn.Hardswish()
        self.fc2 = LinearNorm(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LeViT(nn.Module):
    """LeViT-style token model for ``(N, 3, 32, 32)`` images; every BatchNorm is foldable.

    * ``patch_embed.1``, ``patch_embed.4``: Conv2d -> BatchNorm2d, backward into the convs.
    * ``attn.qkv.bn``, ``attn.proj.bn``, ``mlp.fc1.bn``, ``mlp.fc2.bn``: bias-free Linear on
      ``(N, L=64, C)`` -> ``flatten(0, 1)`` -> BatchNorm1d -> ``reshape_as``, backward into the
      Linear through the reshapes (see :class:`LinearNorm`). ``attn.qkv``'s output is split into
      q, k and v afterwards; the fold is per output feature, so that does not matter.
    * ``head_bn``: LeViT's ``BN_Linear`` head, ``BatchNorm1d(C) -> Linear`` on the token mean.
      Its input is a residual sum, so only a *forward* fold into ``head`` is possible.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        dim = 32
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
        )
        self.attn = LeViTAttention(dim)
        self.mlp = LeViTMlp(dim)
        self.head_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, 64 tokens, 32)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(self.head_bn(x.mean(dim=1)))


class InceptionDWConv2d(nn.Module):
    """InceptionNeXt token mixer: an identity slice plus square, 1xk and kx1 depthwise convs.

    The channels are split ``(identity, gc, gc, gc)``; the three depthwise convs see one slice each
    and the four outputs are concatenated back in order.
    """

    def __init__(self, dim: int, square_kernel: int = 3, band_kernel: int = 7, branch_ratio: float = 0.125):
        super().__init__()
        gc = int(dim * branch_ratio)
        self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel, padding=square_kernel // 2, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, band_kernel), padding=(0, band_kernel // 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (band_kernel, 1), padding=(band_kernel // 2, 0), groups=gc)
        self.split_sizes = (dim - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class MetaNeXtBlock(nn.Module):
    """InceptionNeXt block: mixer -> BatchNorm2d -> 1x1 conv -> GELU -> 1x1 conv -> scale -> + x.

    ``norm`` sits *before* ``fc1`` (a 1x1 conv with bias and padding 0), so it can fold forward
    into ``fc1``. It cannot fold backwards: its input is a concatenation whose first slice is the
    untouched block input. The layer scale ``gamma`` is ``U(0.5, 1.5)``, not timm's 1e-6, so the
    block is far from the identity and a broken fold shows.
    """

    def __init__(self, dim: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.token_mixer = InceptionDWConv2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, dim * mlp_ratio, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(dim * mlp_ratio, dim, 1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.norm(self.token_mixer(x)))))
        return out * self.gamma.reshape(1, -1, 1, 1) + x


class InceptionNeXt(nn.Module):
    """InceptionNeXt-style CNN for ``(N, 3, 32, 32)`` images.

    * ``stem_norm``: 4x4 stride-4 patchify conv -> BatchNorm2d, backward into ``stem``.
    * ``blocks.{0,1}.norm``: BatchNorm2d -> 1x1 conv, forward only (see :class:`MetaNeXtBlock`).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        dim = 32
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stem_norm = nn.BatchNorm2d(dim)
        self.blocks = nn.Sequential(MetaNeXtBlock(dim), MetaNeXtBlock(dim))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


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


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow ``SAME`` padding computed from the input's shape at run time.

    ``forward`` reads ``x.shape[-2:]``, does ``math.ceil``/``max`` arithmetic and branches on the
    result, so ``torch.fx.symbolic_trace`` cannot trace it (a Proxy is not a number);
    ``torch.export`` sees concrete spatial sizes and records just ``pad`` + ``conv2d``. The padding
    can be asymmetric (the extra row/column goes bottom/right).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, **kwargs: object) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SamePad(nn.Module):
    """EfficientNet-TF-style CNN built from :class:`Conv2dSame`; not fx-traceable, exportable.

    Every BatchNorm follows a ``Conv2dSame`` (a Conv2d subclass whose forward uses its own
    ``weight``/``bias``) and folds backwards into it:

    * ``stem -> bn_stem``: 3x3 stride 2, no bias; 32x32 pads (0, 1) per axis (asymmetric).
    * ``depthwise -> bn_depthwise``: 5x5 stride 2, groups=16; 16x16 pads (1, 2).
    * ``project -> bn_project``: 1x1 with bias; no padding, the ``F.pad`` branch is skipped.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.depthwise = Conv2dSame(16, 16, 5, stride=2, groups=16, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(16)
        self.project = Conv2dSame(16, 32, 1, bias=True)
        self.bn_project = nn.BatchNorm2d(32)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn_stem(self.stem(x)))  # 32x32 -> 16x16
        x = self.act(self.bn_depthwise(self.depthwise(x)))  # 16x16 -> 8x8
        x = self.act(self.bn_project(self.project(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Functional(nn.Module):
    """Modules hold the parameters, but ``forward`` only makes functional calls.

    No submodule is ever *called*: convs run as ``F.conv2d(x, self.conv1.weight, ...)``, norms as
    ``F.batch_norm(x, self.bn1.running_mean, ..., False, 0.0, self.bn1.eps)`` (eval statistics
    always, whatever the mode), linears as ``F.linear``. Every pair is foldable backwards:

    * ``conv1 -> bn1`` (conv without bias), ``conv2 -> bn2`` (conv with bias, stride 2).
    * ``fc -> bn_fc``: ``F.linear`` (no bias) -> ``F.batch_norm`` on ``(N, 64)``.

    Because ``training=False`` is hard-coded, train-mode passes cannot measure the statistics;
    the factory measures them with :func:`_measure_functional_batch_norms`.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 64, bias=False)
        self.bn_fc = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv1, self.bn1
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = F.relu(x)
        conv, bn = self.conv2, self.bn2
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = F.relu(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        fc, bn = self.fc, self.bn_fc
        x = F.linear(x, fc.weight, fc.bias)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.linear(F.relu(x), self.head.weight, self.head.bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose forward also applies drop and act.

    ``forward`` re-implements ``_BatchNorm.forward`` with ``F.batch_norm`` (as timm does); in eval
    mode that is ``F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)``
    followed by ``self.drop`` and ``self.act``. It *is* a ``_BatchNorm``, so a fold that replaces
    it with ``nn.Identity`` silently drops the activation: the affine part folds, ``drop`` and
    ``act`` must stay.
    """

    def __init__(self, num_features: int, act: nn.Module | None = None, drop: float = 0.0) -> None:
        super().__init__(num_features)
        self.drop: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act: nn.Module = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in _BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps
        )
        return self.act(self.drop(x))


class BNAct(nn.Module):
    """Small CNN whose norms are all :class:`BatchNormAct2d`; each folds backwards into its conv.

    * ``stem -> bn_stem``: act ReLU.
    * ``depthwise -> bn_depthwise``: act SiLU, with an (eval no-op) ``Dropout(0.1)``.
    * ``project -> bn_project``: act Identity (timm's ``apply_act=False``), then the residual add.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn_stem = BatchNormAct2d(16, act=nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn_depthwise = BatchNormAct2d(16, act=nn.SiLU(), drop=0.1)
        self.project = nn.Conv2d(16, 16, 1, bias=True)
        self.bn_project = BatchNormAct2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_stem(self.stem(x))
        x = x + self.bn_project(self.project(self.bn_depthwise(self.depthwise(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class CustomNorm2d(nn.Module):
    """A hand-written eval BatchNorm that is *not* a ``_BatchNorm``: buffers ``mean``/``var``,
    parameters ``gain``/``bias``, attribute ``eps``; ``(x - mean) / sqrt(var + eps) * gain + bias``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.var[:, None, None] + self.eps)
        return (x - self.mean[:, None, None]) / std * self.gain[:, None, None] + self.bias[:, None, None]


class CustomBN(nn.Module):
    """Norms written by hand rather than with ``nn.BatchNorm*``; all three fold backwards.

    * ``conv1 -> bn1``: an ordinary BatchNorm2d (a control, upstream of the custom norms).
    * ``conv2 -> norm2``: :class:`CustomNorm2d`, a module with its own buffer/parameter names.
    * ``conv3 -> inline``: the tutorials' BatchNorm written in ``forward``,
      ``bn_gain * (h - bn_mean) / bn_std + bn_bias``. ``bn_gain``/``bn_bias`` are parameters
      stored as ``(1, C, 1, 1)``; ``bn_mean``/``bn_std`` are ``(C,)`` buffers reshaped in forward.
      ``conv3`` has a bias.

    Neither custom norm is a ``_BatchNorm``, so :func:`calibrate` does not see them; the factory
    sets their gains/biases and measures their statistics (:func:`_calibrate_custom_norms`).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.norm2 = CustomNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.bn_gain = nn.Parameter(torch.ones(1, 32, 1, 1))
        self.bn_bias = nn.Parameter(torch.zeros(1, 32, 1, 1))
        self.register_buffer("bn_mean", torch.zeros(32))
        self.register_buffer("bn_std", torch.ones(32))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        h = self.conv3(x)
        mean, std = self.bn_mean.reshape(1, -1, 1, 1), self.bn_std.reshape(1, -1, 1, 1)
        h = self.bn_gain * (h - mean) / std + self.bn_bias
        return self.fc(torch.flatten(self.pool(self.relu(h)), 1))


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


# --------------------------------------------------------------------------------------------
# building and calibration


def _random_input(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Shifted, scaled Gaussian: pushes BatchNorm statistics well away from 0 / 1."""
    return torch.randn(shape, generator=generator) * 2.0 + 0.5


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def calibrate(model: nn.Module, input_shapes: Sequence[tuple[int, ...]], generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and real statistics, then switch to eval.

    Affine weights become ``U(0.5, 1.5)``, biases ``N(0, 0.2)``. They are set *before* measuring
    the statistics: with the default ``weight=1, bias=0`` a train-mode BN outputs exactly
    zero-mean activations, so a later norm fed only through bias-free convs would measure a
    running mean of ~0. Running statistics are the cumulative average (``momentum=None``) over
    a few train-mode passes on random batches of ``input_shapes`` (batch dimension replaced); the
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
        model.train()
        for _ in range(CALIBRATION_PASSES):
            model(*(_random_input((CALIBRATION_BATCH, *shape[1:]), generator) for shape in input_shapes))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def _affine_(gain: torch.Tensor, bias: torch.Tensor, generator: torch.Generator) -> None:
    """The affine parameters :func:`calibrate` gives a BatchNorm: ``U(0.5, 1.5)``, ``N(0, 0.2)``."""
    gain.copy_(torch.rand(gain.shape, generator=generator) + 0.5)
    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.2)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and unbiased variance, as a train-mode BatchNorm measures them."""
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dims), x.var(dims)


class _MeasureBatchNorm(TorchFunctionMode):
    """Set the statistics of every eval-mode ``F.batch_norm`` call from the input it receives."""

    _signature = inspect.signature(F.batch_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = self._signature.bind(*args, **kwargs).arguments
            if not call.get("training", False) and call.get("running_mean") is not None:
                mean, var = _channel_stats(call["input"])
                call["running_mean"].copy_(mean)
                call["running_var"].copy_(var)
        return func(*args, **kwargs)


def _calibration_batch(input_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One eval-mode batch as large as all of :func:`calibrate`'s train-mode batches together."""
    return _random_input((CALIBRATION_BATCH * CALIBRATION_PASSES, *input_shape[1:]), generator)


def _measure_functional_batch_norms(
    model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator
) -> None:
    """Statistics for norms computed with ``F.batch_norm(..., training=False, ...)`` in any mode.

    Such calls never update their running statistics, so :func:`calibrate`'s train-mode passes
    leave them at ``0``/``1``. One eval-mode pass measures them in call order instead: each call
    gets the batch statistics of its actual input before it runs, so later norms see normalized
    inputs. (``calibrate`` has already set the affine parameters.)
    """
    with torch.no_grad(), _MeasureBatchNorm():
        model(_calibration_batch(input_shape, generator))


def _calibrate_custom_norms(
    model: CustomBN, input_shape: tuple[int, ...], generator: torch.Generator
) -> None:
    """Affine parameters and measured statistics for :class:`CustomBN`'s hand-written norms.

    Same distributions as :func:`calibrate`; statistics are measured in one eval-mode pass (after
    ``calibrate``, so the upstream ``bn1`` is final) by hooks that set each norm's buffers from its
    input just before it is used.
    """
    customs = [m for m in model.modules() if isinstance(m, CustomNorm2d)]

    def measure_custom(norm: CustomNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        mean, var = _channel_stats(args[0])
        norm.mean.copy_(mean)
        norm.var.copy_(var)

    def measure_inline(conv: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        mean, var = _channel_stats(out)
        model.bn_mean.copy_(mean)
        model.bn_std.copy_(torch.sqrt(var + 1e-5))

    with torch.no_grad():
        for norm in customs:
            _affine_(norm.gain, norm.bias, generator)
        _affine_(model.bn_gain, model.bn_bias, generator)
        handles = [norm.register_forward_pre_hook(measure_custom) for norm in customs]
        handles.append(model.conv3.register_forward_hook(measure_inline))
        try:
            model(_calibration_batch(input_shape, generator))
        finally:
            for handle in handles:
                handle.remove()


def _build(
    name: str,
    seed: int,
    make: Callable[[], M],
    post: Callable[[M, tuple[int, ...], torch.Generator], None] | None = None,
) -> M:
    """Construct and calibrate with the global RNG forked and seeded; inputs from a private generator.

    Calibration runs under the forked RNG too: train-mode layers such as Dropout draw from the
    global RNG, which must neither make the result depend on the caller's RNG nor advance it.
    ``post`` (same generator, after :func:`calibrate`, model in eval mode) sets up norms that
    ``calibrate`` cannot: ones that are no ``_BatchNorm`` or never update their statistics.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        generator = torch.Generator().manual_seed(seed)
        calibrate(model, ZOO[name].input_shapes, generator)
        if post is not None:
            post(model, ZOO[name].input_shape, generator)
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


def levit(*, seed: int = 0, num_classes: int = 10) -> LeViT:
    """LeViT-style token model for ``(N, 3, 32, 32)`` images (see :class:`LeViT`)."""
    return _build("levit", seed, lambda: LeViT(num_classes))


def inception_next(*, seed: int = 0, num_classes: int = 10) -> InceptionNeXt:
    """InceptionNeXt-style CNN for ``(N, 3, 32, 32)`` images (see :class:`InceptionNeXt`)."""
    return _build("inception_next", seed, lambda: InceptionNeXt(num_classes))


def bn_head(*, seed: int = 0, num_classes: int = 10) -> BNHead:
    """CNN with a BatchNorm before pooling and the Linear head (see :class:`BNHead`)."""
    return _build("bn_head", seed, lambda: BNHead(num_classes))


def two_tower(*, seed: int = 0, num_classes: int = 10) -> TwoTower:
    """Two-input model for ``image (N, 3, 24, 24)`` and ``features (N, 12)``."""
    return _build("two_tower", seed, lambda: TwoTower(num_classes=num_classes))


def same_pad(*, seed: int = 0, num_classes: int = 10) -> SamePad:
    """Run-time ``SAME`` padding convs, not fx-traceable (see :class:`SamePad`)."""
    return _build("same_pad", seed, lambda: SamePad(num_classes))


def functional(*, seed: int = 0, num_classes: int = 10) -> Functional:
    """Conv/BN/Linear written as functional calls on module parameters (see :class:`Functional`)."""
    return _build("functional", seed, lambda: Functional(num_classes), post=_measure_functional_batch_norms)


def bn_act(*, seed: int = 0, num_classes: int = 10) -> BNAct:
    """CNN whose norms are timm-style ``BatchNormAct2d`` (see :class:`BNAct`)."""
    return _build("bn_act", seed, lambda: BNAct(num_classes))


def custom_bn(*, seed: int = 0, num_classes: int = 10) -> CustomBN:
    """Hand-written norms: a non-``_BatchNorm`` module and an inline one (see :class:`CustomBN`)."""
    return _build("custom_bn", seed, lambda: CustomBN(num_classes), post=_calibrate_custom_norms)


def mixed_kernel(*, seed: int = 0, num_classes: int = 10) -> MixedKernel:
    """MixConv and multi-branch concatenations under one BatchNorm (see :class:`MixedKernel`)."""
    return _build("mixed_kernel", seed, lambda: MixedKernel(num_classes))


def repvgg(*, seed: int = 0, num_classes: int = 10) -> RepVGG:
    """RepVGG-style CNN of training-time blocks (see :class:`RepVGGBlock`)."""
    return _build("repvgg", seed, lambda: RepVGG(num_classes))


def mobileone(*, seed: int = 0, num_classes: int = 10) -> MobileOne:
    """MobileOne-style CNN of training-time blocks (see :class:`MobileOneBlock`)."""
    return _build("mobileone", seed, lambda: MobileOne(num_classes))


def acnet(*, seed: int = 0, num_classes: int = 10) -> ACNet:
    """ACNet-style CNN of asymmetric convolution blocks (see :class:`ACBlock`)."""
    return _build("acnet", seed, lambda: ACNet(num_classes))


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: a factory plus the shape of an example input (batch first)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    more_inputs: tuple[tuple[int, ...], ...] = ()  # the shapes of further positional inputs

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.input_shape, *self.more_inputs)


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
        ZooModel(
            "levit",
            levit,
            (2, 3, 32, 32),
            "LeViT-style tokens: Linear-BatchNorm1d through flatten/reshape, BatchNorm1d-Linear head",
        ),
        ZooModel(
            "inception_next",
            inception_next,
            (2, 3, 32, 32),
            "InceptionNeXt-style: BatchNorm2d before a 1x1 conv after a split/concat token mixer",
        ),
        ZooModel(
            "bn_head", bn_head, (2, 3, 32, 32), "BatchNorm2d before pooling, flatten and the Linear head"
        ),
        ZooModel(
            "same_pad",
            same_pad,
            (2, 3, 32, 32),
            "timm Conv2dSame: shape-dependent padding in forward, not fx-traceable",
        ),
        ZooModel(
            "functional",
            functional,
            (2, 3, 32, 32),
            "F.conv2d / F.batch_norm / F.linear on module parameters, no module calls",
        ),
        ZooModel(
            "bn_act",
            bn_act,
            (2, 3, 32, 32),
            "timm BatchNormAct2d: a BatchNorm2d subclass with built-in dropout and activation",
        ),
        ZooModel(
            "custom_bn",
            custom_bn,
            (2, 3, 32, 32),
            "hand-written norms: a non-_BatchNorm module and an inline gain*(h-mean)/std+bias",
        ),
        ZooModel(
            "mixed_kernel",
            mixed_kernel,
            (2, 3, 32, 32),
            "MixConv split/concat and multi-branch concat, each under one BatchNorm2d",
        ),
        ZooModel(
            "two_tower",
            two_tower,
            (2, 3, 24, 24),
            "two inputs (image, features): Conv-BN and Linear-BN1d towers joined by concat",
            more_inputs=((2, 12),),
        ),
        ZooModel(
            "repvgg",
            repvgg,
            (2, 3, 32, 32),
            "RepVGG blocks: 3x3 + 1x1 conv-BN + identity BN summed; stride-2 and grouped blocks",
        ),
        ZooModel(
            "mobileone",
            mobileone,
            (2, 3, 32, 32),
            "MobileOne blocks: over-parameterized depthwise/pointwise conv-BN branches, identity BN",
        ),
        ZooModel("acnet", acnet, (2, 3, 32, 32), "ACNet blocks: 3x3 + 1x3 + 3x1 conv-BN branches summed"),
    )
}


def example_inputs(name: str, *, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs for zoo entry ``name``; ``batch`` overrides the batch dimension."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(ZOO)}") from None
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        _random_input(shape if batch is None else (batch, *shape[1:]), generator)
        for shape in entry.input_shapes
    )


def spec_of(factory: Callable[..., nn.Module]) -> ZooModel | None:
    """The zoo entry whose factory is ``factory`` (by identity), or None."""
    return next((m for m in ZOO.values() if m.factory is factory), None)


# a spec "normfold.models:<name>" given without inputs runs on the entry's shapes (normfold.factory)
for _entry in ZOO.values():
    register_input_shapes(_entry.factory, _entry.input_shapes)
