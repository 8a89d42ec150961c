"""The graph view: the narrow interface every fold rule reads a graph through.

Design note (the seam between rules and IRs)
--------------------------------------------
Rules (:mod:`normfold.engine.rules`) never touch an IR. They see *nodes* (opaque handles) and ask
a :class:`GraphView` about them in the vocabulary of the math, not of an op set:

* what a node is: a layer (:class:`LayerRef`: Conv, ConvTranspose, Linear/Gemm/MatMul with a
  parameter weight), a batch norm (:class:`BatchNormRef`), one step of an affine chain
  (:class:`AffineStep`: ``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x``), an op a per-channel map
  passes through (:class:`ThroughRef`: layout, mean or max), a merge (``concat`` / ``add``), a
  graph input or output;
* its users, shape, dtype, owning module and a readable description;
* constants by node (float64 values of anything computed from parameters and literals alone) and
  parameters by their user-facing name (FQN or initializer name);
* where the channel axis goes through one op: :meth:`GraphView.step_ids` runs the op on a tensor
  of channel ids (``-1``: not a channel of ours), so a rule proves channel correspondence by
  running the path instead of reasoning about each layout op.

:class:`normfold.engine.torch_view.TorchView` implements it over a ``torch.export`` capture (ATen
ops read by schema name); an ONNX adapter (onnx-ir nodes and values, ``BatchNormalization``,
``Gemm``, ``Reshape`` ...) implements the same methods, and every rule runs on it unchanged.
Plans come out keyed by node names and value names (FQNs / initializer names), which is all the
appliers of either IR need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Node = Any  # an IR's node handle (torch.fx.Node, onnx_ir.Node): rules never look inside


@dataclass(frozen=True)
class LayerRef:
    """A Conv/ConvTranspose/Linear op as rules see it."""

    node: Node
    kind: str  # "conv", "conv_transpose" or "linear"
    input: Node
    weight: Node
    bias: Node | None
    groups: int
    kernel_dims: int  # spatial dims of the kernel (0 for linear)
    zero_padding: bool  # padding with zeros on some side (forward folds are inexact then)
    #: matmul weights are ``(in, out)``, read directly or through a transpose (``via``)
    in_out: bool = False
    via: Node | None = None
    inner: Node | None = None  # the matmul of a ``matmul + bias`` layer

    @property
    def channel_axis(self) -> int:
        """Axis of the input/output channels, counted from the end (batched or not)."""
        return -(self.kernel_dims + 1)

    @property
    def transposed(self) -> bool:
        return self.kind == "conv_transpose"


@dataclass(frozen=True)
class ThroughRef:
    """An op a per-channel affine map commutes with: ``kind`` is ``layout``, ``mean`` or ``max``
    (``max`` commutes with increasing maps only); ``refused``: why this instance does not commute
    (avg pooling counting zero padding, dropout in training, constant padding), else None."""

    name: str
    kind: str
    input: Node
    refused: str | None = None


@dataclass(frozen=True)
class BatchNormRef:
    """An eval- or train-mode batch norm: ``y = (x - mean) / sqrt(var + eps) * weight + bias``."""

    input: Node
    weight: Node | None
    bias: Node | None
    running_mean: Node | None
    running_var: Node | None
    eps: float
    training: bool


@dataclass(frozen=True)
class AffineStep:
    """One elementwise op with a constant operand: ``op`` in mul, div, add, sub, rsub (``c - a*x``);
    ``constant`` float64; ``alpha`` the op's scale of its second operand (add/sub/rsub)."""

    op: str
    constant: torch.Tensor
    input: Node
    alpha: float = 1.0


class GraphView(Protocol):
    """What rules may ask of a graph (implemented per IR; see the module docstring)."""

    def nodes(self) -> Iterable[Node]:
        """Op nodes in topological order."""
        ...

    def name(self, node: Node) -> str: ...

    def users(self, node: Node) -> list[Node]:
        """Ops reading the node's value, excluding uses that read only its shape."""
        ...

    def uses(self, user: Node, node: Node) -> int:
        """How many of ``user``'s data operands are ``node``."""
        ...

    def operands(self, node: Node) -> list[Node]:
        """The node's tensor operands (for a merge: the merged tensors)."""
        ...

    def shape(self, node: Node) -> tuple[int, ...]: ...

    def dtype(self, node: Node) -> torch.dtype | None: ...

    def is_input(self, node: Node) -> bool:
        """A graph input: data, or a parameter/buffer/constant the graph takes as an input."""
        ...

    def is_output(self, node: Node) -> bool: ...

    def layer(self, node: Node) -> LayerRef | None:
        """The layer whose output ``node`` is."""
        ...

    def layer_reading(self, node: Node) -> LayerRef | None:
        """The layer whose data input ``node`` is the first op of (a matmul inside ``x @ W + b``)."""
        ...

    def through(self, node: Node) -> ThroughRef | None: ...

    def merge_kind(self, node: Node) -> str | None:
        """``concat`` or ``add`` for an op that merges tensors (whatever its operands), else None."""
        ...

    def batch_norm(self, node: Node) -> BatchNormRef | None: ...

    def affine_step(self, node: Node) -> AffineStep | None: ...

    def constant(self, node: Node) -> torch.Tensor | None:
        """float64 value of a node computed from parameters and literals only, else None."""
        ...

    def is_constant(self, node: Node) -> bool: ...

    def state_name(self, node: Node) -> str | None:
        """The user-facing name (FQN, initializer name) of a parameter/buffer node, else None."""
        ...

    def is_parameter(self, node: Node) -> bool: ...

    def owner(self, node: Node) -> tuple[str, str, str]:
        """``(call key, module path, class name)`` of the code that ran ``node`` (``""`` if none)."""
        ...

    def canonical(self, path: str) -> str: ...

    def describe(self, node: Node) -> str: ...

    def op_name(self, node: Node) -> str: ...

    def is_activation(self, node: Node) -> bool: ...

    def reduced_dims(self, node: Node, rank: int) -> tuple[int, ...] | None:
        """The axes a reduction (mean, amax over dims) reduces, else None."""
        ...

    def step_ids(
        self, node: Node, prev: Node, ids: torch.Tensor, resolve: Callable[[Node], Node]
    ) -> torch.Tensor:
        """``node`` run on channel ids: ``ids`` for the operand that is ``prev`` (after
        ``resolve``), ``-1`` for every other tensor operand."""
        ...
