"""What the norm-affine planner asks of a graph beyond :class:`~normfold.engine.view.GraphView`.

:class:`NormView` adds two queries to the rules' view, in the vocabulary of the math:

* :meth:`NormView.affine_norms`: every norm of the graph found by its pattern (a built-in
  ``layer_norm`` / ``rms_norm`` / ``group_norm`` op, or hand-written ``mean``/``rsqrt`` arithmetic),
  as an :class:`AffineNorm`: its ops, the tensor ``y = gamma * n + beta`` it ends with, the channel
  axis ``gamma`` varies along, and ``gamma``/``beta`` as *parameter expressions*
  (``gamma = offset + w``, ``w`` a parameter by name) that a plan can write back;
* :meth:`NormView.cast_input`: the input of a dtype cast (a cast moves no element);
* :meth:`NormView.matmul_layer`: matmuls with a parameter the rules' view does not read as layers
  (a batch of expert matrices in one ``bmm``/``matmul``; ``x @ W.T`` written with ``.T``).

An IR adapter implements both next to its :class:`~normfold.engine.view.GraphView`
(:class:`~normfold.engine.norm_affine.torch_norms.TorchNormView` for ``torch.export``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from normfold.engine.view import GraphView, LayerRef, Node


@dataclass(frozen=True)
class AffineParam:
    """``gamma`` or ``beta`` as ``offset + p``: ``p`` the parameter named ``fqn`` (graph node
    ``source``), ``nodes`` the ops computing the expression from it (casts, ``+ offset``)."""

    fqn: str
    offset: float
    source: Node
    nodes: tuple[Node, ...] = ()


@dataclass(frozen=True)
class AffineNorm:
    """A norm found by pattern: ``output = gamma * n(input) + beta`` along ``axis`` of ``output``.

    ``kind``: ``layer_norm``, ``rms_norm`` or ``group_norm``; ``pattern``: how it was written (the
    op, or ``hand-written``); ``nodes``: its ops in graph order (statistics, normalization,
    affine, trailing casts); ``weight``/``bias``: None when absent; ``refused``: ``(code, reason)``
    when its scale or shift is no parameter expression a plan can write back."""

    kind: str
    pattern: str
    input: Node
    output: Node
    nodes: tuple[Node, ...]
    axis: int
    channels: int
    weight: AffineParam | None
    bias: AffineParam | None
    refused: tuple[str, str] | None = None


class NormView(GraphView, Protocol):
    """A :class:`GraphView` that also finds norms by pattern (module docstring)."""

    def affine_norms(self) -> list[AffineNorm]:
        """Every norm of the graph, in graph order."""
        ...

    def cast_input(self, node: Node) -> Node | None:
        """The input of ``node`` when it is a dtype cast (any dtypes), else None."""
        ...

    def row_gather(self, node: Node) -> Node | None:
        """The input of ``node`` when it selects whole rows of it: ``x[idx]`` indexing leading axes
        only (an MoE's dispatch of tokens to their experts), the last axis kept whole; else None."""
        ...

    def matmul_layer(self, node: Node) -> LayerRef | None:
        """A matmul with a parameter that :meth:`GraphView.layer_reading` does not read: a batch of
        Linears (MoE experts, kind ``batched_linear``, no bias): ``x @ W`` with ``W`` a 3-d parameter
        ``(E, in, out)`` (``in_out``) or ``(E, out, in)`` read transposed (``via``); or ``x @ W.T``
        written with ``.T`` (and ``+ b``: then the layer is the add, ``inner`` the matmul); or a grouped
        matmul of ``(T, in)`` rows with such a ``W`` (:mod:`.grouped_mm`). Else None."""
        ...
