"""Multiply-accumulates of a captured program, read from its graph (nothing is run).

For each op that multiplies (the ATen ops convolutions and Linear layers become), from the shapes
``torch.export`` recorded on its node (``node.meta["val"]``, a dynamic axis at its example size):

* convolution (transposed too): ``output elements * in_channels / groups * kernel elements``
  (transposed: ``input elements * out_channels / groups * kernel elements``);
* ``mm``/``addmm``/``bmm``/``matmul``/``linear``: ``output elements * K`` (K the contracted size).

Elementwise ops (a BatchNorm's scale and shift, activations) are not counted, as the peers'
counters do not count them: folding a norm leaves the MACs as they are; merging branches into one
conv (reparameterization) lowers them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.export import ExportedProgram

_CONV = {"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d"}  # fmt: skip
_MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"}


def program_macs(program: ExportedProgram) -> int:
    """The multiply-accumulates of one run of ``program`` at its example input sizes."""
    total = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        if name in _CONV:
            total += _conv_macs(node, name, out)
        elif name in _MATMUL:
            args = [a.meta.get("val") for a in node.args if hasattr(a, "meta")]
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1]
            if name in ("addmm", "baddbmm"):
                mats = mats[1:]  # the added term
            if mats:
                total += _numel(out.shape) * _size(mats[0].shape[-1])
    return total


def _conv_macs(node: torch.fx.Node, name: str, out: torch.Tensor) -> int:
    x, w = (a.meta.get("val") for a in node.args[:2])
    transposed = "transpose" in name or (name == "convolution" and bool(node.args[6]))
    kernel = _numel(w.shape[2:])
    if transposed:  # every input element meets every kernel tap of its group's output channels
        return _numel(x.shape) * _size(w.shape[1]) * kernel
    return _numel(out.shape) * _size(w.shape[1]) * kernel  # w: [out, in/groups, *k]


def _size(d: int | torch.SymInt) -> int:
    return int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)


def _numel(shape: Sequence[int | torch.SymInt]) -> int:
    return math.prod(_size(d) for d in shape)
