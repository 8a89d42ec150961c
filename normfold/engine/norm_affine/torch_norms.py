"""Norms found by pattern on a ``torch.export`` graph: :class:`TorchNormView`.

No module type or name is read; a norm is what its ops compute:

* the built-in ops ``aten.layer_norm`` (one normalized axis), ``aten.rms_norm`` and
  ``aten.group_norm`` (any group count: the affine map is per channel, axis 1), whose ``weight`` /
  ``bias`` arguments are the scale and shift;
* hand-written arithmetic ending in ``a * rsqrt(V + eps)`` or ``a / sqrt(V + eps)`` with
  ``V = mean(a ** 2, -1, keepdim)`` (or ``mean(a * a)``): an RMSNorm; with ``a = x - mean(x, -1)``
  (and ``V`` that mean of squares or the biased ``var(x, -1)``) a LayerNorm. Dtype casts may sit
  anywhere between (Hugging Face computes its norms in float32 and casts back). The affine tail
  follows, one op each while each value has one user: casts, ``* gamma`` (a constant varying along
  the last axis only) and ``+ beta``.

``gamma`` and ``beta`` must be parameter expressions a plan can write back (:class:`AffineParam`):
a parameter, read through casts and ``+ c`` (Gemma's ``1 + w``); anything else is recorded with
the code ``affine_not_parameter`` (computed from parameters another way) or ``not_constant``
(computed from the input).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from normfold.engine.capture import Capture, bind, tensor_meta
from normfold.engine.norm_affine.grouped_mm import is_grouped_mm
from normfold.engine.norm_affine.view import AffineNorm, AffineParam
from normfold.engine.torch_view import TorchView
from normfold.engine.view import LayerRef

aten = torch.ops.aten
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}
_POW = {aten.pow.Tensor_Scalar}
_MUL = {aten.mul.Tensor}
_ADD = {aten.add.Tensor, aten.add.Scalar}


class TorchNormView(TorchView):
    """:class:`~normfold.engine.norm_affine.view.NormView` of one capture."""

    @classmethod
    def of(cls, capture: Capture) -> TorchNormView:
        if not isinstance(capture.derived.get("norm_view"), cls):
            capture.derived["norm_view"] = cls(capture)
        return capture.derived["norm_view"]

    def cast_input(self, node: fx.Node) -> fx.Node | None:
        if node.op != "call_function" or node.target not in CASTS:
            return None
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None

    def row_gather(self, node: fx.Node) -> fx.Node | None:
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            return None
        x, indices = node.args[0], node.args[1]
        if not isinstance(x, fx.Node) or len(indices) >= len(self.shape(x)):
            return None  # the last axis is indexed too
        if self.shape(node)[-1] != self.shape(x)[-1]:
            return None
        return x

    def matmul_layer(self, node: fx.Node) -> LayerRef | None:
        if node.op != "call_function":
            return None
        grouped = is_grouped_mm(node.target)
        if not (grouped or node.target in (aten.bmm.default, aten.matmul.default)):
            return None
        x, w = node.args[0], node.args[1]
        via = None
        if isinstance(w, fx.Node) and w.target is aten.transpose.int:  # (E, out, in) read as (E, in, out)
            if sorted(int(a) % 3 for a in w.args[1:]) == [1, 2]:
                via, w = w, w.args[0]
        elif isinstance(w, fx.Node) and w.target in (aten.numpy_T.default, aten.t.default):  # x @ W.T
            via, w = w, w.args[0]
        meta = tensor_meta(w) if isinstance(w, fx.Node) else None
        if meta is None or not self.is_parameter(w) or not isinstance(x, fx.Node):
            return None
        if grouped and (meta.dim() != 3 or len(self.shape(x)) != 2):
            return None
        if meta.dim() == 3:
            return LayerRef(node, "batched_linear", x, w, None, 1, 0, False, via is None, via)
        if meta.dim() != 2 or via is None or via.target is not aten.numpy_T.default:
            return None  # a plain x @ W (or W.t()) is the rules' view's (layer_reading)
        add = next(iter(node.users)) if len(node.users) == 1 else None
        bias = _bias_of(add, node) if add is not None else None
        if bias is not None and self.is_parameter(bias):
            return LayerRef(add, "linear", x, w, bias, 1, 0, False, False, via, node)
        return LayerRef(node, "linear", x, w, None, 1, 0, False, False, via)

    def affine_norms(self) -> list[AffineNorm]:
        found: list[AffineNorm] = []
        taken: set[fx.Node] = set()
        for node in self.nodes():
            if node in taken:
                continue
            norm = self._builtin(node) or self._hand_written(node)
            if norm is not None:
                found.append(norm)
                taken.update(norm.nodes)
        return found

    def _position(self, node: fx.Node) -> int:
        if "order" not in self.capture.derived:
            self.capture.derived["order"] = {n: i for i, n in enumerate(self.capture.graph.nodes)}
        return self.capture.derived["order"][node]

    # --- the patterns -----------------------------------------------------------------------------

    def _builtin(self, node: fx.Node) -> AffineNorm | None:
        if node.target not in (aten.layer_norm.default, aten.rms_norm.default, aten.group_norm.default):
            return None
        args = bind(node)
        kind = str(node.target._overloadpacket.__name__)  # type: ignore[union-attr]
        rank = len(self.shape(node))
        axis = 1 if kind == "group_norm" else rank - 1
        refused = None
        if kind != "group_norm" and len(args["normalized_shape"]) != 1:
            count = len(args["normalized_shape"])
            refused = ("not_per_channel", f"{self.describe(node)} normalizes over {count} axes: its "
                       "scale varies along all of them, not along one input axis of a Linear")  # fmt: skip
        return self._with_tail(kind, kind, args["input"], node, [node], axis, args["weight"],
                               args.get("bias"), refused)  # fmt: skip

    def _hand_written(self, node: fx.Node) -> AffineNorm | None:
        core = self._normalized(node)
        if core is None:
            return None
        x, a, stats = core
        kind = "rms_norm" if x is a else "layer_norm"
        ops = sorted({*stats, node}, key=self._position)
        last = len(self.shape(node)) - 1
        return self._with_tail(kind, "hand-written", x, node, ops, last, None, None, None)

    def _normalized(self, node: fx.Node) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
        """``(x, a, ops)`` when ``node`` is ``a * rsqrt(V + eps)`` or ``a / sqrt(V + eps)`` over the
        last axis (``a`` is ``x`` for an RMSNorm, ``x - mean(x)`` for a LayerNorm)."""
        if node.target in _MUL and len(node.args) == 2:
            rsqrt = aten.rsqrt.default
            pairs = [(node.args[0], node.args[1], rsqrt), (node.args[1], node.args[0], rsqrt)]
        elif node.target is aten.div.Tensor:
            pairs = [(node.args[0], node.args[1], aten.sqrt.default)]
        else:
            return None
        for a, r, root in pairs:
            if not (isinstance(a, fx.Node) and isinstance(r, fx.Node) and r.target is root):
                continue
            denom = r.args[0]
            if not (isinstance(denom, fx.Node) and denom.target in _ADD and _scalar(denom.args[1])):
                continue
            var = denom.args[0]
            found = self._statistic(var, a)
            if found is not None:
                x, ops = found
                return x, a, {*ops, r, denom, var}
        return None

    def _statistic(self, var: Any, a: fx.Node) -> tuple[fx.Node, set[fx.Node]] | None:
        """``(x, ops)`` when ``var`` is the mean square of ``a`` over the last axis (``x`` is ``a``
        itself), or the variance of ``x`` with ``a = x - mean(x)``."""
        if not isinstance(var, fx.Node):
            return None
        last = len(self.shape(a)) - 1
        if var.target is aten.mean.dim and self._last_axis_keepdim(var, last):
            sq = var.args[0]
            if isinstance(sq, fx.Node) and self._square_of(sq) is not None:
                base = self._square_of(sq)
                if _same(base, a, self):
                    centred = self._centred(a, last)
                    if centred is not None:
                        return centred[0], {var, sq, *centred[1]}
                    return a, {var, sq}
        if var.target in (aten.var.correction, aten.var.dim) and self._last_axis_keepdim(var, last):
            args = bind(var)
            if args.get("correction") in (0, 0.0) or args.get("unbiased") is False:
                centred = self._centred(a, last)
                if centred is not None and _same(var.args[0], centred[0], self):
                    return centred[0], {var, *centred[1]}
        return None

    def _centred(self, a: fx.Node, last: int) -> tuple[fx.Node, set[fx.Node]] | None:
        """``(x, ops)`` when ``a`` is ``x - mean(x, -1, keepdim)``."""
        if a.target is not aten.sub.Tensor or len(a.args) != 2:
            return None
        x, mu = a.args
        if isinstance(mu, fx.Node) and mu.target is aten.mean.dim and self._last_axis_keepdim(mu, last):
            if _same(mu.args[0], x, self):
                return x, {a, mu}
        return None

    def _square_of(self, node: fx.Node) -> fx.Node | None:
        if node.target in _POW and node.args[1] == 2:
            return node.args[0]
        if node.target in _MUL and len(node.args) == 2 and node.args[0] is node.args[1]:
            return node.args[0]
        return None

    def _last_axis_keepdim(self, node: fx.Node, last: int) -> bool:
        args = bind(node)
        dims = args.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or ())
        return len(dims) == 1 and int(dims[0]) % (last + 1) == last and bool(args.get("keepdim"))

    # --- the affine tail ----------------------------------------------------------------------------

    def _with_tail(
        self, kind: str, pattern: str, x: fx.Node, end: fx.Node, ops: list[fx.Node], axis: int,
        weight: Any, bias: Any, refused: tuple[str, str] | None,
    ) -> AffineNorm:  # fmt: skip
        """The norm ending at ``end`` with its affine tail (module docstring)."""
        channels = self.shape(end)[axis]
        gamma = self._param(weight, "scale", end) if weight is not None else None
        beta = self._param(bias, "shift", end) if bias is not None else None
        refused = refused or _refusal(gamma) or _refusal(beta)
        gamma, beta = _plain(gamma), _plain(beta)
        cur, nodes = end, list(ops)
        while len(self.users(cur)) == 1:
            user = self.users(cur)[0]
            if self.cast_input(user) is cur:
                nodes.append(user)
                cur = user
                continue
            other = _other_operand(user, cur)
            if other is None or not self.is_constant(other) or not self._per_channel(other, user, cur, axis):
                break
            if user.target in _MUL and gamma is None and beta is None:
                found = self._param(other, "scale", user)
                gamma = _plain(found)
            elif user.target in _ADD and beta is None and bind(user).get("alpha", 1) == 1:
                found = self._param(other, "shift", user)
                beta = _plain(found)
            else:
                break
            refused = refused or _refusal(found)
            nodes.append(user)
            cur = user
        return AffineNorm(kind, pattern, x, cur, tuple(nodes), axis - len(self.shape(cur)), channels,
                          gamma, beta, refused)  # fmt: skip

    def _per_channel(self, other: fx.Node, user: fx.Node, cur: fx.Node, axis: int) -> bool:
        """``user`` keeps ``cur``'s shape and ``other`` varies along ``axis`` only."""
        meta, out, mine = tensor_meta(other), tensor_meta(user), tensor_meta(cur)
        if meta is None or out is None or mine is None or tuple(out.shape) != tuple(mine.shape):
            return False
        if meta.dim() > out.dim():
            return False
        shape = [1] * (out.dim() - meta.dim()) + list(meta.shape)
        return all(n == 1 for i, n in enumerate(shape) if i != axis % out.dim())

    def _param(self, node: Any, role: str, at: fx.Node) -> AffineParam | tuple[str, str]:
        """``node`` as ``offset + p`` (a parameter read through casts and ``+ c``), else the refusal."""
        offset, ops, cur = 0.0, [], node
        while isinstance(cur, fx.Node):
            if self.is_parameter(cur) and (offset == 0 or role == "scale"):  # a shift is written as 0
                return AffineParam(self.state_name(cur), offset, cur, tuple(reversed(ops)))
            nxt = self.cast_input(cur)
            if nxt is None and cur.target in _ADD and len(cur.args) == 2 and bind(cur).get("alpha", 1) == 1:
                a, b = cur.args
                if _scalar(b) and isinstance(a, fx.Node):
                    offset, nxt = offset + float(b), a
                elif _scalar(a) and isinstance(b, fx.Node):
                    offset, nxt = offset + float(a), b
            if nxt is None:
                break
            ops.append(cur)
            cur = nxt
        where = self.describe(at)
        if not self.is_constant(node):
            return ("not_constant", f"the {role} of the norm at {where} is computed from the input")
        return ("affine_not_parameter", f"the {role} of the norm at {where} is computed from parameters "
                "in a way normfold cannot write back (only a parameter, read through casts and `+ c`)")


def _bias_of(add: fx.Node, mm: fx.Node) -> fx.Node | None:
    """The 1-d operand of ``mm + b``."""
    if add.target is not aten.add.Tensor or len(add.args) != 2 or bind(add).get("alpha", 1) != 1:
        return None
    other = add.args[1] if add.args[0] is mm else add.args[0]
    meta = tensor_meta(other) if isinstance(other, fx.Node) else None
    return other if meta is not None and meta.dim() == 1 else None


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a: Any, b: Any, view: TorchNormView) -> bool:
    """``a`` and ``b`` are one tensor, up to dtype casts of one source, or one op on the same
    operands computed twice (Cohere writes ``(h - mean)`` once for the variance, once to scale)."""

    def root(n: Any) -> Any:
        while isinstance(n, fx.Node) and view.cast_input(n) is not None:
            n = view.cast_input(n)
        return n

    a, b = root(a), root(b)
    if a is b:
        return True
    twice = isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
    return twice and a.target == b.target and a.args == b.args and a.kwargs == b.kwargs


def _other_operand(user: fx.Node, cur: fx.Node) -> Any:
    if user.target not in (*_MUL, *_ADD) or len(user.args) != 2:
        return None
    a, b = user.args
    if a is cur and b is not cur:
        return b
    if b is cur and a is not cur:
        return a
    return None


def _refusal(found: Any) -> tuple[str, str] | None:
    return found if isinstance(found, tuple) else None


def _plain(found: Any) -> AffineParam | None:
    return found if isinstance(found, AffineParam) else None
