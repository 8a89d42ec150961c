"""Random small *programs* over one tensor, for the differential fuzzer (``test_diff_fuzz.py``).

Independent of normfold's pattern list: a :class:`Program` is pure data, an input of per-sample
shape ``(C, *spatial)`` (rank 2-5 with the batch axis), a dtype, a seed and a list of ops. Value 0
is the input; op ``i`` reads ``values[op.src]`` (``-1``: the value just before it) and appends
``values[i + 1]``; ``Add``/``Cat`` also read ``values[op.other]``, ``Call`` runs op ``op.op``'s
module again. The output is the last value, plus ``values[j]`` for every ``j`` in
``Program.outputs`` (then a tuple). :class:`ProgramModule` interprets it (one submodule
``op<i>`` per layer or norm module; functional norms, hand-written norms and bare matmuls keep
their tensors on the top module and run in its ``forward``, where normfold can fold them in the
export only). Weights come from torch's default init under ``torch.manual_seed(seed)``,
statistics from a generator of the same seed; each norm's op says how they are drawn.

Every repr is Python that rebuilds the spec: ``recheck(Program(...))`` rebuilds the model and
runs every check of ``test_diff_fuzz.py`` on it (from ``tests/``)::

    cd tests && ../.venv/bin/python -c "from diff_programs import *; recheck(Program(...))"

:func:`programs` is the hypothesis strategy. It tracks every value's shape by running the ops on
``meta`` tensors while it draws, so every program it returns runs; sizes stay tiny (channels and
each spatial side at most 16, a few hundred elements per sample) so one example takes ~0.1-0.5 s.
CPU has no ``avg_pool3d`` for float16/bfloat16: not drawn there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = [
    "Act", "Add", "Call", "Cat", "Conv", "Flatten", "Linear", "Matmul", "Mean", "Norm", "Pad", "Pool",
    "Program", "ProgramModule", "Scale", "Slice", "Transpose", "Up", "build", "programs", "recheck",
]  # fmt: skip

MAX_SIDE = 16  # channels and spatial sides
MAX_NUMEL = 384  # elements per sample


@dataclass(frozen=True, repr=False)
class _Spec:
    """Frozen spec whose repr lists the fields that differ from their defaults, as keywords."""

    def __repr__(self) -> str:
        args = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(args)})"


# --------------------------------------------------------------------------- ops


@dataclass(frozen=True, repr=False)
class Conv(_Spec):
    """Conv{d}d / ConvTranspose{d}d, d = rank - 2 (the same k/stride/padding on every axis)."""

    cout: int = 1
    k: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    mode: str = "zeros"  # padding_mode
    transposed: bool = False
    out_pad: int = 0
    src: int = -1


@dataclass(frozen=True, repr=False)
class Linear(_Spec):
    """nn.Linear over the last axis, or over the channel axis (``x.transpose(1, -1)`` around it)."""

    fout: int = 1
    bias: bool = True
    axis: str = "last"  # last | channel
    src: int = -1


@dataclass(frozen=True, repr=False)
class Matmul(_Spec):
    """``x @ W`` (+ ``b``) over the last axis, W a parameter of the top module."""

    fout: int = 1
    bias: bool = False
    src: int = -1


@dataclass(frozen=True, repr=False)
class Norm(_Spec):
    """A batch norm over axis 1: ``module`` (BatchNorm1d/2d/3d; with ``act`` a subclass applying it
    after ``super().forward``: clamp, leaky ReLU of negative slope, abs, neg), ``functional``
    (``F.batch_norm`` on top-module buffers), ``affine_module`` / ``affine_inline`` (hand-written
    ``(x - m) / sqrt(v + eps) * g + b``, in a module of its own or in the top ``forward``).
    Statistics: ``running_mean ~ N(0, 1) * mean``, ``running_var = 10 ** U(var)``, gamma
    positive | mixed | negative | tiny (~1e-4) | zero (every other channel 0), ``beta ~ N(0, 1) * beta``."""

    kind: str = "module"
    act: str = ""
    affine: bool = True
    track: bool = True
    eps: float = 1e-5
    mean: float = 1.0
    var: tuple[float, float] = (-1.0, 1.0)
    gamma: str = "positive"
    beta: float = 0.5
    src: int = -1


@dataclass(frozen=True, repr=False)
class Scale(_Spec):
    """``x * v``, ``x + v``, ``x / v``, ``x - v`` or ``v - x`` (op mul | add | div | sub | rsub)."""

    op: str = "mul"
    value: float = 2.0
    src: int = -1


@dataclass(frozen=True, repr=False)
class Act(_Spec):
    kind: str = "relu"
    src: int = -1


@dataclass(frozen=True, repr=False)
class Pool(_Spec):
    """max | avg | adaptive_avg | adaptive_max pooling over every spatial axis (``size``: adaptive)."""

    kind: str = "max"
    k: int = 2
    stride: int = 2
    padding: int = 0
    ceil: bool = False
    count_pad: bool = True
    size: int = 1
    src: int = -1


@dataclass(frozen=True, repr=False)
class Pad(_Spec):
    mode: str = "zeros"  # zeros | reflect | replicate | circular
    p: int = 1
    src: int = -1


@dataclass(frozen=True, repr=False)
class Up(_Spec):
    mode: str = "nearest"  # nearest | linear (linear / bilinear / trilinear by rank)
    src: int = -1


@dataclass(frozen=True, repr=False)
class Slice(_Spec):
    start: int = 0
    stop: int = 1
    src: int = -1


@dataclass(frozen=True, repr=False)
class Transpose(_Spec):
    a: int = 1
    b: int = 2
    src: int = -1


@dataclass(frozen=True, repr=False)
class Flatten(_Spec):
    src: int = -1


@dataclass(frozen=True, repr=False)
class Mean(_Spec):
    """Mean over the spatial axes."""

    keepdim: bool = False
    src: int = -1


@dataclass(frozen=True, repr=False)
class Add(_Spec):
    other: int = 0
    src: int = -1


@dataclass(frozen=True, repr=False)
class Cat(_Spec):
    other: int = 0
    src: int = -1


@dataclass(frozen=True, repr=False)
class Call(_Spec):
    """Run op ``op``'s module (a Conv, Linear or module norm) again."""

    op: int = 0
    src: int = -1


@dataclass(frozen=True, repr=False)
class Program(_Spec):
    shape: tuple[int, ...] = (1, 1)
    ops: tuple[Any, ...] = ()
    outputs: tuple[int, ...] = ()
    dtype: str = "float32"
    seed: int = 0
    batch: int = 4
    scale: float = 1.0  # the given inputs: N(0, 1) * scale
    train: bool = False  # the model is handed over in train mode


# --------------------------------------------------------------------------- interpreter


def _odd(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "clamp":
        return y.clamp(-1.0, 2.0)
    if act == "leaky":
        return F.leaky_relu(y, -0.25)
    if act == "abs":
        return y.abs()
    return -y if act == "neg" else y


class _ActMixin:
    act = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _odd(super().forward(x), self.act)  # type: ignore[misc]


class ActBatchNorm1d(_ActMixin, nn.BatchNorm1d):
    pass


class ActBatchNorm2d(_ActMixin, nn.BatchNorm2d):
    pass


class ActBatchNorm3d(_ActMixin, nn.BatchNorm3d):
    pass


class AffineNorm(nn.Module):
    """A hand-written norm module: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    def __init__(self, shape: tuple[int, ...], eps: float, affine: bool) -> None:
        super().__init__()
        self.eps, self.affine = eps, affine
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.mean) / torch.sqrt(self.var + self.eps)
        return y * self.weight + self.bias if self.affine else y


_ACTS = {
    "relu": torch.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "gelu": F.gelu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "hardswish": F.hardswish,
    "elu": F.elu, "relu6": F.relu6,
}  # fmt: skip


class ProgramModule(nn.Module):
    """Runs a :class:`Program`'s ops (module docstring). Built op by op with :meth:`append`."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.ops: list[Any] = []
        self.outputs: tuple[int, ...] = ()

    def append(self, op: Any, in_shape: tuple[int, ...]) -> None:
        """Add op ``len(self.ops)``, reading a value of per-sample shape ``in_shape``."""
        i, rank, c = len(self.ops), len(in_shape) + 1, in_shape[0]
        dims = rank - 2
        if isinstance(op, Conv):
            cls = getattr(nn, f"Conv{'Transpose' if op.transposed else ''}{dims}d")
            extra = {"output_padding": op.out_pad} if op.transposed else {"padding_mode": op.mode}
            self.add_module(f"op{i}", cls(c, op.cout, op.k, op.stride, op.padding, dilation=op.dilation,
                                          groups=op.groups, bias=op.bias, **extra))  # fmt: skip
        elif isinstance(op, Linear):
            fin = in_shape[-1] if op.axis == "last" else c
            self.add_module(f"op{i}", nn.Linear(fin, op.fout, bias=op.bias))
        elif isinstance(op, Matmul):
            w = torch.randn(in_shape[-1], op.fout) / math.sqrt(in_shape[-1])
            self.register_parameter(f"op{i}_w", nn.Parameter(w))
            if op.bias:
                self.register_parameter(f"op{i}_b", nn.Parameter(torch.randn(op.fout)))
        elif isinstance(op, Norm):
            self._norm(i, op, c, rank)
        self.ops.append(op)

    def _norm(self, i: int, op: Norm, c: int, rank: int) -> None:
        bcast = (c,) + (1,) * (rank - 2)
        if op.kind == "module":
            d = max(1, rank - 2)
            cls = globals()[f"ActBatchNorm{d}d"] if op.act else getattr(nn, f"BatchNorm{d}d")
            norm = cls(c, eps=op.eps, affine=op.affine, track_running_stats=op.track)
            if op.act:
                norm.act = op.act
            self.add_module(f"op{i}", norm)
        elif op.kind == "affine_module":
            self.add_module(f"op{i}", AffineNorm(bcast, op.eps, op.affine))
        else:  # functional / affine_inline: the top module's own tensors
            shape = (c,) if op.kind == "functional" else bcast
            if op.track or op.kind == "affine_inline":
                self.register_buffer(f"op{i}_mean", torch.zeros(shape))
                self.register_buffer(f"op{i}_var", torch.ones(shape))
            if op.affine:
                self.register_parameter(f"op{i}_weight", nn.Parameter(torch.ones(shape)))
                self.register_parameter(f"op{i}_bias", nn.Parameter(torch.zeros(shape)))

    def _t(self, i: int, name: str) -> torch.Tensor | None:
        return getattr(self, f"op{i}_{name}", None)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Op ``i``'s module on ``x`` (a Linear over the channel axis transposes around it)."""
        op, m = self.ops[i], getattr(self, f"op{i}")
        if isinstance(op, Linear) and op.axis == "channel" and x.dim() > 2:
            return m(x.transpose(1, -1)).transpose(1, -1)
        return m(x)

    def step(self, i: int, values: list[torch.Tensor]) -> torch.Tensor:
        op = self.ops[i]
        x = values[op.src]
        if isinstance(op, (Conv, Linear)) or (
            isinstance(op, Norm) and op.kind in ("module", "affine_module")
        ):
            return self.layer(i, x)
        if isinstance(op, Call):
            return self.layer(op.op, x)
        if isinstance(op, Matmul):
            y = x @ self._t(i, "w")
            return y + self._t(i, "b") if op.bias else y
        if isinstance(op, Norm) and op.kind == "functional":
            training = self.training if op.track else True
            return F.batch_norm(x, self._t(i, "mean"), self._t(i, "var"), self._t(i, "weight"),
                                self._t(i, "bias"), training=training, eps=op.eps)  # fmt: skip
        if isinstance(op, Norm):  # affine_inline
            y = (x - self._t(i, "mean")) / torch.sqrt(self._t(i, "var") + op.eps)
            return y * self._t(i, "weight") + self._t(i, "bias") if op.affine else y
        return _plain(op, x, values)

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for i in range(len(self.ops)):
            values.append(self.step(i, values))
        if self.outputs:
            return (values[-1], *(values[j] for j in self.outputs))
        return values[-1]


def _plain(op: Any, x: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """Ops without tensors of their own."""
    dims = x.dim() - 2
    if isinstance(op, Scale):
        v = op.value
        return {"mul": lambda: x * v, "add": lambda: x + v, "div": lambda: x / v,
                "sub": lambda: x - v, "rsub": lambda: v - x}[op.op]()  # fmt: skip
    if isinstance(op, Act):
        return _ACTS[op.kind](x)
    if isinstance(op, Pool):
        if op.kind.startswith("adaptive"):
            return getattr(F, f"{op.kind}_pool{dims}d")(x, op.size)
        if op.kind == "max":
            return getattr(F, f"max_pool{dims}d")(x, op.k, op.stride, op.padding, ceil_mode=op.ceil)
        return getattr(F, f"avg_pool{dims}d")(x, op.k, op.stride, op.padding, ceil_mode=op.ceil,
                                               count_include_pad=op.count_pad)  # fmt: skip
    if isinstance(op, Pad):
        return F.pad(x, (op.p, op.p) * dims, mode="constant" if op.mode == "zeros" else op.mode)
    if isinstance(op, Up):
        mode = op.mode if op.mode == "nearest" else ("linear", "bilinear", "trilinear")[dims - 1]
        return F.interpolate(x, scale_factor=2, mode=mode)
    if isinstance(op, Slice):
        return x[:, op.start : op.stop]
    if isinstance(op, Transpose):
        return x.transpose(op.a, op.b)
    if isinstance(op, Flatten):
        return x.flatten(1)
    if isinstance(op, Mean):
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=op.keepdim)
    if isinstance(op, Add):
        return x + values[op.other]
    if isinstance(op, Cat):
        return torch.cat([x, values[op.other]], 1)
    raise TypeError(f"unknown op {op!r}")


def shapes_of(program: Program) -> list[tuple[int, ...]]:
    """Per-sample shape of every value (a meta run: no memory, no RNG)."""
    with torch.device("meta"):
        module = ProgramModule(program.shape)
        values = [torch.empty(program.batch, *program.shape)]
        for i, op in enumerate(program.ops):
            module.append(op, tuple(values[op.src].shape[1:]))
            values.append(module.eval().step(i, values))
    return [tuple(v.shape[1:]) for v in values]


# --------------------------------------------------------------------------- building


def _gamma(kind: str, c: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    if kind == "mixed":
        g = g * torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).double()
    elif kind == "negative":
        g = -g
    elif kind == "tiny":
        g = g * 1e-4 * torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).double()
    elif kind == "zero":
        g[::2] = 0.0
    return g


def _fill_norm(module: ProgramModule, i: int, op: Norm, gen: torch.Generator) -> None:
    target = getattr(module, f"op{i}", None)
    bn = isinstance(target, nn.modules.batchnorm._BatchNorm)
    for what in ("mean", "var", "weight", "bias"):
        if target is None:
            t = module._t(i, what)
        else:
            t = getattr(target, f"running_{what}" if bn and what in ("mean", "var") else what, None)
        if t is None:
            continue
        c = t.shape[0]
        if what == "mean":
            v = torch.randn(c, generator=gen, dtype=torch.float64) * op.mean
        elif what == "var":
            lo, hi = op.var
            v = 10 ** (lo + (hi - lo) * torch.rand(c, generator=gen, dtype=torch.float64))
        elif what == "weight":
            v = _gamma(op.gamma, c, gen)
        else:
            v = torch.randn(c, generator=gen, dtype=torch.float64) * op.beta
        t.data.copy_(v.reshape(t.shape))


@dataclass
class Built:
    model: ProgramModule
    inputs: tuple[torch.Tensor, ...]


def build(program: Program) -> Built:
    """The model (weights from torch's default init under ``manual_seed(seed)``, global RNG
    restored) and the given inputs of a program."""
    dtype = getattr(torch, program.dtype)
    shapes = shapes_of(program)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(program.seed)
        model = ProgramModule(program.shape)
        for i, op in enumerate(program.ops):
            model.append(op, shapes[: i + 1][op.src])
    gen = torch.Generator().manual_seed(program.seed)
    with torch.no_grad():
        for i, op in enumerate(program.ops):
            if isinstance(op, Norm):
                _fill_norm(model, i, op, gen)
    model.outputs = tuple(program.outputs)
    model = model.to(dtype).train(program.train)
    x = torch.randn(program.batch, *program.shape, generator=gen, dtype=torch.float64) * program.scale
    return Built(model, (x.to(dtype),))


def recheck(program: Program) -> None:
    """Rebuild ``program`` and run every check of the differential fuzzer on it (raises on a failure)."""
    from test_diff_fuzz import check_program  # the checks live with the test

    print(check_program(program))


# --------------------------------------------------------------------------- generation

DTYPE_WEIGHTS = ("float32",) * 7 + ("float64", "float16", "bfloat16")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
GAMMAS = ("positive", "mixed", "negative", "tiny", "zero")


class _Draft:
    """A program being drawn: its ops and the shape of every value so far."""

    def __init__(self, shape: tuple[int, ...], dtype: str, batch: int) -> None:
        self.dtype, self.batch = dtype, batch
        self.module = ProgramModule(shape).to("meta")
        self.values = [torch.empty(batch, *shape, device="meta")]
        self.callable: dict[int, tuple[int, ...]] = {}  # op index -> its input shape

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(v.shape[1:]) for v in self.values]

    def push(self, op: Any) -> int:
        """Append ``op`` (it must be valid); the index of the value it makes."""
        in_shape = self.shapes[op.src]
        i = len(self.module.ops)
        with torch.device("meta"):
            self.module.append(op, in_shape)
            self.values.append(self.module.eval().step(i, self.values))
        if isinstance(op, (Conv, Linear)) or (
            isinstance(op, Norm) and op.kind in ("module", "affine_module")
        ):
            self.callable[i] = in_shape
        return len(self.values) - 1

    @property
    def low(self) -> bool:
        return self.dtype in ("float16", "bfloat16")


def _fits(shape: tuple[int, ...]) -> bool:
    return max(shape) <= MAX_SIDE and math.prod(shape) <= MAX_NUMEL


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(draw: Any, g: _Draft, src: int, **fixed: Any) -> Conv:
    shape = g.shapes[src]
    c, spatial = shape[0], shape[1:]
    cout = fixed.pop("cout", None) or draw(st.integers(1, 8))
    groups = draw(st.sampled_from(_divisors(math.gcd(c, cout))))
    if "k" in fixed:
        return Conv(cout=cout, groups=groups, bias=draw(st.booleans()), src=src, **fixed)
    small = min(spatial)
    transposed = draw(st.integers(0, 4)) == 0
    k = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2)) if k > 1 else 1
    stride = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    if transposed:
        padding = draw(st.integers(0, dilation * (k - 1) // 2))
        out_pad = draw(st.integers(0, max(stride, dilation) - 1))
        op = Conv(cout, k, stride, padding, dilation, groups, bias, transposed=True, out_pad=out_pad, src=src)
        out = [(s - 1) * stride - 2 * padding + dilation * (k - 1) + out_pad + 1 for s in spatial]
        if _fits((cout, *out)):
            return op
        return Conv(cout=cout, groups=groups, bias=bias, src=src)
    mode = draw(st.sampled_from(PADDING_MODES))
    limit = {"zeros": 2, "replicate": 2, "reflect": small - 1, "circular": small}[mode]
    padding = draw(st.integers(0, max(0, min(2, limit))))
    if small + 2 * padding < dilation * (k - 1) + 1:
        k, dilation = 1, 1
    return Conv(cout, k, stride, padding, dilation, groups, bias, mode if padding else "zeros", src=src)


def _norm(draw: Any, g: _Draft, src: int, kind: str | None = None) -> Norm:
    kind = kind or draw(
        st.sampled_from(("module",) * 4 + ("functional",) * 2 + ("affine_module", "affine_inline"))
    )
    act = draw(st.sampled_from(("",) * 5 + ("clamp", "leaky", "abs", "neg"))) if kind == "module" else ""
    track = kind.startswith("affine") or draw(st.integers(0, 6)) > 0
    lowest = -4 if g.dtype == "float16" else -12
    lo = draw(st.integers(lowest, 2))
    hi = min(3, lo + draw(st.integers(0, 4)))
    means = (0.0, 0.1, 1.0, 30.0) + (() if g.dtype == "float16" else (1000.0,))
    return Norm(
        kind=kind, act=act, affine=draw(st.integers(0, 4)) > 0, track=track,
        eps=draw(st.sampled_from((1e-5, 1e-3, 0.1) + ((0.0,) if track else ()))),
        mean=draw(st.sampled_from(means)),
        var=(float(lo), float(hi)), gamma=draw(st.sampled_from(GAMMAS)),
        beta=draw(st.sampled_from((0.0, 0.5, 5.0))), src=src,
    )  # fmt: skip


def _pool(draw: Any, g: _Draft, src: int) -> Pool | None:
    shape = g.shapes[src]
    small, dims = min(shape[1:]), len(shape) - 1
    kinds = ["max", "adaptive_avg", "adaptive_max"] + ([] if g.low and dims == 3 else ["avg", "avg"])
    kind = draw(st.sampled_from(kinds))
    if kind.startswith("adaptive"):
        return Pool(kind, size=draw(st.integers(1, small)), src=src)
    k = draw(st.integers(1, min(3, small)))  # torch's 3d pools want the input no smaller than the kernel
    padding = draw(st.integers(0, k // 2))
    stride = draw(st.integers(1, k))
    return Pool(kind, k, stride, padding, draw(st.booleans()), draw(st.booleans()), src=src)


def _single(draw: Any, g: _Draft, src: int, what: str = "any") -> None:
    shape = g.shapes[src]
    rank, c = len(shape) + 1, shape[0]
    choices = ["norm"] * 4 + ["linear"] * 2 + ["scale", "scale", "act", "act", "matmul"]
    if rank >= 3:
        choices += ["conv"] * 4 + ["pool"] * 2 + ["pad", "pad", "transpose", "mean"]
        choices += ["up", "up"] if _fits((c, *(2 * s for s in shape[1:]))) else []
        choices += ["flatten"] if math.prod(shape) <= 48 else []
    choices += ["slice"] if c >= 2 else []
    same = [j for j, s in enumerate(g.shapes) if s == shape and j != src % len(g.values)]
    choices += ["add", "add"] if same else []
    cats = [
        j for j, s in enumerate(g.shapes) if len(s) == len(shape) and s[1:] == shape[1:] and s[0] + c <= 12
    ]
    choices += ["cat"] if cats else []
    calls = [j for j, s in g.callable.items() if s == shape]
    choices += ["call"] if calls else []
    what = draw(st.sampled_from(choices)) if what not in choices else what
    if what == "conv":
        g.push(_conv(draw, g, src))
    elif what == "norm":
        g.push(_norm(draw, g, src))
    elif what == "linear":
        fout = draw(st.integers(1, 8))
        axis = draw(st.sampled_from(("last", "channel"))) if rank >= 3 else "last"
        axis = axis if axis == "channel" or _fits((*shape[:-1], fout)) else "channel"
        g.push(Linear(fout, draw(st.booleans()), axis, src))
    elif what == "matmul":
        fout = draw(st.integers(1, 8))
        if _fits((*shape[:-1], fout)):
            g.push(Matmul(fout, draw(st.booleans()), src))
    elif what == "scale":
        value = draw(st.sampled_from((-2.0, -0.5, 0.5, 3.0, 100.0, -100.0, 1e-3)))
        g.push(Scale(draw(st.sampled_from(("mul", "add", "div", "sub", "rsub"))), value, src))
    elif what == "act":
        g.push(Act(draw(st.sampled_from(sorted(_ACTS))), src))
    elif what == "pool":
        g.push(_pool(draw, g, src))
    elif what == "pad":
        mode = draw(st.sampled_from(PADDING_MODES))
        limit = {"zeros": 2, "replicate": 2, "reflect": min(shape[1:]) - 1, "circular": min(shape[1:])}[mode]
        if limit >= 1 and _fits((c, *(s + 2 for s in shape[1:]))):
            g.push(Pad(mode, draw(st.integers(1, min(limit, 2))), src))
    elif what == "up":
        g.push(Up(draw(st.sampled_from(("nearest", "nearest", "linear"))), src))
    elif what == "slice":
        start = draw(st.integers(0, c - 1))
        g.push(Slice(start, draw(st.integers(start + 1, c)), src))
    elif what == "transpose":
        a, b = draw(st.sampled_from([(a, b) for a in range(1, rank) for b in range(a + 1, rank)]))
        g.push(Transpose(a, b, src))
    elif what == "flatten":
        g.push(Flatten(src))
    elif what == "mean":
        g.push(Mean(draw(st.booleans()), src))
    elif what == "add":
        g.push(Add(draw(st.sampled_from(same)), src))
    elif what == "cat":
        g.push(Cat(draw(st.sampled_from(cats)), src))
    else:
        g.push(Call(draw(st.sampled_from(calls)), src))


def _macro(draw: Any, g: _Draft, src: int) -> None:
    """Shapes that exercise the folds and merges: layer -> (op) -> norm, norm -> layer, RepVGG-like
    branches summed, a residual, a layer or norm module called twice."""
    shape = g.shapes[src]
    rank, c, base = len(shape) + 1, shape[0], src % len(g.values)
    kinds = ["layer_norm", "norm_layer", "norm_twice"] + (
        ["rep", "residual", "conv_twice"] if rank >= 3 else []
    )
    what = draw(st.sampled_from(kinds))
    if what == "layer_norm":
        v = g.push(
            _conv(draw, g, src)
            if rank >= 3 and draw(st.booleans())
            else Linear(draw(st.integers(1, 8)), draw(st.booleans()), "channel" if rank >= 3 else "last", src)
        )
        if draw(st.integers(0, 2)) > 0:
            through = (
                ["pool", "pad", "up", "slice", "transpose", "scale", "any"] if rank >= 3 else ["scale", "any"]
            )
            _single(draw, g, v, draw(st.sampled_from(through)))  # one op on the way (or anything)
        g.push(_norm(draw, g, -1))
    elif what == "norm_layer":
        g.push(_norm(draw, g, src))
        g.push(
            _conv(draw, g, -1) if rank >= 3 else Linear(draw(st.integers(1, 8)), draw(st.booleans()), src=-1)
        )
    elif what == "norm_twice":
        v = g.push(_norm(draw, g, src, kind="module"))
        g.push(draw(st.sampled_from((Act("relu"), Scale("mul", -0.5), Scale("add", 3.0)))))
        g.push(Call(v - 1))
    elif what == "conv_twice":
        k = draw(st.sampled_from((1, 3)))
        v = g.push(_conv(draw, g, src, cout=c, k=k, padding=k // 2))
        if draw(st.booleans()):
            g.push(_norm(draw, g, -1))
        g.push(Call(v - 1))
    elif what == "residual":
        g.push(_conv(draw, g, src, cout=c, k=3, padding=1))
        g.push(_norm(draw, g, -1))
        g.push(Act(draw(st.sampled_from(("relu", "silu")))))
        g.push(_conv(draw, g, -1, cout=c, k=1))
        g.push(Add(base))
    else:  # rep: parallel branches of one tensor, summed
        if draw(st.integers(0, 3)) == 0:
            base = g.push(
                Scale(draw(st.sampled_from(("add", "mul"))), draw(st.sampled_from((100.0, -0.5))), base)
            )
        outs = []
        for k in draw(st.lists(st.sampled_from((3, 1, 0, -1)), min_size=2, max_size=3, unique=True)):
            if k > 0:
                v = g.push(_conv(draw, g, base, cout=c, k=k, padding=k // 2))
                if draw(st.integers(0, 3)) > 0:
                    v = g.push(
                        _norm(draw, g, v, kind=draw(st.sampled_from(("module", "module", "functional"))))
                    )
            elif k == 0:
                v = g.push(_norm(draw, g, base)) if draw(st.booleans()) else base
            else:
                avg = min(shape[1:]) >= 3 and not (g.low and rank == 5)
                pool = g.push(Pool("avg", 3, 1, 1, count_pad=False, src=base)) if avg else base
                v = g.push(_norm(draw, g, pool, kind="module"))
            outs.append(v)
        v = outs[0]
        for other in outs[1:]:
            v = g.push(Add(other, v))
        if draw(st.booleans()):
            g.push(_norm(draw, g, v))


def dead_values(ops: Any, n: int) -> list[int]:
    """Values (other than the input and the last) that no later op reads: ``forward`` computes
    them and drops them."""
    read = {n - 1}
    for i in range(len(ops) - 1, -1, -1):
        if i + 1 in read:
            read.add(ops[i].src % (i + 1))
            read.update([ops[i].other] if isinstance(ops[i], (Add, Cat)) else [])
    return [v for v in range(1, n - 1) if v not in read]


@st.composite
def programs(draw: Any, dtypes: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")) -> Program:
    """A random valid :class:`Program` (module docstring)."""
    dtype = draw(st.sampled_from([d for d in DTYPE_WEIGHTS if d in dtypes]))
    rank = draw(st.sampled_from((2, 3, 3, 4, 4, 4, 5, 5)))
    side = {2: 1, 3: 12, 4: 7, 5: 4}[rank]
    shape = (draw(st.integers(1, 6)), *(draw(st.integers(1, side)) for _ in range(rank - 2)))
    batch = 4
    g = _Draft(shape, dtype, batch)
    for _ in range(draw(st.integers(2, 6))):
        if len(g.module.ops) >= 14:
            break
        src = -1 if draw(st.integers(0, 4)) else draw(st.integers(0, len(g.values) - 1))
        (_macro if draw(st.integers(0, 2)) == 0 else _single)(draw, g, src)
    if not g.module.ops:
        g.push(_norm(draw, g, -1))
    n = len(g.values)
    outputs = (
        set(draw(st.sets(st.integers(1, n - 2), max_size=2)))
        if n > 2 and draw(st.integers(0, 4)) == 0
        else set()
    )
    if draw(st.integers(0, 4)) > 0:  # usually every value is used: dead code (1 in 5) is a case of its own
        outputs |= set(dead_values(g.module.ops, n))
    return Program(
        shape=shape, ops=tuple(g.module.ops), outputs=tuple(sorted(outputs)), dtype=dtype,
        seed=draw(st.integers(0, 2**16)), batch=batch,
        scale=draw(st.sampled_from((1.0, 1.0, 10.0, 0.01))), train=draw(st.integers(0, 5)) == 0,
    )  # fmt: skip
