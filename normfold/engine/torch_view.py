"""The graph view over a ``torch.export`` capture (ATen ops, read by schema name).

Implements :class:`normfold.engine.view.GraphView` on a :class:`normfold.engine.capture.Capture`: the op
tables (layers, ops a per-channel map passes through, merges, norms, affine ops, activations) are
:mod:`normfold.engine.aten`; :class:`normfold.engine.capture.Constants` and the name maps are built
once per view, and one view serves every rule, the planner and the merges of one capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx

from normfold.engine import aten as op_tables
from normfold.engine.capture import Capture, Constants, bind, concrete, op_name, owner, shape, tensor_meta
from normfold.engine.view import AffineStep, BatchNormRef, LayerRef, ThroughRef

aten = torch.ops.aten
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}


class TorchView:
    """:class:`~normfold.engine.view.GraphView` of one capture."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.consts = capture.consts
        self.by_name: dict[str, fx.Node] = {n.name: n for n in capture.graph.nodes}

    @classmethod
    def of(cls, capture: Capture) -> TorchView:
        """The capture's view, built once (constants and node maps with it)."""
        if "view" not in capture.derived:
            capture.derived["view"] = cls(capture)
        return capture.derived["view"]

    # --- structure --------------------------------------------------------------------------------

    def nodes(self) -> Iterable[fx.Node]:
        return (n for n in self.capture.graph.nodes if n.op == "call_function")

    def name(self, node: fx.Node) -> str:
        return node.name

    def users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if not _shape_only(u, node)]

    def uses(self, user: fx.Node, node: fx.Node) -> int:
        return sum(a is node for a in _flat_args(user))

    def operands(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in _flat_args(node) if isinstance(a, fx.Node)]

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return shape(node)

    def dtype(self, node: fx.Node) -> torch.dtype | None:
        meta = tensor_meta(node)
        return None if meta is None else meta.dtype

    def is_input(self, node: fx.Node) -> bool:
        return node.op == "placeholder"

    def is_output(self, node: fx.Node) -> bool:
        return node.op == "output"

    # --- what a node is ---------------------------------------------------------------------------

    def layer(self, node: fx.Node) -> LayerRef | None:
        return op_tables.read_layer(node)

    def layer_reading(self, node: fx.Node) -> LayerRef | None:
        return op_tables.layer_reading(node)

    def through(self, node: fx.Node) -> ThroughRef | None:
        rule = op_tables.through_of(node)
        first = op_tables.through_input(node) if rule is not None else None
        if (
            rule is None
            or first is None
            or self.dtype(first) is None
            or self.dtype(first) != self.dtype(node)
        ):
            return None  # a cast that changes the dtype changes the rounding: not a pass-through
        return ThroughRef(rule.name, rule.kind, first, rule.check(bind(node)))

    def merge_kind(self, node: fx.Node) -> str | None:
        return op_tables.MERGES.get(node.target) if node.op == "call_function" else None

    def batch_norm(self, node: fx.Node) -> BatchNormRef | None:
        if node.op != "call_function" or node.target not in op_tables.BATCH_NORMS:
            return None
        a = bind(node)
        return BatchNormRef(
            a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], float(a["eps"]),
            bool(a["training"]),
        )  # fmt: skip

    def affine_step(self, node: fx.Node) -> AffineStep | None:
        found = affine_operand(node, self.consts)
        if found is None or op_tables.read_layer(node) is not None:
            return None
        op, c, x, _ = found
        alpha = float(bind(node).get("alpha", 1)) if op in ("add", "sub", "rsub") else 1.0
        return AffineStep(op, c, x, alpha)

    def norm_input(self, node: fx.Node) -> fx.Node:
        """The tensor a norm op (batch norm or affine step) transforms."""
        return bind(node)[input_arg(node, self.consts)]

    # --- values and names -------------------------------------------------------------------------

    def constant(self, node: Any) -> torch.Tensor | None:
        return self.consts.value(node)

    def is_constant(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self.consts.is_const.get(node, False)

    def state_name(self, node: Any) -> str | None:
        return self.capture.state_of(node)

    def is_parameter(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self.capture.kind.get(node.name) == "parameter"

    def owner(self, node: fx.Node) -> tuple[str, str, str]:
        return owner(node)

    def canonical(self, path: str) -> str:
        return self.capture.canonical(path)

    def describe(self, node: Any) -> str:
        fqn = self.capture.state_of(node)
        if fqn is not None:
            return f"{self.capture.kind.get(node.name, 'constant')} {fqn}"
        return describe(node)

    def op_name(self, node: fx.Node) -> str:
        return op_name(node)

    def is_activation(self, node: fx.Node) -> bool:
        return op_name(node) in op_tables.ACTIVATIONS

    # --- channel ids ------------------------------------------------------------------------------

    def reduced_dims(self, node: fx.Node, rank: int) -> tuple[int, ...] | None:
        if node.target not in op_tables.REDUCTIONS:
            return None
        dims = bind(node)["dim"]
        return tuple(int(d) for d in ([dims] if isinstance(dims, int) else (dims or range(rank))))

    def step_ids(
        self, node: fx.Node, prev: fx.Node, ids: torch.Tensor, resolve: Callable[[fx.Node], fx.Node]
    ) -> torch.Tensor:
        if node.target is aten.add.Tensor:  # a merge: our ids pass on, the other operand is not ours
            return ids.expand(shape(node)).clone()
        if node.target in _CASTS:
            return ids.clone()

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node) and resolve(a) is prev:
                return ids
            if isinstance(a, fx.Node) and tensor_meta(a) is not None:  # another concat input
                return torch.full(shape(a), -1.0, dtype=torch.float64)
            if isinstance(a, (list, tuple)):
                return type(a)(arg(v) for v in a)
            return concrete(a)

        kwargs = {k: arg(v) for k, v in node.kwargs.items() if k not in ("dtype", "layout", "device")}
        with torch.no_grad():
            return node.target(*arg(node.args), **kwargs)


# --- node helpers (ATen) ------------------------------------------------------------------------


def _shape_only(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the shape of ``node`` (``reshape_as(y, node)``): not a use of its values."""
    roles = op_tables.SHAPE_ONLY.get(user.target) if user.op == "call_function" else None
    if roles is None:
        return False
    args = bind(user)
    return all(args[name] is not node for name in args if name not in roles)


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    for a in (*node.args, *node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def affine_operand(node: fx.Node, consts: Constants) -> tuple[str, torch.Tensor, fx.Node, str] | None:
    """``(op, constant, x, x's argument name)`` when ``node`` is ``x (op) constant``."""
    op = op_tables.AFFINE_OPS.get(node.target) if node.op == "call_function" else None
    if op is None or consts.is_const.get(node, False):
        return None
    args = bind(node)
    a, b = args["self"], args["other"]
    a_var = isinstance(a, fx.Node) and not consts.is_const.get(a, False)
    b_var = isinstance(b, fx.Node) and not consts.is_const.get(b, False)
    if a_var and not b_var:
        x, other, role = a, b, "self"
    elif b_var and not a_var and op in ("mul", "add", "sub"):
        if op == "add" and float(args.get("alpha", 1)) != 1:
            return None
        x, other, role, op = b, a, "other", "rsub" if op == "sub" else op
    else:
        return None
    if isinstance(other, fx.Node):
        c = consts.value(other)
        if c is None or not c.is_floating_point():
            return None
    elif isinstance(other, (int, float)) and not isinstance(other, bool):
        c = torch.tensor(float(other), dtype=torch.float64)
    else:
        return None
    x_meta, out_meta = tensor_meta(x), tensor_meta(node)
    if x_meta is None or out_meta is None or out_meta.dtype != x_meta.dtype or shape(node) != shape(x):
        return None
    if not x_meta.is_floating_point():
        return None
    return op, c, x, role


def input_arg(node: fx.Node, consts: Constants) -> str:
    """Name of the argument a norm op transforms (``input`` for batch_norm)."""
    if node.target in op_tables.BATCH_NORMS:
        return "input"
    found = affine_operand(node, consts)
    if found is None:
        raise ValueError(f"{node.name} is not a norm op")
    return found[3]


def describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return f"model input {node.name}"
    if node.op == "output":
        return "the model output"
    _, module, _ = owner(node)
    return f"{module} ({op_name(node)})" if module else f"{op_name(node)} (forward)"
