"""Random valid PyTorch models with BatchNorms, for differential fuzzing of ``normfold.fold`` and
``normfold.drop_redundant_biases``.

:func:`model_specs` is a hypothesis strategy for a :class:`ModelSpec`: a readable, frozen
description of a small model (a dtype: float32, float64, float16 or bfloat16; an input shape; a
train/eval/mixed mode; a chain of blocks; the last block's output or every block's as outputs).
:func:`build` turns a spec into an ``nn.Module`` (``FuzzModel``: ``x = block(x)`` for every block)
plus what the generator knows about each norm it placed:

* ``Expect("fold")``: certainly foldable (Conv/ConvTranspose/Linear -> BN where the layer output
  has no other user, possibly through eval dropout, avg pooling, max pooling with positive
  scales, nearest upsampling or replicate padding; BN -> Conv/Linear with no zero padding;
  layers -> cat/add -> BN); in float16/bfloat16 a skip with code ``overflow`` (a folded value
  that does not fit the dtype) is allowed too;
* ``Expect("keep", codes)``: must stay, with one of ``codes`` (batch statistics, a shared conv,
  a second user of the conv output, BN after a ReLU with no layer after, a wrong channel axis,
  a zero-padded or transposed consumer, a max pool with a non-positive scale);
* ``Expect("any")``: may or may not fold (BN after a ReLU followed by whatever the next block is,
  a concat with an identity branch, a fork merge whose branches do not all end in a bare layer,
  every norm of a block that is called twice).

:attr:`Built.drops` lists the layer biases ``drop_redundant_biases`` must drop (a Conv/Linear
module with a bias read directly by a torch BatchNorm module with running statistics).

Blocks (each an ``nn.Module`` under ``blocks.<i>``) cover Conv1d/2d/3d, ConvTranspose1d/2d/3d
and Linear with bias on/off, groups and depthwise, dilation, stride, every padding mode, residual
adds, channel concats, DAGs (``Fork``: 2-3 branches of 0-2 blocks each, merged by add or cat), a
conv called twice or two convs with a tied weight, a whole block called again later (``Repeat``),
every block output also a model output, ``F.conv*d`` on registered parameters,
``F.batch_norm`` on registered buffers, and BatchNorm1d/2d/3d as modules, as a plain subclass and
as a subclass with an activation after ``super().forward()``, with affine on/off and
``track_running_stats`` on/off. Statistics: ``running_var`` log-uniform in 1e-6..1e3 (per norm a
random sub-range), ``|running_mean|`` up to ~1e3, gamma positive/mixed/negative, random beta.

Models stay small (channels <= 16, spatial <= 12, or <= 5 per axis in 3d) so that one
``fold`` + ``verify`` takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
NORM_KINDS = ("module", "subclass", "subclass_act", "functional")
#: dtypes drawn, float32 6 times in 9; ``NORMFOLD_FUZZ_DTYPES`` (comma-separated) restricts them
DTYPE_WEIGHTS = ["float32"] * 6 + ["float64", "float16", "bfloat16"]
FUZZ_DTYPES = tuple(os.environ.get("NORMFOLD_FUZZ_DTYPES", "float32,float64,float16,bfloat16").split(","))
MAX_CHANNELS = 16

# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class NormSpec:
    """One BatchNorm: how it is written and the distribution of its statistics."""

    kind: str  # module | subclass | subclass_act | functional (F.batch_norm on the block's buffers)
    affine: bool = True
    track: bool = True  # track_running_stats (False: batch statistics, never foldable)
    eps: float = 1e-5
    mean_scale: float = 1.0  # running_mean ~ N(0, 1) * mean_scale
    log_var: tuple[float, float] = (-1.0, 1.0)  # running_var = 10 ** U(lo, hi)
    gamma: str = "positive"  # positive | mixed | negative
    beta_scale: float = 0.5

    def __repr__(self) -> str:
        flags = "" if self.affine else ",noaffine"
        flags += "" if self.track else ",notrack"
        return (
            f"BN({self.kind}{flags},eps={self.eps:g},mean*{self.mean_scale:g},"
            f"var=1e{self.log_var[0]:g}..1e{self.log_var[1]:g},gamma={self.gamma},beta*{self.beta_scale:g})"
        )


@dataclass(frozen=True)
class ConvSpec:
    """A Conv{dims}d or ConvTranspose{dims}d (same kernel/stride/padding/dilation on every axis)."""

    dims: int
    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: int = 0
    functional: bool = False  # F.conv{dims}d on parameters registered on the block

    @property
    def zero_padded(self) -> bool:
        """Whether the layer sees zeros at a border (a forward fold into it would be inexact)."""
        return self.transposed or (self.padding_mode == "zeros" and self.padding > 0)

    def __repr__(self) -> str:
        name = f"{'F.' if self.functional else ''}Conv{'T' if self.transposed else ''}{self.dims}d"
        extra = f",op={self.output_padding}" if self.output_padding else ""
        extra += "" if self.padding_mode == "zeros" else f",{self.padding_mode}"
        return (
            f"{name}({self.cin}->{self.cout},k={self.kernel},s={self.stride},p={self.padding},"
            f"d={self.dilation},g={self.groups},bias={int(self.bias)}{extra})"
        )


@dataclass(frozen=True)
class LinearSpec:
    fin: int
    fout: int
    bias: bool = True

    def __repr__(self) -> str:
        return f"Linear({self.fin}->{self.fout},bias={int(self.bias)})"


@dataclass(frozen=True)
class ConvNorm:
    """``conv -> [dropout|avgpool|maxpool] -> norm? -> relu?``; the norm folds backward."""

    conv: ConvSpec
    norm: NormSpec | None
    through: str | None = None
    act: bool = True


@dataclass(frozen=True)
class NormConv:
    """``relu -> norm -> conv -> relu?``: a forward fold unless the conv zero-pads or is transposed."""

    norm: NormSpec
    conv: ConvSpec
    act: bool = True


@dataclass(frozen=True)
class Residual:
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + x)``: both norms fold backward."""

    conv1: ConvSpec
    norm1: NormSpec
    conv2: ConvSpec
    norm2: NormSpec


@dataclass(frozen=True)
class Concat:
    """``relu(norm(cat([a(x), b(x)], 1)))``; ``b`` None: the identity branch ``x``."""

    a: ConvSpec
    b: ConvSpec | None
    norm: NormSpec


@dataclass(frozen=True)
class AddMerge:
    """``relu(norm(a(x) + b(x)))``: the norm folds into both convs (add-bn)."""

    a: ConvSpec
    b: ConvSpec
    norm: NormSpec


@dataclass(frozen=True)
class Shared:
    """One conv called twice: ``relu(norm2(conv(relu(norm1(conv(x))))))``: neither norm may fold.
    ``tied``: the second call is another conv module whose ``weight`` is the first's parameter."""

    conv: ConvSpec
    norm1: NormSpec
    norm2: NormSpec
    tied: bool = False


@dataclass(frozen=True)
class TwoUsers:
    """``y = conv(x); relu(norm(y)) + y``: the conv output has a second user, the norm stays."""

    conv: ConvSpec
    norm: NormSpec


@dataclass(frozen=True)
class SharedNorm:
    """One norm module called twice: ``relu(norm(b(relu(norm(a(x))))))`` (``act_between``: the
    second call reads ``relu(b(...))``, so only the first call can fold). It may or may not fold,
    but parity must hold: folding one call must not change the other."""

    a: ConvSpec
    b: ConvSpec
    norm: NormSpec
    act_between: bool = False


@dataclass(frozen=True)
class NormFanout:
    """``h = norm(relu(x)); relu(a(h) + b(h))``: a forward fold into both convs, or none."""

    norm: NormSpec
    a: ConvSpec
    b: ConvSpec


@dataclass(frozen=True)
class AfterAct:
    """``relu -> norm -> relu?``: with the trailing relu (or as the model output) the norm stays.

    The norm always tracks running statistics: on batch statistics right after a ReLU, a mostly
    dead channel is divided by its tiny batch std, so a handful of its elements decide the whole
    output's error, and the parity rule's noise estimate (the original's largest error) becomes a
    chance draw that a fold elsewhere loses by ~10x at pure rounding level (fuzz seed 20261201,
    ``test_regression_batch_statistics_after_relu``)."""

    norm: NormSpec
    act: bool


@dataclass(frozen=True)
class LinearNorm:
    """``[flatten ->] linear -> norm? -> relu?`` on ``(N, F)``: linear-bn."""

    linear: LinearSpec
    norm: NormSpec | None
    flatten: bool = False
    act: bool = True


@dataclass(frozen=True)
class NormLinear:
    """``relu -> BatchNorm1d -> linear -> relu?`` on ``(N, F)``: bn-linear."""

    norm: NormSpec
    linear: LinearSpec
    act: bool = True


@dataclass(frozen=True)
class SeqLinear:
    """``(N, C, L) -> (N, L, C) -> Linear(C, out) -> BatchNorm1d(L) -> relu -> (N, out, L)``:
    the norm's channel axis is not the linear's (wrong_axis)."""

    linear: LinearSpec
    norm: NormSpec


@dataclass(frozen=True)
class Fork:
    """A DAG: ``relu(norm?(merge([chain(x) for chain in branches])))`` with every branch a chain of
    size-keeping blocks (ConvNorm, NormConv, Residual, AfterAct; an empty chain is the identity),
    merged by ``add`` or channel ``cat``. The merge norm folds when every branch ends in a bare
    layer (add-bn / concat-bn into each branch's last conv) and, for ``add``, there are two
    branches (``a + b + c`` is nested adds, beyond the engine's one merge level)."""

    branches: tuple[tuple[Any, ...], ...]
    merge: str  # add | cat
    norm: NormSpec | None


@dataclass(frozen=True)
class Repeat:
    """Block ``index`` (the same module object) called again here, on an input of the same shape:
    every layer and norm in it runs twice (its norms may or may not fold; parity must hold)."""

    index: int
    block: Any  # the spec of block ``index`` (for shapes)

    def __repr__(self) -> str:
        return f"Repeat(block {self.index})"


#: every block kind (a ModelSpec's blocks are instances of these)
BLOCKS = (ConvNorm, NormConv, Residual, Concat, AddMerge, Shared, SharedNorm, NormFanout, TwoUsers, AfterAct,
          LinearNorm, NormLinear, SeqLinear, Fork, Repeat)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: input ``(N, *in_shape)``, dtype, mode of the modules, blocks in order, and
    its outputs (``last``: the last block's; ``all``: a tuple of every block's output, so every
    block output also has the model output as a user)."""

    in_shape: tuple[int, ...]  # (C, *spatial) or (F,)
    dtype: str  # float32 | float64 | float16 | bfloat16
    mode: str  # eval | train | mixed (some submodules in train mode: fold must not care)
    seed: int  # module init and statistics
    blocks: tuple[Any, ...] = field(default=())
    outputs: str = "last"  # last | all

    def __repr__(self) -> str:
        head = (
            f"ModelSpec(in={self.in_shape}, {self.dtype}, mode={self.mode}, seed={self.seed}, "
            f"outputs={self.outputs}, blocks=["
        )
        return "\n".join([head, *(f"  {i}: {b!r}," for i, b in enumerate(self.blocks)), "])"])


@dataclass(frozen=True)
class Expect:
    """What the generator knows about one norm: ``fold``, ``keep`` (with allowed codes) or ``any``.
    For ``fold``, ``codes`` are skip codes allowed too, each a measured refusal (``cancellation``;
    ``overflow`` in float16/bfloat16) that test_fuzz checks by forcing the fold."""

    status: str
    codes: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- modules


class PlainBatchNorm1d(nn.BatchNorm1d):
    """A subclass that does not change forward."""


class PlainBatchNorm2d(nn.BatchNorm2d):
    """A subclass that does not change forward."""


class PlainBatchNorm3d(nn.BatchNorm3d):
    """A subclass that does not change forward."""


class ActBatchNorm1d(nn.BatchNorm1d):
    """A subclass that applies an activation after ``super().forward()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class ActBatchNorm2d(nn.BatchNorm2d):
    """A subclass that applies an activation after ``super().forward()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(super().forward(x), -2.0, 5.0)


class ActBatchNorm3d(nn.BatchNorm3d):
    """A subclass that applies an activation after ``super().forward()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def _leaky_act_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The activation subclasses' forward in a float16/bfloat16 model. A saturating activation
    (ReLU, hardtanh) there hides the original's own rounding (its saturated outputs are exact)
    while a fold's rounding of the same size lands in the unsaturated range, so the parity rule,
    which measures the model's noise at its outputs, cannot tell the two apart (seed 20261201:
    bfloat16, pre-activation values ~8e3 where one bfloat16 step is 32). A non-saturating
    activation keeps the check meaningful."""
    return F.leaky_relu(nn.modules.batchnorm._BatchNorm.forward(self, x), 0.1)


_BN = {
    "module": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "subclass": {1: PlainBatchNorm1d, 2: PlainBatchNorm2d, 3: PlainBatchNorm3d},
    "subclass_act": {1: ActBatchNorm1d, 2: ActBatchNorm2d, 3: ActBatchNorm3d},
}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_F_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL = {
    "avgpool": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d},
    "maxpool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
}


class FunctionalConv(nn.Module):
    """``F.conv{d}d`` on this module's own parameters (``F.pad`` first for non-zero padding modes)."""

    def __init__(self, spec: ConvSpec) -> None:
        super().__init__()
        self.spec = spec
        k = (spec.kernel,) * spec.dims
        self.weight = nn.Parameter(torch.empty(spec.cout, spec.cin // spec.groups, *k))
        self.bias = nn.Parameter(torch.empty(spec.cout)) if spec.bias else None
        fan_in = spec.cin // spec.groups * spec.kernel**spec.dims
        with torch.no_grad():
            self.weight.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            if self.bias is not None:
                self.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        padding = s.padding
        if s.padding_mode != "zeros" and s.padding:
            x = F.pad(x, [s.padding] * (2 * s.dims), mode=s.padding_mode)
            padding = 0
        return _F_CONV[s.dims](x, self.weight, self.bias, s.stride, padding, s.dilation, s.groups)


def make_conv(spec: ConvSpec) -> nn.Module:
    if spec.functional:
        return FunctionalConv(spec)
    if spec.transposed:
        return _CONV_T[spec.dims](
            spec.cin, spec.cout, spec.kernel, stride=spec.stride, padding=spec.padding,
            output_padding=spec.output_padding, groups=spec.groups, bias=spec.bias,
            dilation=spec.dilation,
        )  # fmt: skip
    return _CONV[spec.dims](
        spec.cin, spec.cout, spec.kernel, stride=spec.stride, padding=spec.padding,
        dilation=spec.dilation, groups=spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
    )  # fmt: skip


class Norm(nn.Module):
    """A norm as the block calls it: a BN module (``.bn``) or ``F.batch_norm`` on buffers
    registered on this module itself (kind ``functional``: the norm's name is this module's path)."""

    def __init__(self, spec: NormSpec, channels: int, dims: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "functional":
            self.register_buffer("bn_mean", torch.zeros(channels))
            self.register_buffer("bn_var", torch.ones(channels))
            self.bn_weight = nn.Parameter(torch.ones(channels)) if spec.affine else None
            self.bn_bias = nn.Parameter(torch.zeros(channels)) if spec.affine else None
        else:
            bn = _BN[spec.kind][max(dims, 1)]
            self.bn = bn(channels, eps=spec.eps, affine=spec.affine, track_running_stats=spec.track)

    @property
    def path(self) -> str:
        """The norm's name relative to this module (as ``Folded.norm`` / ``Skipped.norm`` report it)."""
        return "" if self.spec.kind == "functional" else "bn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "functional":
            return F.batch_norm(
                x, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, False, 0.0, self.spec.eps
            )
        return self.bn(x)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """running mean/var, weight, bias (None where absent)."""
        if self.spec.kind == "functional":
            return {"mean": self.bn_mean, "var": self.bn_var, "weight": self.bn_weight, "bias": self.bn_bias}
        bn = self.bn
        return {"mean": bn.running_mean, "var": bn.running_var, "weight": bn.weight, "bias": bn.bias}


def _norm(spec: NormSpec | None, channels: int, dims: int) -> Norm | None:
    return None if spec is None else Norm(spec, channels, dims)


def _call(norm: Norm | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class _Pad(nn.Module):
    """``F.pad`` with a copying mode (commutes with a per-channel affine map)."""

    def __init__(self, width: int, mode: str) -> None:
        super().__init__()
        self.width, self.mode = width, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [self.width] * (2 * (x.dim() - 2)), mode=self.mode)


class ConvNormBlock(nn.Module):
    def __init__(self, spec: ConvNorm) -> None:
        super().__init__()
        self.spec = spec
        d = spec.conv.dims
        self.conv = make_conv(spec.conv)
        if spec.through == "dropout":
            self.through: nn.Module = nn.Dropout(0.3)
        elif spec.through in _POOL:
            self.through = _POOL[spec.through][d](2)
        elif spec.through == "upsample":
            self.through = nn.Upsample(scale_factor=2, mode="nearest")
        elif spec.through == "pad":
            self.through = _Pad(1, "replicate")
        else:
            self.through = nn.Identity()
        self.norm = _norm(spec.norm, spec.conv.cout, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _call(self.norm, self.through(self.conv(x)))
        return torch.relu(y) if self.spec.act else y


class NormConvBlock(nn.Module):
    def __init__(self, spec: NormConv) -> None:
        super().__init__()
        self.spec = spec
        self.norm = Norm(spec.norm, spec.conv.cin, spec.conv.dims)
        self.conv = make_conv(spec.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.norm(torch.relu(x)))
        return torch.relu(y) if self.spec.act else y


class ResidualBlock(nn.Module):
    def __init__(self, spec: Residual) -> None:
        super().__init__()
        d = spec.conv1.dims
        self.conv1, self.norm1 = make_conv(spec.conv1), Norm(spec.norm1, spec.conv1.cout, d)
        self.conv2, self.norm2 = make_conv(spec.conv2), Norm(spec.norm2, spec.conv2.cout, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + x)


class ConcatBlock(nn.Module):
    def __init__(self, spec: Concat) -> None:
        super().__init__()
        self.a = make_conv(spec.a)
        self.b = make_conv(spec.b) if spec.b is not None else None
        channels = spec.a.cout + (spec.b.cout if spec.b is not None else spec.a.cin)
        self.norm = Norm(spec.norm, channels, spec.a.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.b(x) if self.b is not None else x
        return torch.relu(self.norm(torch.cat([self.a(x), other], dim=1)))


class AddBlock(nn.Module):
    def __init__(self, spec: AddMerge) -> None:
        super().__init__()
        self.a, self.b = make_conv(spec.a), make_conv(spec.b)
        self.norm = Norm(spec.norm, spec.a.cout, spec.a.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.a(x) + self.b(x)))


class SharedBlock(nn.Module):
    def __init__(self, spec: Shared) -> None:
        super().__init__()
        d = spec.conv.dims
        self.conv = make_conv(spec.conv)
        self.norm1, self.norm2 = Norm(spec.norm1, spec.conv.cout, d), Norm(spec.norm2, spec.conv.cout, d)
        self.conv2 = make_conv(spec.conv) if spec.tied else self.conv
        if spec.tied:
            self.conv2.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv(x)))
        return torch.relu(self.norm2(self.conv2(y)))


class SharedNormBlock(nn.Module):
    def __init__(self, spec: SharedNorm) -> None:
        super().__init__()
        self.spec = spec
        self.a, self.b = make_conv(spec.a), make_conv(spec.b)
        self.norm = Norm(spec.norm, spec.a.cout, spec.a.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.norm(self.a(x))))
        return torch.relu(self.norm(torch.relu(y) if self.spec.act_between else y))


class NormFanoutBlock(nn.Module):
    def __init__(self, spec: NormFanout) -> None:
        super().__init__()
        self.norm = Norm(spec.norm, spec.a.cin, spec.a.dims)
        self.a, self.b = make_conv(spec.a), make_conv(spec.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(x))
        return torch.relu(self.a(h) + self.b(h))


class TwoUsersBlock(nn.Module):
    def __init__(self, spec: TwoUsers) -> None:
        super().__init__()
        self.conv = make_conv(spec.conv)
        self.norm = Norm(spec.norm, spec.conv.cout, spec.conv.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(self.norm(y)) + y


class AfterActBlock(nn.Module):
    def __init__(self, spec: AfterAct, channels: int, dims: int) -> None:
        super().__init__()
        self.spec = spec
        self.norm = Norm(spec.norm, channels, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(torch.relu(x))
        return torch.relu(y) if self.spec.act else y


class LinearNormBlock(nn.Module):
    def __init__(self, spec: LinearNorm) -> None:
        super().__init__()
        self.spec = spec
        self.linear = nn.Linear(spec.linear.fin, spec.linear.fout, bias=spec.linear.bias)
        self.norm = _norm(spec.norm, spec.linear.fout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.flatten:
            x = torch.flatten(x, 1)
        y = _call(self.norm, self.linear(x))
        return torch.relu(y) if self.spec.act else y


class NormLinearBlock(nn.Module):
    def __init__(self, spec: NormLinear) -> None:
        super().__init__()
        self.spec = spec
        self.norm = Norm(spec.norm, spec.linear.fin, 1)
        self.linear = nn.Linear(spec.linear.fin, spec.linear.fout, bias=spec.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.norm(torch.relu(x)))
        return torch.relu(y) if self.spec.act else y


class SeqLinearBlock(nn.Module):
    def __init__(self, spec: SeqLinear, length: int) -> None:
        super().__init__()
        self.linear = nn.Linear(spec.linear.fin, spec.linear.fout, bias=spec.linear.bias)
        self.norm = Norm(spec.norm, length, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.transpose(1, 2))  # (N, L, out)
        return torch.relu(self.norm(y)).transpose(1, 2)


class ForkBlock(nn.Module):
    def __init__(self, spec: Fork, branches: list[list[nn.Module]], channels: int, dims: int) -> None:
        super().__init__()
        self.spec = spec
        self.branches = nn.ModuleList(nn.ModuleList(chain) for chain in branches)
        self.norm = _norm(spec.norm, channels, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chain in self.branches:
            y = x
            for block in chain:
                y = block(y)
            outs.append(y)
        if self.spec.merge == "add":
            merged = outs[0]
            for y in outs[1:]:
                merged = merged + y
        else:
            merged = torch.cat(outs, dim=1)
        return torch.relu(_call(self.norm, merged))


class FuzzModel(nn.Module):
    """``x = block(x)`` for every block of a :class:`ModelSpec` (a block object may appear twice);
    returns the last block's output, or with ``all_outputs`` a tuple of every block's output."""

    def __init__(self, blocks: list[nn.Module], all_outputs: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.all_outputs = all_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return tuple(outs) if self.all_outputs else x


# --------------------------------------------------------------------------- build


@dataclass
class Built:
    """A model built from a spec, with the generator's expectation for every norm (by name)."""

    model: nn.Module
    expect: dict[str, Expect]
    dtype: torch.dtype
    #: layer path -> norm path: biases ``drop_redundant_biases`` must drop (float32/float64 only)
    drops: dict[str, str] = field(default_factory=dict)


def _fold() -> Expect:
    return Expect("fold")


def _keep(*codes: str) -> Expect:
    return Expect("keep", frozenset(codes))


def _expect(norm: NormSpec, wanted: Expect) -> Expect:
    """A norm without running statistics never folds, whatever its position."""
    return _keep("batch_statistics") if not norm.track else wanted


def _fill_norm(norm: Norm, gen: torch.Generator) -> None:
    spec, values = norm.spec, norm.tensors()
    present = [v for v in values.values() if v is not None]
    if not present:
        return
    c = present[0].numel()
    with torch.no_grad():
        if values["mean"] is not None:
            lo, hi = spec.log_var
            values["mean"].copy_(torch.randn(c, generator=gen, dtype=torch.float64) * spec.mean_scale)
            log_var = lo + (hi - lo) * torch.rand(c, generator=gen, dtype=torch.float64)
            values["var"].copy_(10.0**log_var)
        if values["weight"] is not None:
            magnitude = 0.2 + 1.8 * torch.rand(c, generator=gen, dtype=torch.float64)
            if spec.gamma == "negative":
                gamma = -magnitude
            elif spec.gamma == "mixed":
                gamma = torch.randn(c, generator=gen, dtype=torch.float64)
            else:
                gamma = magnitude
            values["weight"].copy_(gamma)
            values["bias"].copy_(torch.randn(c, generator=gen, dtype=torch.float64) * spec.beta_scale)


def _positive_scale(norm: Norm) -> bool:
    """Every channel's scale gamma / sqrt(var + eps) is > 0 (max pooling commutes with the map)."""
    weight = norm.tensors()["weight"]
    return weight is None or bool((weight > 0).all())


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def build(spec: ModelSpec) -> Built:
    """The ``nn.Module`` of ``spec`` (deterministic in ``spec.seed``) and its norms' expectations."""
    dtype = DTYPES[spec.dtype]
    expect: dict[str, Expect] = {}
    blocks: list[nn.Module] = []
    state: tuple[int, ...] = spec.in_shape
    repeated = {b.index for b in spec.blocks if isinstance(b, Repeat)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for i, b in enumerate(spec.blocks):
            last = i == len(spec.blocks) - 1
            if isinstance(b, Repeat):
                blocks.append(blocks[b.index])  # the same module object: its own names stay
            else:
                module, names = _build_block(b, state, last)
                blocks.append(module)
                for rel, e in names.items():
                    # a block called twice: its layers and norms are shared, folds may or may not exist
                    expect[f"blocks.{i}" + (f".{rel}" if rel else "")] = Expect("any") if i in repeated else e
            state = block_output(b, state)
        model = FuzzModel(blocks, all_outputs=spec.outputs == "all")
        gen = torch.Generator().manual_seed(spec.seed)
        for m in model.modules():
            if isinstance(m, Norm):
                _fill_norm(m, gen)
    model = model.to(dtype)
    if spec.dtype in ("float16", "bfloat16"):
        for m in model.modules():
            if isinstance(m, (ActBatchNorm1d, ActBatchNorm2d, ActBatchNorm3d)):
                m.forward = _leaky_act_forward.__get__(m)
    # expectations that depend on drawn values (max pooling needs positive scales)
    for i, b in enumerate(spec.blocks):
        if isinstance(b, ConvNorm) and b.norm is not None and b.through == "maxpool" and i not in repeated:
            name = _norm_name(i, blocks[i].norm)
            if expect[name].status == "fold" and not _positive_scale(blocks[i].norm):
                # no backward fold; without the ReLU a forward fold into the next block may exist
                expect[name] = _keep("negative_scale") if b.act else Expect("any")
    drops: dict[str, str] = {}
    narrow = dtype in (torch.float16, torch.bfloat16)
    # a fold the gate measured beyond the parity rule may be refused: cancellation (a large mean
    # whose folded layer loses the difference; float32 too: fuzz seed 934055385 chunks 6 and 7)
    # and, in a narrow dtype, overflow (new values that leave its range; seed 647855096);
    # test_fuzz forces such a fold and asserts that it fails the rule
    refusable = frozenset({"overflow", "cancellation"} if narrow else {"cancellation"})
    expect = {k: Expect("fold", refusable) if e.status == "fold" else e for k, e in expect.items()}
    if not narrow:  # in a narrow dtype a refused fold keeps its bias too: no drop is expected
        for i, b in enumerate(spec.blocks):
            if i not in repeated:
                drops.update({f"blocks.{i}.{layer}": f"blocks.{i}.{norm}" for layer, norm in _droppable(b)})
    model.eval()
    if spec.mode == "train":
        model.train()
    elif spec.mode == "mixed":
        for j, m in enumerate(model.modules()):
            m.training = j % 2 == 1
    return Built(model, expect, dtype, drops)


def _droppable(b: Any) -> list[tuple[str, str]]:
    """(layer, norm) paths in block ``b`` where a layer module's bias feeds a torch BatchNorm
    module with running statistics directly: ``drop_redundant_biases`` must drop it."""

    def ok(norm: NormSpec | None, bias: bool, functional: bool = False) -> bool:
        return (
            norm is not None
            and norm.track
            and norm.kind in ("module", "subclass")
            and bias
            and not functional
        )

    pairs = []
    if isinstance(b, ConvNorm) and b.through is None and ok(b.norm, b.conv.bias, b.conv.functional):
        pairs.append(("conv", "norm.bn"))
    if isinstance(b, Residual):
        for k, (conv, norm) in enumerate(((b.conv1, b.norm1), (b.conv2, b.norm2)), 1):
            if ok(norm, conv.bias, conv.functional):
                pairs.append((f"conv{k}", f"norm{k}.bn"))
    if isinstance(b, LinearNorm) and ok(b.norm, b.linear.bias):
        pairs.append(("linear", "norm.bn"))
    return pairs


def _norm_name(i: int, norm: Norm) -> str:
    return f"blocks.{i}.norm" + (f".{norm.path}" if norm.path else "")


def _rel(attr: str, norm: NormSpec) -> str:
    return attr if norm.kind == "functional" else f"{attr}.bn"


def _build_block(b: Any, state: tuple[int, ...], last: bool) -> tuple[nn.Module, dict[str, Expect]]:
    """The block's module and its norms' expectations, by name relative to the block."""
    if isinstance(b, ConvNorm):
        names = {} if b.norm is None else {_rel("norm", b.norm): _expect(b.norm, _fold())}
        return ConvNormBlock(b), names
    if isinstance(b, NormConv):
        if b.norm.kind == "subclass_act":
            wanted = _keep("after_activation", "after_input")
        elif b.conv.transposed:
            wanted = _keep("transposed_consumer")
        elif b.conv.zero_padded:
            wanted = _keep("zero_padding_forward")
        else:
            wanted = _fold()
        return NormConvBlock(b), {_rel("norm", b.norm): _expect(b.norm, wanted)}
    if isinstance(b, Residual):
        return ResidualBlock(b), {
            _rel("norm1", b.norm1): _expect(b.norm1, _fold()),
            _rel("norm2", b.norm2): _expect(b.norm2, _fold()),
        }
    if isinstance(b, Concat):
        wanted = _fold() if b.b is not None else Expect("any")
        return ConcatBlock(b), {_rel("norm", b.norm): _expect(b.norm, wanted)}
    if isinstance(b, AddMerge):
        return AddBlock(b), {_rel("norm", b.norm): _expect(b.norm, _fold())}
    if isinstance(b, Shared):
        return SharedBlock(b), {
            _rel("norm1", b.norm1): _expect(b.norm1, _keep("shared_producer")),
            _rel("norm2", b.norm2): _expect(b.norm2, _keep("shared_producer")),
        }
    if isinstance(b, SharedNorm):
        return SharedNormBlock(b), {_rel("norm", b.norm): _expect(b.norm, Expect("any"))}
    if isinstance(b, NormFanout):
        if b.norm.kind == "subclass_act":
            wanted = _keep("after_activation")
        elif b.a.zero_padded or b.b.zero_padded:
            wanted = _keep("zero_padding_forward")
        else:
            wanted = _fold()
        return NormFanoutBlock(b), {_rel("norm", b.norm): _expect(b.norm, wanted)}
    if isinstance(b, TwoUsers):
        return TwoUsersBlock(b), {_rel("norm", b.norm): _expect(b.norm, _keep("multiple_users"))}
    if isinstance(b, AfterAct):
        stays = b.act or last or b.norm.kind == "subclass_act"
        wanted = _keep("after_activation") if stays else Expect("any")
        return AfterActBlock(b, state[0], len(state) - 1), {_rel("norm", b.norm): _expect(b.norm, wanted)}
    if isinstance(b, LinearNorm):
        names = {} if b.norm is None else {_rel("norm", b.norm): _expect(b.norm, _fold())}
        return LinearNormBlock(b), names
    if isinstance(b, NormLinear):
        wanted = _keep("after_activation", "after_input") if b.norm.kind == "subclass_act" else _fold()
        return NormLinearBlock(b), {_rel("norm", b.norm): _expect(b.norm, wanted)}
    if isinstance(b, SeqLinear):
        return SeqLinearBlock(b, state[1]), {_rel("norm", b.norm): _expect(b.norm, _keep("wrong_axis"))}
    if isinstance(b, Fork):
        return _build_fork(b, state)
    raise TypeError(f"unknown block {b!r}")


def _build_fork(b: Fork, state: tuple[int, ...]) -> tuple[nn.Module, dict[str, Expect]]:
    names: dict[str, Expect] = {}
    chains: list[list[nn.Module]] = []
    outs = []
    for j, chain in enumerate(b.branches):
        modules, s = [], state
        for k, inner in enumerate(chain):
            module, inner_names = _build_block(inner, s, last=False)
            modules.append(module)
            for rel, e in inner_names.items():
                names[f"branches.{j}.{k}" + (f".{rel}" if rel else "")] = e
            s = block_output(inner, s)
        chains.append(modules)
        outs.append(s)
    channels = outs[0][0] if b.merge == "add" else sum(o[0] for o in outs)
    if b.norm is not None:
        # three branches summed are two nested adds in the graph: the engine folds one merge level
        # (add-bn of two layers, concat-bn of any number), so a 3-way sum is "any" (merge_inputs)
        bare = (b.merge == "cat" or len(b.branches) == 2) and all(
            chain and isinstance(chain[-1], ConvNorm) and chain[-1].norm is None
            and chain[-1].through is None and not chain[-1].act
            for chain in b.branches
        )  # fmt: skip
        names[_rel("norm", b.norm)] = _expect(b.norm, _fold() if bare else Expect("any"))
    return ForkBlock(b, chains, channels, len(state) - 1), names


def _conv_out(c: ConvSpec, size: int) -> int:
    if c.transposed:
        return (size - 1) * c.stride - 2 * c.padding + c.dilation * (c.kernel - 1) + c.output_padding + 1
    return (size + 2 * c.padding - c.dilation * (c.kernel - 1) - 1) // c.stride + 1


def _conv_shape(c: ConvSpec, state: tuple[int, ...]) -> tuple[int, ...]:
    return (c.cout, *(_conv_out(c, s) for s in state[1:]))


def block_output(b: Any, state: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of block ``b`` on a per-sample input of shape ``state``."""
    if isinstance(b, ConvNorm):
        out = _conv_shape(b.conv, state)
        if b.through in _POOL:
            out = (out[0], *(s // 2 for s in out[1:]))
        elif b.through == "upsample":
            out = (out[0], *(s * 2 for s in out[1:]))
        elif b.through == "pad":
            out = (out[0], *(s + 2 for s in out[1:]))
        return out
    if isinstance(b, (NormConv, TwoUsers)):
        return _conv_shape(b.conv, state)
    if isinstance(b, (Residual, AfterAct)):
        return state
    if isinstance(b, Concat):
        out = _conv_shape(b.a, state)
        extra = b.b.cout if b.b is not None else state[0]
        return (out[0] + extra, *out[1:])
    if isinstance(b, (AddMerge, NormFanout)):
        return _conv_shape(b.a, state)
    if isinstance(b, SharedNorm):
        return _conv_shape(b.b, _conv_shape(b.a, state))
    if isinstance(b, Shared):
        return _conv_shape(b.conv, _conv_shape(b.conv, state))
    if isinstance(b, (LinearNorm, NormLinear)):
        return (b.linear.fout,)
    if isinstance(b, SeqLinear):
        return (b.linear.fout, state[1])
    if isinstance(b, Repeat):
        return block_output(b.block, state)
    if isinstance(b, Fork):
        outs = []
        for chain in b.branches:
            s = state
            for inner in chain:
                s = block_output(inner, s)
            outs.append(s)
        channels = outs[0][0] if b.merge == "add" else sum(o[0] for o in outs)
        return (channels, *state[1:])
    raise TypeError(f"unknown block {b!r}")


def make_inputs(
    spec: ModelSpec, dtype: torch.dtype, *, batch: int, kind: str, seed: int
) -> tuple[torch.Tensor, ...]:
    """One input tensor ``(batch, *spec.in_shape)``: ``normal`` N(0, 1), ``wide`` U(0, 255) or
    ``x100`` N(0, 1) * 100, from a seeded generator (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *spec.in_shape)
    if kind == "wide":
        x = torch.rand(shape, generator=gen, dtype=torch.float64) * 255
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (100.0 if kind == "x100" else 1.0)
    return (x.to(dtype),)


# --------------------------------------------------------------------------- strategies


@contextlib.contextmanager
def fixed_constants() -> Iterator[None]:
    """Hypothesis's generation with its own constants only, whatever the process imported.

    Hypothesis (6.13x+) draws about 5% of its integers and 15% of its floats from constants, and
    half of those from a pool it reads from the source of every *local* module in ``sys.modules``
    (normfold's, the CLI's, a model file a test wrote and imported; not tests or site-packages).
    That pool grows with what the process has imported so far, so a derandomized run drew other
    specs after an ONNX export, after the CLI tests or after an edit of a normfold literal (the
    drop fuzz dropped 26 biases of 150 examples alone, 60 after one ``fold_and_export``). Inside
    this context the local pool is empty and the permitted-constants cache is a fresh one (put
    back after): the examples are a function of the seed, the strategies and Hypothesis's version.
    A Hypothesis without these internals fails here, loudly (``AttributeError``)."""
    from hypothesis.internal.cache import LRUCache
    from hypothesis.internal.conjecture import providers
    from hypothesis.internal.constants_ast import Constants

    saved = providers._get_local_constants, providers.CONSTANTS_CACHE
    providers._get_local_constants = Constants  # a new empty pool per test case
    providers.CONSTANTS_CACHE = LRUCache(1024)  # entries cached with the process's pool are not reused
    try:
        yield
    finally:
        providers._get_local_constants, providers.CONSTANTS_CACHE = saved

#: largest spatial size per axis of a model input; convs never grow a tensor past it
_MAX_SPATIAL = {1: 12, 2: 8, 3: 5}


@st.composite
def norm_specs(
    draw: st.DrawFn, *, kinds: tuple[str, ...] = NORM_KINDS, batch_statistics: bool = True
) -> NormSpec:
    """A BatchNorm: kind, affine, track_running_stats (mostly on; always with
    ``batch_statistics=False``), eps and statistics ranges."""
    kind = draw(st.sampled_from(kinds))
    if kind == "functional" or not batch_statistics:
        track = True
    else:
        track = draw(st.sampled_from([True] * 7 + [False]))
    # A batch-statistics norm (never folded) on 2 samples amplifies its input's rounding by up to
    # 1 / (2 sqrt(eps)); with a small eps that alone puts ill-conditioned models (a channel of two
    # nearly equal values) past the parity rule's noise estimate, whatever the fold did.
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-1])) if track else 1e-1
    lo = draw(st.floats(-6.0, 3.0, allow_nan=False))
    hi = draw(st.floats(lo, 3.0, allow_nan=False))
    return NormSpec(
        kind=kind,
        affine=draw(st.booleans()),
        track=track,
        eps=eps,
        mean_scale=draw(st.sampled_from([0.0, 0.5, 3.0, 30.0, 1000.0])),
        log_var=(round(lo, 2), round(hi, 2)),
        gamma=draw(st.sampled_from(["positive", "mixed", "negative"])),
        beta_scale=draw(st.sampled_from([0.0, 0.5, 5.0])),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_specs(
    draw: st.DrawFn,
    state: tuple[int, ...],
    *,
    cout: int | None = None,
    same_size: bool = False,
    transposed: bool | None = None,
    functional: bool | None = None,
    max_cout: int = MAX_CHANNELS,
) -> ConvSpec:
    """A valid conv for per-sample input ``state = (C, *spatial)``; ``same_size``: stride 1 and
    'same' padding (the output keeps the spatial size)."""
    cin, sizes = state[0], state[1:]
    dims, small = len(sizes), min(state[1:])
    if transposed is None:
        small_enough = max(sizes) <= (6 if dims <= 2 else 2)
        transposed = not same_size and small_enough and draw(st.sampled_from([False, True]))
    if cout is None:
        depthwise = cin <= max_cout and draw(st.sampled_from([False] * 3 + [True]))
        cout = cin * draw(st.integers(1, max_cout // cin)) if depthwise else draw(st.integers(1, max_cout))
        groups = cin if depthwise else draw(st.sampled_from(_divisors(math.gcd(cin, cout))))
    else:
        groups = draw(st.sampled_from(_divisors(math.gcd(cin, cout))))
    bias = draw(st.booleans())
    dilation = draw(st.integers(1, 2))
    kernel = draw(st.sampled_from([1, 3] if same_size else [1, 2, 3]))
    if transposed:
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, dilation * (kernel - 1) // 2))
        output_padding = draw(st.integers(0, max(stride, dilation) - 1))
        return ConvSpec(dims, cin, cout, kernel, stride, padding, dilation, groups, bias,
                        transposed=True, output_padding=output_padding)  # fmt: skip
    mode = draw(st.sampled_from(PADDING_MODES))
    if functional is None:
        functional = draw(st.sampled_from([False] * 4 + [True]))
    limit = {"zeros": 2, "replicate": 2, "reflect": small - 1, "circular": small}[mode]
    if same_size:
        stride, padding = 1, dilation * (kernel - 1) // 2
        if padding > limit:
            kernel, padding = 1, 0
    else:
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, max(0, min(2, limit))))
        if max(sizes) + 2 * padding - dilation * (kernel - 1) > _MAX_SPATIAL[dims]:
            padding = 0  # the output never grows past the cap
        if dilation * (kernel - 1) + 1 > small + 2 * padding:
            kernel = 1
    return ConvSpec(dims, cin, cout, kernel, stride, padding, dilation, groups, bias, mode,
                    functional=functional)  # fmt: skip


_SPATIAL_BLOCKS = ("conv_norm", "norm_conv", "residual", "concat", "add", "shared", "shared_norm",
                   "norm_fanout", "two_users", "after_act", "linear_norm", "seq_linear", "fork")  # fmt: skip
_FLAT_BLOCKS = ("linear_norm", "norm_linear", "after_act")


@st.composite
def block_specs(draw: st.DrawFn, state: tuple[int, ...], *, low_precision: bool = False) -> Any:
    """One block that is valid on per-sample input ``state`` (``low_precision``: in float16 or
    bfloat16, which CPU ``avg_pool3d`` does not implement)."""
    spatial = len(state) > 1
    kinds = list(_SPATIAL_BLOCKS if spatial else _FLAT_BLOCKS)
    if spatial and (len(state) != 2 or state[1] == 1):
        # length 1: torch 2.13 CPU segfaults on a Conv1d (stride 2, padding 1, dilation 2) reading
        # the block's transposed (non-contiguous) (N, C, 1) output (fuzz seed 1002)
        kinds.remove("seq_linear")
    kind = draw(st.sampled_from(kinds))
    c = state[0]
    if kind == "conv_norm":
        conv = draw(conv_specs(state))
        out = _conv_shape(conv, state)
        through_options: list[str | None] = [None, None, None, "dropout"]
        if min(out[1:]) >= 2:
            through_options += ["maxpool"] if low_precision and len(out) == 4 else ["avgpool", "maxpool"]
        if max(out[1:]) <= _MAX_SPATIAL[len(out) - 1] // 2:
            through_options += ["upsample", "pad"]
        norm = draw(st.one_of(st.none(), norm_specs(), norm_specs(), norm_specs()))
        return ConvNorm(conv, norm, draw(st.sampled_from(through_options)), draw(st.booleans()))
    if kind == "norm_conv":
        return NormConv(draw(norm_specs()), draw(conv_specs(state)), draw(st.booleans()))
    if kind == "residual":
        conv1 = draw(conv_specs(state, same_size=True))
        conv2 = draw(conv_specs(_conv_shape(conv1, state), same_size=True, cout=c))
        return Residual(conv1, draw(norm_specs()), conv2, draw(norm_specs()))
    if kind in ("concat", "add"):
        a = draw(conv_specs(state, same_size=True, transposed=False, max_cout=MAX_CHANNELS // 2))
        if kind == "add":
            b = draw(conv_specs(state, same_size=True, transposed=False, cout=a.cout))
            return AddMerge(a, b, draw(norm_specs()))
        identity = c + a.cout <= MAX_CHANNELS and draw(st.booleans())
        b = None if identity else draw(conv_specs(state, same_size=True, max_cout=MAX_CHANNELS // 2))
        return Concat(a, b, draw(norm_specs()))
    if kind == "shared":
        conv = draw(conv_specs(state, same_size=True, cout=c))
        return Shared(conv, draw(norm_specs()), draw(norm_specs()), draw(st.booleans()))
    if kind == "fork":
        return draw(fork_specs(state))
    if kind == "shared_norm":
        a = draw(conv_specs(state))
        b = draw(conv_specs(_conv_shape(a, state), cout=a.cout))
        return SharedNorm(a, b, draw(norm_specs()), draw(st.booleans()))
    if kind == "norm_fanout":
        a = draw(conv_specs(state, same_size=True, transposed=False))
        b = draw(conv_specs(state, same_size=True, transposed=False, cout=a.cout))
        return NormFanout(draw(norm_specs()), a, b)
    if kind == "two_users":
        return TwoUsers(draw(conv_specs(state)), draw(norm_specs()))
    if kind == "after_act":
        return AfterAct(draw(norm_specs(kinds=NORM_KINDS[:3], batch_statistics=False)), draw(st.booleans()))
    if kind == "seq_linear":
        linear = LinearSpec(c, draw(st.integers(1, MAX_CHANNELS)), draw(st.booleans()))
        return SeqLinear(linear, draw(norm_specs(kinds=NORM_KINDS[:3])))
    if kind == "norm_linear":
        linear = LinearSpec(c, draw(st.integers(1, MAX_CHANNELS)), draw(st.booleans()))
        return NormLinear(draw(norm_specs()), linear, draw(st.booleans()))
    # linear_norm
    fin = math.prod(state)
    linear = LinearSpec(fin, draw(st.integers(1, MAX_CHANNELS)), draw(st.booleans()))
    norm = draw(st.one_of(st.none(), norm_specs(), norm_specs()))
    return LinearNorm(linear, norm, spatial, draw(st.booleans()))


@st.composite
def branch_block_specs(draw: st.DrawFn, state: tuple[int, ...], cout: int | None, max_cout: int) -> Any:
    """A block of a :class:`Fork` branch: keeps the spatial size (and with ``cout`` the channels)."""
    c = state[0]
    kinds = ["conv_norm", "conv_norm", "norm_conv"]
    if cout is None or cout == c:
        kinds += ["residual", "after_act"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("conv_norm", "norm_conv"):
        conv = draw(conv_specs(state, same_size=True, cout=cout, max_cout=max_cout))
        if kind == "norm_conv":
            return NormConv(draw(norm_specs()), conv, draw(st.booleans()))
        through = draw(st.sampled_from([None, None, None, "dropout"]))
        return ConvNorm(conv, draw(st.one_of(st.none(), norm_specs())), through, draw(st.booleans()))
    if kind == "residual":
        conv1 = draw(conv_specs(state, same_size=True, max_cout=max_cout))
        conv2 = draw(conv_specs(_conv_shape(conv1, state), same_size=True, cout=c))
        return Residual(conv1, draw(norm_specs()), conv2, draw(norm_specs()))
    return AfterAct(draw(norm_specs(kinds=NORM_KINDS[:3], batch_statistics=False)), draw(st.booleans()))


@st.composite
def fork_specs(draw: st.DrawFn, state: tuple[int, ...]) -> Fork:
    """2-3 branches of 0-2 size-keeping blocks each, merged by add (same channels) or cat."""
    merge = draw(st.sampled_from(["add", "cat"]))
    n = draw(st.integers(2, 3))
    cout = state[0] if merge == "add" else None
    max_cout = max(1, MAX_CHANNELS // n)
    branches = []
    for _ in range(n):
        chain, s = [], state
        for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
            inner = draw(branch_block_specs(s, cout, max_cout))
            chain.append(inner)
            s = block_output(inner, s)
        branches.append(tuple(chain))
    return Fork(tuple(branches), merge, draw(st.one_of(st.none(), norm_specs(), norm_specs())))


@st.composite
def model_specs(draw: st.DrawFn, *, max_blocks: int = 5) -> ModelSpec:
    """A whole model: dtype (mostly float32), input shape (1-3d images or flat features), mode,
    1..``max_blocks`` blocks chained on the running shape (sometimes an earlier block called
    again), and its outputs (the last block's, or every block's)."""
    dtype = draw(st.sampled_from([d for d in DTYPE_WEIGHTS if d in FUZZ_DTYPES]))
    dims = draw(st.sampled_from([0, 1, 1, 2, 2, 2, 3]))
    c = draw(st.integers(1, 4 if dims else MAX_CHANNELS))
    low = 1 if dims == 1 else 2
    sizes = tuple(draw(st.integers(low, _MAX_SPATIAL[dims])) for _ in range(dims)) if dims else ()
    in_shape = (c, *sizes)
    blocks: list[Any] = []
    inputs: list[tuple[int, ...]] = []  # each block's per-sample input shape
    state = in_shape
    for _ in range(draw(st.integers(1, max_blocks))):
        again = [i for i, b in enumerate(blocks) if inputs[i] == state and not isinstance(b, Repeat)]
        if again and draw(st.sampled_from([False] * 5 + [True])):
            i = draw(st.sampled_from(again))
            b: Any = Repeat(i, blocks[i])
        else:
            b = draw(block_specs(state, low_precision=dtype in ("float16", "bfloat16")))
        blocks.append(b)
        inputs.append(state)
        state = block_output(b, state)
    return ModelSpec(
        in_shape=in_shape,
        dtype=dtype,
        mode=draw(st.sampled_from(["eval", "eval", "train", "mixed"])),
        seed=draw(st.integers(0, 2**16)),
        blocks=tuple(blocks),
        outputs=draw(st.sampled_from(["last", "last", "last", "all"])),
    )
