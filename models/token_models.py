"""Token models whose norms fold through reshapes, splits and concatenations.

* :class:`LeViT`: bias-free Linear on tokens -> ``flatten(0, 1)`` -> BatchNorm1d -> ``reshape_as``
  (:class:`LinearNorm`), folded backwards through the reshapes; a BatchNorm1d -> Linear head
  folded forward.
* :class:`InceptionNeXt`: a split/concat token mixer (:class:`InceptionDWConv2d`) then a
  BatchNorm2d before a 1x1 conv, folded forward (:class:`MetaNeXtBlock`).
"""

from __future__ import annotations

import torch
from torch import nn


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
