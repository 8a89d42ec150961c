"""The graph view over an ONNX model held in ``onnx_ir``: the rules of :mod:`normfold.engine.rules`
run on it unchanged (:class:`normfold.engine.view.GraphView`).

Handles: an op is its ``ir.Node``; a graph input or an initializer is its ``ir.Value``; the graph's
outputs are one :data:`OUTPUT` handle (as ``torch.fx``'s output node). An op's name is its first
output's name (unique in an ONNX graph), so plans are keyed by value names.

What an op is, by ``op_type`` (default domain):

* layers: ``Conv``, ``ConvTranspose`` (weight and bias read as for ATen); ``Gemm`` (``B`` is
  ``(out, in)`` with ``transB=1``, else ``(in, out)``; ``C`` must be one value per output or one
  value); ``MatMul`` by a constant 2-D matrix (``(in, out)``), and ``Add(MatMul(x, W), b)`` with a
  1-D constant ``b`` as one layer with a bias. A Gemm's ``alpha``/``beta`` are folded into the
  values the plan reads (``alpha * B``, ``beta * C``: :mod:`normfold.engine.onnx_values`), and the
  applier writes ``alpha = beta = 1`` on a Gemm it changes, so ``Y = A B' + C'`` holds exactly;
* ``BatchNormalization`` (opsets 7, 9, 14, 15): train mode is ``training_mode=1`` (14+) or the
  optional statistics outputs present (before 14); ``spatial=0`` (opset 7) is no per-channel map;
* affine steps: ``Mul``/``Add``/``Sub``/``Div`` with one constant operand (``c - x`` too);
* through ops, merges (``Concat``, ``Add`` of two tensors) and activations:
  :mod:`normfold.engine.onnx_ops`.

Shapes come from ONNX shape inference run on the model with every input dim made concrete (the
sizes of the example inputs), so channel ids can be run along any path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import onnx_ir as ir
import torch

from normfold.engine import onnx_ops as ops
from normfold.engine.view import AffineStep, BatchNormRef, LayerRef, ThroughRef


class _Output:
    def __repr__(self) -> str:
        return "OUTPUT"


OUTPUT = _Output()  # the graph's outputs as one user
Handle = Any  # ir.Node | ir.Value | _Output


class OnnxView:
    """:class:`~normfold.engine.view.GraphView` of one ``onnx_ir`` graph (module docstring)."""

    def __init__(
        self, model: ir.Model, shapes: Mapping[str, tuple[int, ...]], types: Mapping[str, int] | None = None
    ) -> None:
        self.model, self.graph = model, model.graph
        self.shapes = dict(shapes)
        self.types = dict(types or {})  # value name -> ONNX element type, where inference found one
        self.opset = int(model.opset_imports.get("", 1))
        self.by_name: dict[str, Handle] = {}
        for v in [*self.graph.inputs, *self.graph.initializers.values()]:
            self.by_name[v.name] = v
        for n in self.graph:
            self.by_name[self.name(n)] = n
        self._consts: dict[int, torch.Tensor | None] = {}
        self._from_constants = ops.from_constants(self.graph)

    # --- structure --------------------------------------------------------------------------------

    def nodes(self) -> Iterable[ir.Node]:
        return iter(list(self.graph))

    def name(self, node: Handle) -> str:
        if isinstance(node, ir.Node):
            return node.outputs[0].name or ""
        return "output" if node is OUTPUT else node.name or ""

    def handle(self, value: ir.Value | None) -> Handle:
        if value is None:
            return None
        producer = value.producer()
        return producer if producer is not None else value

    def values_of(self, node: Handle) -> list[ir.Value]:
        if isinstance(node, ir.Node):
            return list(node.outputs)
        return [] if node is OUTPUT else [node]

    def users(self, node: Handle) -> list[Handle]:
        out: list[Handle] = []
        for v in self.values_of(node):
            for use in v.uses():
                if use.node.op_type not in ops.SHAPE_ONLY and use.node not in out:
                    out.append(use.node)
            if v.is_graph_output() and OUTPUT not in out:
                out.append(OUTPUT)
        return out

    def uses(self, user: Handle, node: Handle) -> int:
        return sum(self.handle(v) is node for v in self._inputs(user))

    def operands(self, node: Handle) -> list[Handle]:
        return [self.handle(v) for v in self._inputs(node)]

    def _inputs(self, node: Handle) -> list[ir.Value]:
        if node is OUTPUT:
            return list(self.graph.outputs)
        return [v for v in node.inputs if v is not None] if isinstance(node, ir.Node) else []

    def value(self, node: Handle) -> ir.Value | None:
        vals = self.values_of(node)
        return vals[0] if vals else None

    def shape(self, node: Handle) -> tuple[int, ...]:
        v = self.value(node)
        if v is None:
            return ()
        if v.name in self.shapes:
            return self.shapes[v.name]
        if v.const_value is not None:
            return tuple(v.const_value.shape.numpy())
        return ()

    def dtype(self, node: Handle) -> torch.dtype | None:
        v = self.value(node)
        if v is None:
            return None
        dtype = (
            v.dtype if v.dtype is not None or v.name not in self.types else ir.DataType(self.types[v.name])
        )
        return ops.torch_dtype(dtype)

    def is_input(self, node: Handle) -> bool:
        return isinstance(node, ir.Value)

    def is_output(self, node: Handle) -> bool:
        return node is OUTPUT

    # --- what a node is ---------------------------------------------------------------------------

    def _op(self, node: Handle) -> str | None:
        if isinstance(node, ir.Node) and node.domain in ("", "ai.onnx"):
            return node.op_type
        return None

    def layer(self, node: Handle) -> LayerRef | None:
        op = self._op(node)
        if op in ("Conv", "ConvTranspose"):
            return self._conv(node, op)
        if op == "Gemm":
            return self._gemm(node)
        if op == "MatMul":
            return self._matmul(node)
        if op == "Add":
            return self._matmul_add(node)
        return None

    def layer_reading(self, node: Handle) -> LayerRef | None:
        if self._op(node) == "MatMul":
            users = self.users(node)
            if len(users) == 1 and self._op(users[0]) == "Add":
                layer = self._matmul_add(users[0])
                if layer is not None and layer.inner is node:
                    return layer
        layer = self.layer(node)
        if layer is not None and self._op(node) == "Gemm" and ops.attr(node, "transA", 0):
            return None  # the data input is read transposed: its channels are not on the last axis
        return layer

    def _conv(self, node: ir.Node, op: str) -> LayerRef | None:
        if len(node.inputs) < 2 or node.inputs[1] is None or len(self.shape(node)) < 3:
            return None
        w_shape = self.shape(self.handle(node.inputs[1]))
        if len(w_shape) < 3:
            return None
        kind = "conv" if op == "Conv" else "conv_transpose"
        auto = ops.attr(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if kind == "conv_transpose":
            padded = True
        elif auto == "VALID":
            padded = False
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            padded = any(k != 1 for k in w_shape[2:])
        else:
            padded = any(int(p) != 0 for p in (ops.attr(node, "pads") or ()))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        x, w = self.handle(node.inputs[0]), self.handle(node.inputs[1])
        groups = int(ops.attr(node, "group", 1))
        return LayerRef(node, kind, x, w, self.handle(bias), groups, len(w_shape) - 2, padded)

    def _gemm(self, node: ir.Node) -> LayerRef | None:
        if len(node.inputs) < 2 or len(self.shape(node)) != 2:
            return None
        w = self.handle(node.inputs[1])
        if len(self.shape(w)) != 2:
            return None
        bias = self.handle(node.inputs[2]) if len(node.inputs) > 2 else None
        n = self.shape(node)[1]
        if bias is not None and (len(self.shape(bias)) > 2 or math.prod(self.shape(bias)) not in (1, n)):
            return None  # a C varying along the batch axis is no bias of one output channel
        in_out = not ops.attr(node, "transB", 0)
        return LayerRef(node, "linear", self.handle(node.inputs[0]), w, bias, 1, 0, False, in_out)

    def _matmul(self, node: ir.Node) -> LayerRef | None:
        """``x @ W`` with ``W`` a 2-D parameter ``(in, out)``, or ``Transpose(W)`` of one ``(out, in)``
        (``via``: the transpose, as the TorchScript exporter writes ``nn.Linear`` on 3-D inputs)."""
        x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if w is None or len(self.shape(self.handle(x))) < 2:
            return None
        w, in_out, via = self.handle(w), True, None
        if self._op(w) == "Transpose" and list(ops.attr(w, "perm") or [1, 0]) == [1, 0]:
            source = self.handle(w.inputs[0])
            if self.state_name(source) is not None and len(self.shape(source)) == 2:
                w, in_out, via = source, False, w
        if self.state_name(w) is None or len(self.shape(w)) != 2:
            return None
        return LayerRef(node, "linear", self.handle(x), w, None, 1, 0, False, in_out, via)

    def _matmul_add(self, node: ir.Node) -> LayerRef | None:
        """``MatMul(x, W) + b``: the Add is the layer's output."""
        for i in (0, 1):
            mm, b = self.handle(node.inputs[i]), self.handle(node.inputs[1 - i])
            if self._op(mm) != "MatMul" or len(self.users(mm)) != 1 or self.state_name(b) is None:
                continue
            inner = self._matmul(mm)
            if inner is None or len(self.shape(b)) != 1 or self.shape(b)[0] != self.shape(node)[-1]:
                continue
            if self.shape(node) != self.shape(mm):
                continue
            w, in_out, via = inner.weight, inner.in_out, inner.via
            return LayerRef(node, "linear", inner.input, w, b, 1, 0, False, in_out, via, mm)
        return None

    def through(self, node: Handle) -> ThroughRef | None:
        op = self._op(node)
        if op is None or not (op in ops.LAYOUT or op in ops.MEAN or op in ops.MAX):
            return None
        x = self.handle(node.inputs[0]) if node.inputs else None
        if x is None or self.dtype(x) is None or self.dtype(x) != self.dtype(node):
            return None
        if (
            not self.shape(x)
            or not self.shape(node)
            or (len(self.values_of(node)) > 1 and self._used_extra(node))
        ):
            return None
        kind = "layout" if op in ops.LAYOUT else "mean" if op in ops.MEAN else "max"
        return ThroughRef(op, kind, x, self._refused(node, op))

    def _used_extra(self, node: ir.Node) -> bool:
        """An output beyond the first is read (MaxPool's indices, Dropout's mask)."""
        return any(v.uses() or v.is_graph_output() for v in node.outputs[1:])

    def _refused(self, node: ir.Node, op: str) -> str | None:
        if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = self.constant(self.handle(node.inputs[2]))
            if mode is None or bool(mode.reshape(-1)[0]):
                return "dropout runs in training mode"
        auto = ops.attr(node, "auto_pad", "NOTSET")
        padded = any(int(p) for p in ops.attr(node, "pads") or ()) or auto not in ("NOTSET", "VALID")
        if op == "AveragePool" and ops.attr(node, "count_include_pad", 0) and padded:
            return "avg pooling counts zero padding in its divisor, which scales the norm's shift at borders"
        if op == "Slice" and any(self.constant(self.handle(v)) is None for v in node.inputs[1:] if v):
            return "a Slice with computed bounds"
        return None

    def merge_kind(self, node: Handle) -> str | None:
        op = self._op(node)
        return "concat" if op == "Concat" else "add" if op == "Add" else None

    def batch_norm(self, node: Handle) -> BatchNormRef | None:
        if self._op(node) != "BatchNormalization" or len(node.inputs) < 5:
            return None
        if self.opset < 9 and ops.attr(node, "spatial", 1) == 0:
            return None  # statistics per element, not per channel
        if self.opset >= 14:
            training = bool(ops.attr(node, "training_mode", 0))
        else:
            training = any(v.name for v in node.outputs[1:])
        x, scale, b, mean, var = (self.handle(v) for v in node.inputs[:5])
        return BatchNormRef(x, scale, b, mean, var, float(ops.attr(node, "epsilon", 1e-5)), training)

    def affine_step(self, node: Handle) -> AffineStep | None:
        op = ops.AFFINE.get(self._op(node) or "")
        if op is None or len(node.inputs) != 2 or self.is_constant(node) or self.layer(node) is not None:
            return None
        a, b = self.handle(node.inputs[0]), self.handle(node.inputs[1])
        a_var, b_var = not self.is_constant(a), not self.is_constant(b)
        if a_var and not b_var:
            x, c = a, b
        elif b_var and not a_var and op in ("mul", "add", "sub"):
            x, c, op = b, a, "rsub" if op == "sub" else op
        else:
            return None
        value = self.constant(c)
        if value is None or not value.is_floating_point():
            return None
        dtype = self.dtype(x)
        if dtype is None or not dtype.is_floating_point or dtype != self.dtype(node):
            return None
        if not self.shape(x) or self.shape(x) != self.shape(node):
            return None
        return AffineStep(op, value, x)

    def norm_input(self, node: ir.Node) -> ir.Value:
        """The value a norm op (batch norm or affine step) transforms."""
        if self._op(node) == "BatchNormalization":
            return node.inputs[0]
        step = self.affine_step(node)
        return next(v for v in node.inputs if self.handle(v) is step.input)

    # --- values and names -------------------------------------------------------------------------

    def constant(self, node: Handle) -> torch.Tensor | None:
        if node is None or node is OUTPUT:
            return None
        key = id(node)
        if key not in self._consts:
            self._consts[key] = None  # a cycle reads as not constant
            self._consts[key] = self._evaluate(node)
        return self._consts[key]

    def _evaluate(self, node: Handle) -> torch.Tensor | None:
        if isinstance(node, ir.Value):
            if node.const_value is None or node.is_graph_input():
                return None
            t = ops.as_tensor(node.const_value)
            return t.double() if t.is_floating_point() else t
        live = any(v is not None and v not in self._from_constants for v in ops.read_inputs(node))
        if len(node.outputs) != 1 or live:  # an input (or outer graph) upstream: never read
            return None
        if self._op(node) == "CastLike" and len(node.inputs) == 2:  # reads only the type of its 2nd input
            x, like = self.constant(self.handle(node.inputs[0])), self.dtype(self.handle(node.inputs[1]))
            if x is None or like is None:
                return None
            return x.double() if like.is_floating_point and x.is_floating_point() else x.to(like)
        return ops.evaluate(
            node, [self.constant(self.handle(v)) if v is not None else None for v in node.inputs]
        )

    def is_constant(self, node: Handle) -> bool:
        return self.constant(node) is not None

    def state_name(self, node: Handle) -> str | None:
        if isinstance(node, ir.Value):
            return node.name if node.const_value is not None and not node.is_graph_input() else None
        if isinstance(node, ir.Node) and self.is_constant(node):  # a Constant, or computed from constants
            return self.name(node)
        return None

    def is_parameter(self, node: Handle) -> bool:
        dtype = self.dtype(node)
        return self.state_name(node) is not None and dtype is not None and dtype.is_floating_point

    def owner(self, node: Handle) -> tuple[str, str, str]:
        if isinstance(node, ir.Node):  # one "call": affine chains group across the whole graph
            return "", node.name or self.name(node), node.op_type
        return "", "", ""

    def canonical(self, path: str) -> str:
        return path

    def describe(self, node: Handle) -> str:
        if node is OUTPUT:
            return "the model output"
        if isinstance(node, ir.Value):
            return f"initializer {node.name}" if self.state_name(node) else f"model input {node.name}"
        return f"{node.name or self.name(node)} ({node.op_type})"

    def op_name(self, node: Handle) -> str:
        return node.op_type if isinstance(node, ir.Node) else ""

    def is_activation(self, node: Handle) -> bool:
        return self._op(node) in ops.ACTIVATIONS

    # --- channel ids ------------------------------------------------------------------------------

    def reduced_dims(self, node: Handle, rank: int) -> tuple[int, ...] | None:
        if self._op(node) not in ops.REDUCTIONS:
            return None
        axes = ops.attr(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            found = self.constant(self.handle(node.inputs[1]))
            axes = None if found is None else found.long().tolist()
        return tuple(int(a) for a in (axes or range(rank)))

    def step_ids(
        self, node: Handle, prev: Handle, ids: torch.Tensor, resolve: Callable[[Handle], Handle]
    ) -> torch.Tensor:
        def operand_ids(i: int) -> torch.Tensor:
            h = self.handle(node.inputs[i])
            return ids if resolve(h) is prev else torch.full(self.shape(h), -1.0, dtype=torch.float64)

        def constant(i: int) -> torch.Tensor | None:
            v = node.inputs[i] if i < len(node.inputs) else None
            return None if v is None else self.constant(self.handle(v))

        try:
            return ops.step_ids(node, operand_ids, ids, self.shape(node), constant)
        except (RuntimeError, ValueError, IndexError, TypeError):  # a shape unknown or not as inferred
            return torch.full(self.shape(node), 0.5, dtype=torch.float64)  # no channel: channel_mixing
