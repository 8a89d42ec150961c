"""The branches of a sum as convs of the block's input, and the geometry one merge needs.

A :class:`Branch` is one summand seen as a conv of the block's input ``x`` (kernel, stride, padding,
dilation, groups; a kept norm or the identity as a 1-tap kernel, an average pool as a constant
kernel); :class:`Merge` is a block whose branches become one conv and :class:`Unmerged` one that
stays, with its code. :func:`check_geometry` holds the preconditions of
:mod:`normfold.engine.reparam`'s docstring (centred in the largest kernel ``K``, branch ``i`` reads
the same windows exactly when ``p_i = P - d * (K - k_i) / 2`` on every axis; same stride, groups
and dilation; a 1-tap branch keeps the channel count), each refusal with its code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from normfold.codes.kept import Kept
from normfold.engine.capture import bind, shape
from normfold.engine.context import Refused
from normfold.engine.records import Unit
from normfold.engine.torch_view import describe

__all__ = [
    "Branch", "Merge", "Unmerged", "check_geometry", "conv_padding", "ints", "merge_target", "per_channel",
    "pool_branch",
]  # fmt: skip


@dataclass(frozen=True)
class Branch:
    """One summand of a block, as a conv of the block's input."""

    kind: str  # "conv", "norm" (a kept per-channel map), "identity" or "avg_pool"
    nodes: tuple[str, ...]  # its ops, first to last (empty for the identity)
    kernel: tuple[int, ...]  # spatial kernel (1s for a 1-tap branch)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...] | None  # None: any (a 1-tap kernel)
    groups: int | None = None  # conv branches only
    layer: str | None = None  # the conv op
    weight: str | None = None  # FQNs of a conv branch
    bias: str | None = None
    scale: torch.Tensor | None = field(default=None, compare=False)  # per channel, float64
    shift: torch.Tensor | None = field(default=None, compare=False)
    unit: Unit | None = None  # the kept norm this branch takes away
    #: per output channel factor the sum applies to this branch (a subtraction, a layer scale
    #: of a sub-sum); None: 1
    coeff: torch.Tensor | None = field(default=None, compare=False)

    def label(self) -> str:
        size = "x".join(map(str, self.kernel))
        if self.kind == "norm":
            return "norm" if self.unit is not None and self.unit.kind == "batch_norm" else "scale"
        return {"conv": f"conv {size}", "avg_pool": f"avg_pool {size}"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class Merge:
    """A block whose branches become one conv: the target (largest kernel) takes the sum."""

    adds: tuple[str, ...]  # the add ops of the sum, the last one first
    module: str  # module path owning the sum ("" for the model's forward)
    target: Branch
    branches: tuple[Branch, ...]  # every summand, target included, in the sum's order
    bias: str  # FQN of the target's bias (a new name when it has none)
    new_bias: bool
    scales: tuple[Unit, ...] = ()  # per-channel scales of sub-sums the merge takes away
    #: the target's new weight and bias (FQN -> tensor in the weight's dtype), computed when
    #: planned (:func:`normfold.engine.reparam_values.merged_values`)
    values: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)

    @property
    def weighted(self) -> bool:
        """Some branch is subtracted or scaled: the sum is more than the branches' plain sum."""
        return any(b.coeff is not None for b in self.branches)


@dataclass(frozen=True)
class Unmerged(Kept):
    """A sum of branches of one tensor that stays, with a stable code and a reason."""

    adds: tuple[str, ...]
    module: str
    code: str
    reason: str


def per_channel(coeff: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    """A branch's factor, one per output channel (None: 1 everywhere)."""
    if coeff is None or bool((coeff == 1).all()):
        return None
    return coeff.reshape(-1).expand(channels).clone()


def pool_branch(
    pool: fx.Node,
    nodes: tuple[str, ...],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    unit: Unit | None,
) -> Branch:
    args = bind(pool)
    nd = len(shape(pool)) - 2
    kernel = ints(args["kernel_size"], nd)
    stride = ints(args.get("stride") or kernel, nd)
    padding = ints(args.get("padding", 0), nd)
    what = describe(pool)
    if args.get("ceil_mode") or args.get("divisor_override") is not None:
        raise Refused("reparam_pool", f"{what} uses ceil_mode or divisor_override: not a fixed kernel")
    if any(padding) and not args.get("count_include_pad", True):
        raise Refused(
            "reparam_padding", f"{what} leaves its zero padding out of the divisor: not a fixed kernel"
        )
    return Branch(
        "avg_pool",
        (pool.name, *nodes),
        kernel,
        stride,
        padding,
        (1,) * nd,
        scale=scale,
        shift=shift,
        unit=unit,
    )


def merge_target(convs: list[Branch], branches: list[Branch]) -> Branch:
    """The conv whose kernel covers every branch's (it takes the sum)."""
    for conv in convs:
        if all(all(k <= K for k, K in zip(b.kernel, conv.kernel, strict=True)) for b in branches):
            return conv
    sizes = ", ".join(b.label() for b in branches)
    raise Refused("reparam_kernel", f"no conv kernel of the sum covers all the others ({sizes})")


def check_geometry(
    target: Branch, branches: list[Branch], x_shape: tuple[int, ...], y_shape: tuple[int, ...]
) -> None:
    """The preconditions of the module docstring, each with its code."""
    for b in branches:
        what = b.label()
        if b.kind == "conv" and b.groups != target.groups:
            raise Refused(
                "reparam_groups", f"{what} has groups={b.groups}, {target.label()} groups={target.groups}"
            )
        if b.stride != target.stride:
            raise Refused(
                "reparam_stride", f"{what} has stride {b.stride}, {target.label()} stride {target.stride}"
            )
        dilation = target.dilation if b.dilation is None else b.dilation
        if dilation != target.dilation and b.kernel != (1,) * len(b.kernel):
            raise Refused(
                "reparam_dilation", f"{what} has dilation {dilation}, {target.label()} {target.dilation}"
            )
        for k, p, K, P, d in zip(
            b.kernel, b.padding, target.kernel, target.padding, target.dilation, strict=True
        ):
            if (K - k) % 2 or p != P - d * (K - k) // 2:
                raise Refused(
                    "reparam_padding",
                    f"{what} (padding {b.padding}) and {target.label()} (padding {target.padding}) do "
                    "not see the same windows: centred in one kernel, they would read different inputs",
                )
        if b.kind != "conv" and x_shape[1] != y_shape[1]:
            raise Refused(
                "reparam_channels",
                f"the {b.kind} branch needs as many output channels as input ({x_shape[1]} -> {y_shape[1]})",
            )


def ints(value: object, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)  # type: ignore[union-attr]
    return values * n if len(values) == 1 else values


def conv_padding(
    padding: object, kernel: tuple[int, ...], dilation: tuple[int, ...], what: str
) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            raise Refused("reparam_padding", f"{what} pads 'same' unevenly (kernel {kernel})")
        return tuple(t // 2 for t in total)
    return ints(padding, len(kernel))
