"""Plan: which norm ops of a captured graph fold into which layers, as pure data.

A *norm unit* is one ``aten.batch_norm`` op in eval mode, or a maximal chain of elementwise ops of
one module call with constant operands (``x*c``, ``x/c``, ``x+c``, ``x-c``, ``c-x``; constants
computed from parameters, buffers and literals, including ``sqrt``/``rsqrt`` of them: the
tutorials' ``gain * (h - mean) / std + bias``). Either is a per-channel affine map ``y = s * x + t``:

    BatchNorm:  s = gamma / sqrt(var + eps),  t = beta - mean * s       (channel axis 1;
                one channel: a scalar map, the same on every element)
    chain:      composed op by op; every constant may vary along one axis only (the channel axis)

Each unit is tried, in graph order, as a **backward fold**: walk from the unit's input back to
Conv/ConvTranspose/Linear outputs through ops that commute with the map (:mod:`normfold.rules`),
through already-folded units, and through at most one merge:

* concat: every producer gets ``s``/``t`` on the channels it contributes (the norm is split);
* add (``a + alpha*b``): every producer gets ``s``; only the first operand gets ``t``;

every node on the way must feed only the next one, and every producer's weight (and bias) must be a
parameter read by that op alone. Where the channels end up is proven by running the path's ops
on a tensor of channel ids (:func:`_propagate`): each norm channel must come from one producer
channel. The producer then gets ``W' = s*W``, ``b' = s*b + t`` along its output channels.

A unit that cannot fold backward is tried as a **forward fold** (norm before the layer), in
reverse graph order: every use of its output, through commuting ops, must be the data input of a
Conv or Linear that adds no zero padding (a zero border would see ``0`` instead of ``t``; non-zero
padding modes copy values and are exact). Each consumer gets ``W'[:, i] = W[:, i] * s[i]`` and
``b' = b + sum W * t``.

The result is a :class:`Plan`: one :class:`Fold` per folded unit (layers and per-channel
``scale``/``shift``, float64) and one :class:`Keep` per unit left in place, with a stable code and
a reason. :meth:`Plan.values` replays the folds into new parameter values keyed by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from normfold import rules, signs
from normfold.affine import bn_affine, scale_input, scale_output
from normfold.graph import Capture, Constants, bind, concrete, op_name, owner, shape, tensor_meta
from normfold.rules import Layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One norm: a batch_norm op or a chain of constant affine ops (node names in graph order)."""

    nodes: tuple[str, ...]
    kind: str  # "batch_norm" or "affine"
    module: str  # owning module path ("" for the model's own forward)
    module_type: str
    call: str  # nn_module_stack key: tells repeated calls of one module apart
    stats: dict[str, str | None] = field(default_factory=dict, compare=False)  # role -> FQN (BN)

    @property
    def name(self) -> str:
        """What users call this norm: its module path, or ``<module>:<op>`` for code in a forward."""
        stats = self.stats.get("running_mean")
        if self.kind == "batch_norm" and stats and "." in stats:
            return stats.rpartition(".")[0]  # the module holding the statistics, even for F.batch_norm
        if self.kind == "batch_norm" and self.module:
            return self.module
        return f"{self.module or 'forward'}:{self.nodes[0]}"


@dataclass(frozen=True)
class LayerUpdate:
    """A per-channel affine map folded into one layer, on its output or input side."""

    layer: str  # node name of the layer op
    module: str  # owning module path of the layer op
    module_type: str
    kind: str  # conv, conv_transpose, linear
    weight: str  # FQN
    bias: str | None  # FQN, None when the layer has no bias yet
    groups: int
    in_out: bool  # a matmul weight (in, out) rather than (out, in)
    side: str  # "output" (backward fold) or "input" (forward fold)
    scale: torch.Tensor  # float64, one per output (input) channel
    shift: torch.Tensor


@dataclass(frozen=True)
class Fold:
    unit: Unit
    pattern: str  # e.g. conv-bn, linear-bn, bn-conv, concat-bn, add-bn, conv-affine
    updates: tuple[LayerUpdate, ...]
    through: tuple[str, ...]  # names of ops between the layer(s) and the norm
    after: tuple[str, ...]  # folded ops (node names) this fold passes through

    @property
    def identity(self) -> bool:
        """An op that changes nothing (``x + 0``, ``x * 1``): removed, but no norm to report."""
        return self.unit.kind == "affine" and all(
            bool((u.scale == 1).all() and (u.shift == 0).all()) for u in self.updates
        )


@dataclass(frozen=True)
class Keep:
    unit: Unit
    code: str
    reason: str
    #: the unit's per-channel map ``(s, t, channel axis)`` when it is one (float64), else None
    map: tuple[torch.Tensor, torch.Tensor, int | None] | None = field(default=None, compare=False)


@dataclass
class Plan:
    folds: list[Fold] = field(default_factory=list)
    kept: list[Keep] = field(default_factory=list)
    #: per-channel maps that stay and are no norm (a layer scale ``x * gamma``): not reported
    silent: list[Keep] = field(default_factory=list)

    @property
    def removed(self) -> set[str]:
        return {n for f in self.folds for n in f.unit.nodes}

    def values(self, capture: Capture, folds: list[Fold] | None = None) -> dict[str, torch.Tensor]:
        """New parameter values (FQN -> tensor in the parameter's dtype) after ``folds``.

        Folds touching one layer compose in plan order, in float64, and are cast back once. A
        bias created by a fold is named by :func:`new_bias_name` and takes the weight's dtype.
        """
        return dict(self.iter_values(capture, folds))

    def overflow(self, capture: Capture, folds: list[Fold]) -> tuple[str, torch.dtype] | None:
        """The first new value after ``folds`` that is not finite in its dtype (its FQN and that
        dtype), else None; a block of rows at a time where the folds allow (:meth:`iter_values`)."""
        for fqn, updates in _by_layer(folds).items():
            weight = capture.value(fqn)
            if not weight.is_floating_point():
                continue
            if not _output_only(updates):
                mine = [f for f in folds if any(u.weight == fqn for u in f.updates)]
                bad = next(
                    (n for n, v in self.iter_values(capture, mine) if not bool(v.isfinite().all())), None
                )
                if bad is not None:
                    return bad, weight.dtype
                continue
            bias = capture.value(updates[0].bias).detach().to(torch.float64) if updates[0].bias else None
            rows, shift = RowBlocks.of(weight, bias, updates)
            if any(not bool(torch.isfinite(block).all()) for _, block in rows.blocks()):
                return fqn, weight.dtype
            if not bool(torch.isfinite(shift.to(weight.dtype)).all()):
                return updates[0].bias or new_bias_name(capture, fqn), weight.dtype
        return None

    def iter_values(
        self, capture: Capture, folds: list[Fold] | None = None, *, lazy: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
        """:meth:`values` one layer at a time (weight, then bias): only that layer's float64
        copy is alive, and a caller that writes each value away holds no full copy either.
        ``lazy``: a weight folded on its output side only comes as :class:`RowBlocks`."""
        for fqn, updates in _by_layer(self.folds if folds is None else folds).items():
            # one layer's float64 copy alive at a time
            weight = capture.value(fqn)
            bias_name = updates[0].bias or new_bias_name(capture, fqn)
            b = capture.value(updates[0].bias).detach().to(torch.float64) if updates[0].bias else None
            if _output_only(updates):
                yield from _scaled_rows(fqn, weight, bias_name, b, updates, lazy)
                continue
            w = weight.detach().to(torch.float64)
            for u in updates:
                s, t = u.scale.to(w.device), u.shift.to(w.device)
                w = w.t() if u.in_out else w  # (out, in) for the fold math
                if u.side == "output":
                    w, b = scale_output(w, b, s, t, transpose=u.kind == "conv_transpose", groups=u.groups)
                else:
                    w, b = scale_input(w, b, s, t, groups=u.groups)
                w = w.t() if u.in_out else w
            w, b = w.to(weight.dtype), b.to(weight.dtype)
            yield fqn, w
            yield bias_name, b
            del w, b


def _by_layer(folds: list[Fold]) -> dict[str, list[LayerUpdate]]:
    """Weight FQN -> its updates, in plan order (the order the maps compose in)."""
    by_layer: dict[str, list[LayerUpdate]] = {}
    for fold in folds:
        for u in fold.updates:
            by_layer.setdefault(u.weight, []).append(u)
    return by_layer


def _output_only(updates: list[LayerUpdate]) -> bool:
    return all(u.side == "output" and u.kind != "conv_transpose" for u in updates)


#: float64 elements of a weight converted at once by :meth:`RowBlocks.blocks` (64 MB)
_CHUNK = 2**23


@dataclass
class RowBlocks:
    """A folded weight not computed yet, ``W' = S W`` along the output channels: written a block
    of rows at a time into a tensor of its shape (:meth:`write_into`, no whole copy ever), or made
    whole (:meth:`tensor`)."""

    weight: torch.Tensor  # the weight before the fold
    scale: torch.Tensor  # S: the output-side folds composed per channel (float64)
    in_out: bool  # an (in, out) matrix: the output channels are its columns

    @classmethod
    def of(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, updates: list[LayerUpdate]
    ) -> tuple[RowBlocks, torch.Tensor]:
        """The folded weight and the folded bias (float64, ``b' = S b + T``) of output-side folds."""
        scale = torch.ones(updates[0].scale.numel(), dtype=torch.float64)
        shift = torch.zeros_like(scale) if bias is None else bias.cpu()
        for u in updates:
            scale, shift = u.scale * scale, u.scale * shift + u.shift
        return cls(weight, scale, updates[0].in_out), shift

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows of W')`` in the weight's dtype, about :data:`_CHUNK` elements each."""
        w = self.weight
        view = [1] * w.dim()
        view[1 if self.in_out else 0] = -1
        scale = self.scale.to(w.device).reshape(view)
        rows = max(1, _CHUNK // max(1, w[0].numel()))
        for start in range(0, w.shape[0], rows):
            s = scale if self.in_out else scale[start : start + rows]
            yield start, (w[start : start + rows].detach().to(torch.float64) * s).to(w.dtype)

    def write_into(self, out: torch.Tensor) -> None:
        with torch.no_grad():
            for start, block in self.blocks():
                out[start : start + block.shape[0]] = block

    def tensor(self) -> torch.Tensor:
        out = torch.empty_like(self.weight, memory_format=torch.contiguous_format)
        self.write_into(out)
        return out


def _scaled_rows(
    fqn: str,
    weight: torch.Tensor,
    bias_name: str,
    bias: torch.Tensor | None,
    updates: list[LayerUpdate],
    lazy: bool,
) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
    """Output-side folds only (the usual case): the folds composed per output channel first, the
    weight scaled a block of rows at a time, so no float64 copy of a large weight is ever whole
    (``lazy``: nor a copy in its own dtype)."""
    rows, shift = RowBlocks.of(weight, bias, updates)
    yield fqn, rows if lazy else rows.tensor()
    yield bias_name, shift.to(device=weight.device, dtype=weight.dtype)


def new_bias_name(capture: Capture, weight_fqn: str) -> str:
    """FQN for a bias created by a fold: ``<prefix>.bias``, unless that name is taken."""
    prefix, _, _ = weight_fqn.rpartition(".")
    name = f"{prefix}.bias" if prefix else "bias"
    return name if name not in capture.names else f"{weight_fqn}_folded_bias"


_GENERIC_FORWARD = {"feeds_op", "before_activation", "model_output", "unused", "multiple_users"}


class _Fail(Exception):
    """A precondition that does not hold: carries the stable code and the reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Map:
    """A unit's affine map: ``s``/``t`` broadcastable against the unit's input; ``axis`` is the
    channel axis of that input (None: scalar map, the same on every element)."""

    s: torch.Tensor
    t: torch.Tensor
    axis: int | None


@dataclass
class _Branch:
    layer: Layer
    path: list[fx.Node]  # nodes after the layer up to the unit's input, in graph order


def plan(capture: Capture, keep: Mapping[str, tuple[str, str]] | None = None) -> Plan:
    """Plan every fold of the captured graph (pure: reads the graph, changes nothing). ``keep``:
    norms (by :attr:`Unit.name`) decided elsewhere to stay, with their ``(code, reason)`` (the
    measured gate of :mod:`normfold.gate`)."""
    return _Planner(capture, keep or {}).run()


class _Planner:
    def __init__(self, capture: Capture, keep: Mapping[str, tuple[str, str]]) -> None:
        self.capture = capture
        self.keep = keep
        self.consts = Constants(capture)
        self.removed: dict[fx.Node, fx.Node] = {}  # folded op -> its input on the chain
        self._passed: list[fx.Node] = []  # folded ops the current walk went through
        #: weight FQN -> (plan index, fold) of the folds into it
        self._folds_into: dict[str, list[tuple[int, Fold]]] = {}
        self.result = Plan()

    # --- driver ---------------------------------------------------------------------------------

    def run(self) -> Plan:
        units = self._units()
        backlog: list[tuple[Unit, list[fx.Node], _Map, _Fail]] = []
        for unit, nodes in units:
            if unit.name in self.keep:
                self._keep(unit, _Fail(*self.keep[unit.name]))
                continue
            try:
                m = self._map(unit, nodes)
            except _Fail as fail:
                if unit.kind == "batch_norm":  # arithmetic that is no per-channel map is no norm
                    self._keep(unit, fail)
                continue
            try:
                self._commit(unit, nodes, self._backward(unit, nodes, m))
            except _Fail as fail:
                backlog.append((unit, nodes, m, fail))
        for unit, nodes, m, back in reversed(backlog):
            try:
                self._commit(unit, nodes, self._forward(unit, nodes, m))
            except _Fail as fwd:
                if unit.kind == "affine" and not _norm_like(m):
                    # a scalar op or a layer scale that stays is not a norm: not reported
                    self.result.silent.append(Keep(unit, fwd.code, fwd.reason, (m.s, m.t, m.axis)))
                    continue
                # the forward attempt's code only when it names what blocks a fold that could exist
                self._keep(unit, back if fwd.code in _GENERIC_FORWARD else fwd, back, m)
        order = {n.name: i for i, n in enumerate(self.capture.graph.nodes)}
        self.result.kept.sort(key=lambda k: order[k.unit.nodes[0]])
        return self.result

    def _keep(self, unit: Unit, fail: _Fail, backward: _Fail | None = None, m: _Map | None = None) -> None:
        reason = fail.reason
        if backward is not None and backward.reason != fail.reason:
            reason = f"{backward.reason}; as a forward fold: {fail.reason}"
        logger.debug("keep %s: %s", unit.name, reason)
        self.result.kept.append(Keep(unit, fail.code, reason, None if m is None else (m.s, m.t, m.axis)))

    def _commit(self, unit: Unit, nodes: list[fx.Node], fold: Fold) -> None:
        self._check_range(fold)
        for node in nodes:
            self.removed[node] = _chain_input(node, self.consts)
        self.result.folds.append(fold)
        for u in fold.updates:
            self._folds_into.setdefault(u.weight, []).append((len(self.result.folds) - 1, fold))
        logger.debug("fold %s -> %s (%s)", unit.name, [u.layer for u in fold.updates], fold.pattern)

    def _check_range(self, fold: Fold) -> None:
        """A fold whose new values overflow the parameter dtype (fp16: |x| > 65504) is no fold."""
        related = {i: f for u in fold.updates for i, f in self._folds_into.get(u.weight, [])}
        related = [related[i] for i in sorted(related)]  # plan order: the maps compose in it
        found = self.result.overflow(self.capture, [*related, fold])
        if found is not None:
            name, dtype = found
            raise _Fail(
                "overflow",
                f"the folded {name} does not fit in {str(dtype).removeprefix('torch.')} "
                f"(largest finite {torch.finfo(dtype).max:.4g}): the fold would make it inf",
            )

    # --- units ----------------------------------------------------------------------------------

    def _units(self) -> list[tuple[Unit, list[fx.Node]]]:
        units: list[tuple[Unit, list[fx.Node]]] = []
        chain: list[fx.Node] = []

        def close() -> None:
            if chain:
                units.append((self._unit("affine", chain), list(chain)))
                chain.clear()

        for node in self.capture.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in rules.BATCH_NORMS:
                close()
                units.append((self._unit("batch_norm", [node]), [node]))
            elif _affine_operand(node, self.consts) is not None and rules.read_layer(node) is None:
                x = _chain_input(node, self.consts)
                # a chain stays within one module call: the eager module can remove a module's ops
                # (the module becomes nn.Identity) but never part of its caller's forward
                same_call = bool(chain) and owner(node)[0] == owner(chain[-1])[0]
                if not (same_call and x is chain[-1] and len(x.users) == 1):
                    close()
                chain.append(node)
        close()
        return units

    def _unit(self, kind: str, nodes: list[fx.Node]) -> Unit:
        call, module, cls = owner(nodes[0])
        stats: dict[str, str | None] = {}
        if kind == "batch_norm":
            args = bind(nodes[0])
            for role in ("weight", "bias", "running_mean", "running_var"):
                fqn = self.capture.state_of(args[role])
                prefix, _, attr = (fqn or "").rpartition(".")
                stats[role] = f"{self.capture.canonical(prefix)}.{attr}" if prefix else fqn
        return Unit(tuple(n.name for n in nodes), kind, self.capture.canonical(module), cls, call, stats)

    def _map(self, unit: Unit, nodes: list[fx.Node]) -> _Map:
        if unit.kind == "batch_norm":
            return self._bn_map(unit, nodes[0])
        return self._chain_map(unit, nodes)

    def _bn_map(self, unit: Unit, node: fx.Node) -> _Map:
        args = bind(node)
        name = unit.name
        if args["training"]:
            stats = "without running statistics" if args["running_mean"] is None else "in training mode"
            raise _Fail("batch_statistics", f"{name} runs {stats}: it normalizes with batch statistics")
        values = {r: self.consts.value(args[r]) for r in ("weight", "bias", "running_mean", "running_var")}
        for role in ("running_mean", "running_var"):
            if values[role] is None:
                raise _Fail("not_constant", f"{name} {role} is computed from the input, not a buffer")
        for role, v in values.items():
            if v is None and args[role] is not None:
                raise _Fail("not_constant", f"{name} {role} is computed from the input, not a parameter")
            if v is not None and not bool(torch.isfinite(v).all()):
                label = unit.stats.get(role) or f"{name} {role}"
                raise _Fail(
                    "bad_statistics", f"{label} has {int((~torch.isfinite(v)).sum())} non-finite value(s)"
                )
        var, eps = values["running_var"], float(args["eps"])
        if bool((var + eps <= 0).any()):
            label = unit.stats.get("running_var") or f"{name} running_var"
            raise _Fail("bad_statistics", f"{label} + eps is not positive (min {var.min().item():.6g})")
        x_shape = shape(_chain_input(node, self.consts))
        if len(x_shape) < 2:
            raise _Fail("unbatched", f"{name} input {x_shape} has no channel axis")
        s, t = bn_affine(values["running_mean"], var, values["weight"], values["bias"], eps)
        if x_shape[1] == 1 and s.numel() == 1:  # one channel: the same map on every element, any axis
            return _Map(s.reshape(()), t.reshape(()), None)
        view = (-1, *([1] * (len(x_shape) - 2)))
        return _Map(s.reshape(view), t.reshape(view), 1)

    def _chain_map(self, unit: Unit, nodes: list[fx.Node]) -> _Map:
        x = _chain_input(nodes[0], self.consts)
        ndim = len(shape(x))
        s = torch.ones((), dtype=torch.float64)
        t = torch.zeros((), dtype=torch.float64)
        for node in nodes:
            op, c, _, _ = _affine_operand(node, self.consts)
            if op == "mul":
                s, t = s * c, t * c
            elif op == "div":
                s, t = s / c, t / c
            elif op == "add":
                t = t + c * float(bind(node).get("alpha", 1))
            elif op == "sub":
                t = t - c * float(bind(node).get("alpha", 1))
            else:  # rsub: c - alpha*x
                alpha = float(bind(node).get("alpha", 1))
                s, t = -alpha * s, c - alpha * t
        s, t = torch.broadcast_tensors(s, t)
        if s.dim() > ndim:
            raise _Fail("not_per_channel", f"{unit.name} constants broadcast beyond the input's rank")
        varying = [i for i, n in enumerate(s.shape) if n != 1]
        if len(varying) > 1:
            dims = [i + ndim - s.dim() for i in varying]
            raise _Fail(
                "not_per_channel", f"{unit.name} constants vary along axes {dims}, not one channel axis"
            )
        if not bool(torch.isfinite(s).all() & torch.isfinite(t).all()):
            raise _Fail("bad_statistics", f"{unit.name} constants are not finite")
        axis = varying[0] + ndim - s.dim() if varying else None
        return _Map(s, t, axis)

    # --- backward ---------------------------------------------------------------------------------

    def _backward(self, unit: Unit, nodes: list[fx.Node], m: _Map) -> Fold:
        first = nodes[0]
        x = _chain_input(first, self.consts)
        merge: list[fx.Node] = []
        self._passed = []
        branches = self._sources(x, first, merge, f"input of {unit.name}")
        if len({id(b.layer.node) for b in branches}) != len(branches):
            raise _Fail("repeated_branch", f"the same layer output reaches {unit.name} twice")
        x_shape = shape(x)
        updates = []
        for k, branch in enumerate(branches):
            self._check_layer(branch.layer, unit)
            ids = _propagate_ids(
                lambda b=branch: _channel_ids(shape(b.layer.node), b.layer.channel_axis),
                branch.path,
                branch.layer.node,
                self._resolve,
            )
            scale, shift = self._per_channel(unit, m, x_shape, ids, branch.layer, branch.path)
            _check_positive(unit, branch.path, scale)  # every factor, scalar or per-channel
            if k > 0 and merge and merge[0].target in rules.MERGES and rules.MERGES[merge[0].target] == "add":
                shift = torch.zeros_like(shift)  # a sum gets the norm's shift once
            updates.append(self._update(branch.layer, "output", scale, shift))
        kind = branches[0].layer.kind if len(branches) == 1 else rules.MERGES[merge[0].target]
        norm = "bn" if unit.kind == "batch_norm" else "affine"
        through = tuple(dict.fromkeys(n.name for b in branches for n in b.path))
        return Fold(unit, f"{kind}-{norm}", tuple(updates), through, self._after())

    def _sources(self, node: fx.Node, user: fx.Node, merge: list[fx.Node], role: str) -> list[_Branch]:
        """The layers whose outputs reach ``user`` (as ``node``) through commuting ops."""
        while node in self.removed:
            self._passed.append(node)
            node = self.removed[node]
        if node.op == "placeholder":
            raise _stop(node, role)
        users = self._users(node)
        if users != [user] or sum(self._resolve(a) is node for a in _flat_args(user)) > 1:
            raise _Fail("multiple_users", f"{describe(node)} output has {len(users)} users")
        layer = rules.read_layer(node)
        if layer is not None:
            return [_Branch(layer, [])]
        through = rules.through_of(node)
        if through is not None and _same_dtype(node):
            reason = through.check(bind(node))
            if reason is not None:
                raise _Fail("not_commuting", f"{describe(node)}: {reason}")
            branches = self._sources(rules.through_input(node), node, merge, role)
        elif node.target in rules.MERGES and not merge and self._is_merge(node):
            merge.append(node)
            inputs = [a for a in _flat_args(node) if isinstance(a, fx.Node)]
            branches = [b for a in inputs for b in self._sources(a, node, merge, role)]
        else:
            raise _stop(node, role)
        for b in branches:
            b.path.append(node)
        return branches

    def _is_merge(self, node: fx.Node) -> bool:
        tensors = [a for a in _flat_args(node) if isinstance(a, fx.Node)]
        if node.target is torch.ops.aten.add.Tensor:
            out = shape(node)
            return len(tensors) == 2 and all(shape(a) == out and not self.consts.is_const[a] for a in tensors)
        return len(tensors) >= 2

    # --- forward ----------------------------------------------------------------------------------

    def _forward(self, unit: Unit, nodes: list[fx.Node], m: _Map) -> Fold:
        out = nodes[-1]
        x_shape = shape(_chain_input(nodes[0], self.consts))
        self._passed = []
        sinks = self._sinks(out, [], unit)
        if not sinks:
            raise _Fail("unused", f"{unit.name} output is never used")
        updates = []
        for layer, path in sinks:
            self._check_layer(layer, unit)
            if layer.transposed:
                raise _Fail(
                    "transposed_consumer",
                    f"{unit.name} feeds {describe(layer.node)}, a transposed "
                    "conv: a shift would reach border outputs a different number of times",
                )
            if layer.zero_padding:
                raise _Fail(
                    "zero_padding_forward",
                    f"{unit.name} feeds {describe(layer.node)}, whose zero "
                    "padding would see 0 instead of the norm's shift at the borders",
                )
            _check_positive(unit, path, m.s)
            ids = _propagate_ids(lambda: _channel_ids(x_shape, m.axis), path, out, self._resolve)
            scale, shift = _consumer_map(unit, m, x_shape, ids, layer)
            updates.append(self._update(layer, "input", scale, shift))
        pattern = f"{'bn' if unit.kind == 'batch_norm' else 'affine'}-{updates[0].kind}"
        through = tuple(dict.fromkeys(n.name for _, p in sinks for n in p))
        return Fold(unit, pattern, tuple(updates), through, self._after())

    def _sinks(self, node: fx.Node, path: list[fx.Node], unit: Unit) -> list[tuple[Layer, list[fx.Node]]]:
        found = []
        for user in self._users(node):
            layer = rules.layer_reading(user)
            if layer is not None and self._resolve(layer.input) is node:
                found.append((layer, path))
                continue
            through = rules.through_of(user)
            if (
                through is None
                or self._resolve(rules.through_input(user)) is not node
                or not _same_dtype(user)
            ):
                raise _stop(user, unit.name, forward=True)
            reason = through.check(bind(user))
            if reason is not None:
                raise _Fail("not_commuting", f"{describe(user)}: {reason}")
            found.extend(self._sinks(user, [*path, user], unit))
        return found

    # --- shared checks and maps -------------------------------------------------------------------

    def _resolve(self, node: Any) -> Any:
        """A folded op stands for its input."""
        while node in self.removed:
            node = self.removed[node]
        return node

    def _users(self, node: fx.Node) -> list[fx.Node]:
        """Users of the node's values: folded ops are seen through (their users count instead),
        and ops that read only its shape (``reshape_as(y, node)``) do not count."""
        out: list[fx.Node] = []
        for u in node.users:
            if u in self.removed:
                self._passed.append(u)
                out.extend(self._users(u))
            elif not _shape_only(u, node):
                out.append(u)
        return out

    def _after(self) -> tuple[str, ...]:
        """The folded ops the last walk passed through: the fold is exact only where they are gone."""
        return tuple(dict.fromkeys(n.name for n in self._passed))

    def _check_layer(self, layer: Layer, unit: Unit) -> None:
        check_layer(self.capture, layer, f"folding {unit.name} into it")

    def _per_channel(
        self,
        unit: Unit,
        m: _Map,
        x_shape: tuple[int, ...],
        ids: torch.Tensor | None,
        layer: Layer,
        path: list[fx.Node],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer-output-channel (scale, shift): the unit's map pulled back through ``path``."""
        channels = shape(layer.node)[layer.channel_axis]
        scale = torch.ones(channels, dtype=torch.float64)
        shift = torch.zeros(channels, dtype=torch.float64)
        if m.axis is None:
            scale[:], shift[:] = m.s.item(), m.t.item()
            return scale, shift
        out_axis = layer.channel_axis % len(shape(layer.node))
        if not path and m.axis != out_axis:
            raise _Fail(
                "wrong_axis",
                f"{unit.name} normalizes axis {m.axis} of the {shape(layer.node)} output of "
                f"{describe(layer.node)}, whose channels are on axis {out_axis}",
            )
        if ids is None:  # the norm reads the layer output itself, channel axis checked above
            rows = torch.arange(channels)
        else:
            rows = _axis_ids(ids, m.axis, unit, allow_missing=True)  # norm channel -> layer channel or -1
        s, t = m.s.reshape(-1).expand(x_shape[m.axis]), m.t.reshape(-1).expand(x_shape[m.axis])
        hit = rows >= 0
        targets = rows[hit]
        if targets.unique().numel() != targets.numel():
            raise _Fail(
                "channel_mixing",
                f"one channel of {describe(layer.node)} reaches several channels of {unit.name}",
            )
        scale[targets], shift[targets] = s[hit], t[hit]
        return scale, shift

    def _update(self, layer: Layer, side: str, scale: torch.Tensor, shift: torch.Tensor) -> LayerUpdate:
        _, module, cls = owner(layer.node)
        return LayerUpdate(
            layer=layer.node.name,
            module=self.capture.canonical(module),
            module_type=cls,
            kind=layer.kind,
            weight=self.capture.fqn[layer.weight.name],
            bias=self.capture.fqn[layer.bias.name] if layer.bias is not None else None,
            groups=layer.groups,
            in_out=layer.in_out,
            side=side,
            scale=scale,
            shift=shift,
        )


def check_layer(capture: Capture, layer: Layer, change: str) -> None:
    """Raise :class:`_Fail` unless ``layer``'s weight and bias are parameters that op alone reads,
    and its weight has its output's floating dtype (``change``: what would change them)."""
    what = describe(layer.node)
    for role, arg in (("weight", layer.weight), ("bias", layer.bias)):
        if arg is None:
            continue
        fqn = capture.state_of(arg)
        if fqn is None or capture.kind.get(arg.name) != "parameter":
            raise _Fail(
                "weight_not_parameter",
                f"{what} {role} is computed in forward "
                f"({describe(arg)}), not a parameter; its output may not be linear in it",
            )
        via = layer.via if role == "weight" else None
        if len(arg.users) > 1 or (via is not None and len(via.users) > 1):
            raise _Fail(
                "shared_producer",
                f"{what} {role} {fqn} is used by {len(arg.users)} ops "
                f"(a module called at several places, or a tied or directly read weight); "
                f"{change} would change the others",
            )
    weight = tensor_meta(layer.weight)
    if not weight.is_floating_point() or weight.dtype != tensor_meta(layer.node).dtype:
        raise _Fail("dtype", f"{what} weight is {weight.dtype}, its output {tensor_meta(layer.node).dtype}")


def _norm_like(m: _Map) -> bool:
    """A hand-written map worth reporting when it stays: per-channel scale *and* shift, like a BN."""
    return m.axis is not None and bool((m.s != 1).any()) and bool((m.t != 0).any())


def _check_positive(unit: Unit, path: list[fx.Node], scale: torch.Tensor) -> None:
    """``max(s*x + t) = s*max(x) + t`` only for ``s > 0`` (:mod:`normfold.signs`): ``scale`` is what
    the fold writes, a scalar map's value included."""
    found = signs.blocking(path, scale)
    if found is not None:
        op, bad = found
        raise _Fail(
            "negative_scale",
            f"{unit.name} has {bad} non-positive scale(s), which {describe(op)} does not commute with",
        )


# --- channel ids --------------------------------------------------------------------------------


def _channel_ids(full_shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """float64 tensor of ``full_shape`` holding each element's channel index along ``axis``."""
    if axis is None:
        return torch.zeros(full_shape, dtype=torch.float64)
    axis = axis % len(full_shape)
    view = [1] * len(full_shape)
    view[axis] = full_shape[axis]
    return torch.arange(full_shape[axis], dtype=torch.float64).reshape(view).expand(full_shape).clone()


def _propagate_ids(
    ids: Callable[[], torch.Tensor], path: list[fx.Node], start: fx.Node, resolve: Callable[[Any], Any]
) -> torch.Tensor | None:
    """Run ``path`` on channel ids (``-1``: no channel of ours) starting from node ``start``; None
    for an empty path (the channel axis is where it started: no tensor needed)."""
    if not path:
        return None
    ids = ids()
    prev = start
    for node in path:
        ids = _step(node, prev, ids, resolve)
        prev = node
    return ids


def _step(node: fx.Node, prev: fx.Node, ids: torch.Tensor, resolve: Callable[[Any], Any]) -> torch.Tensor:
    if node.target is torch.ops.aten.add.Tensor:  # a merge: our ids pass on, the other operand is not ours
        return ids.expand(shape(node)).clone()

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node) and resolve(a) is prev:
            return ids
        if isinstance(a, fx.Node) and tensor_meta(a) is not None:  # another concat input
            return torch.full(shape(a), -1.0, dtype=torch.float64)
        if isinstance(a, (list, tuple)):
            return type(a)(arg(v) for v in a)
        return concrete(a)

    kwargs = {k: arg(v) for k, v in node.kwargs.items() if k not in ("dtype", "layout", "device")}
    args = arg(node.args)
    if node.target in rules.REDUCTIONS:
        dims = bind(node)["dim"]
        for d in [dims] if isinstance(dims, int) else (dims or range(ids.dim())):
            if not bool((ids == ids.narrow(int(d), 0, 1)).all()):
                raise _Fail("channel_mixing", f"{describe(node)} reduces over the channel axis")
    if node.target in (
        torch.ops.aten._to_copy.default,
        torch.ops.aten.to.dtype,
        torch.ops.aten.to.dtype_layout,
    ):
        return ids.clone()
    if node.target is torch.ops.aten.type_as.default:
        return ids.clone()
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    return out


def _axis_ids(ids: torch.Tensor, axis: int, unit: Unit, *, allow_missing: bool) -> torch.Tensor:
    """For each index along ``axis``: the one channel id found there (``-1`` if none)."""
    rows = ids.movedim(axis, 0).reshape(ids.shape[axis], -1)
    if bool((rows != rows.round()).any()):
        raise _Fail("channel_mixing", f"channels are mixed on the way to {unit.name}")
    present = rows >= 0
    hi = torch.where(present, rows, torch.full_like(rows, -1.0)).amax(1)
    lo = torch.where(present, rows, torch.full_like(rows, float("inf"))).amin(1)
    has = present.any(1)
    if bool((has & (hi != lo)).any()):
        raise _Fail(
            "channel_mixing",
            f"{unit.name} normalizes an axis that does not hold one layer "
            "channel per index (the channel axis is lost on the way)",
        )
    if not allow_missing and not bool(has.all()):
        raise _Fail("channel_mixing", f"some inputs of the layer after {unit.name} do not come from it")
    return torch.where(has, hi, torch.full_like(hi, -1.0)).long()


def _consumer_map(
    unit: Unit, m: _Map, x_shape: tuple[int, ...], ids: torch.Tensor | None, layer: Layer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per consumer-input-channel (scale, shift) of the unit's map pushed forward to the layer."""
    channels = x_shape[layer.channel_axis] if ids is None else ids.shape[layer.channel_axis]
    if m.axis is None:
        return (torch.full((channels,), m.s.item(), dtype=torch.float64),
                torch.full((channels,), m.t.item(), dtype=torch.float64))  # fmt: skip
    if ids is None:  # the layer reads the norm output itself
        in_axis = layer.channel_axis % len(x_shape)
        if in_axis != m.axis:
            raise _Fail("wrong_axis", f"{unit.name} normalizes axis {m.axis} of the input of "
                        f"{describe(layer.node)}, whose channels are on axis {in_axis}")  # fmt: skip
        idx = torch.arange(channels)
    else:
        idx = _axis_ids(ids, layer.channel_axis % ids.dim(), unit, allow_missing=False)
    n = x_shape[m.axis]
    return m.s.reshape(-1).expand(n)[idx], m.t.reshape(-1).expand(n)[idx]


# --- node helpers -------------------------------------------------------------------------------


def _shape_only(user: fx.Node, node: fx.Node) -> bool:
    roles = rules.SHAPE_ONLY.get(user.target) if user.op == "call_function" else None
    if roles is None:
        return False
    args = bind(user)
    return all(args[name] is not node for name in args if name not in roles)


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    for a in (*node.args, *node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _affine_operand(node: fx.Node, consts: Constants) -> tuple[str, torch.Tensor, fx.Node, str] | None:
    """``(op, constant, x, x's argument name)`` when ``node`` is ``x (op) constant``."""
    op = rules.AFFINE_OPS.get(node.target) if node.op == "call_function" else None
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
    if node.target in rules.BATCH_NORMS:
        return "input"
    found = _affine_operand(node, consts)
    if found is None:
        raise ValueError(f"{node.name} is not a norm op")
    return found[3]


def _chain_input(node: fx.Node, consts: Constants) -> fx.Node:
    """The non-constant tensor a norm op transforms."""
    return bind(node)[input_arg(node, consts)]


def _same_dtype(node: fx.Node) -> bool:
    first = rules.through_input(node)
    a, b = tensor_meta(first) if first is not None else None, tensor_meta(node)
    return a is not None and b is not None and a.dtype == b.dtype


def describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return f"model input {node.name}"
    if node.op == "output":
        return "the model output"
    _, module, _ = owner(node)
    return f"{module} ({op_name(node)})" if module else f"{op_name(node)} (forward)"


def _stop(node: fx.Node, role: str, *, forward: bool = False) -> _Fail:
    """Why the walk stops at ``node``: the codes users see most."""
    what = describe(node)
    if node.op == "placeholder":
        return _Fail("after_input", f"{role} is {what}, not a Conv/ConvTranspose/Linear output")
    if node.op == "output":
        return _Fail("model_output", f"{role} output is returned by the model")
    name = op_name(node)
    if forward:
        if name in rules.ACTIVATIONS:
            return _Fail("before_activation", f"{role} output feeds {what}, not a Conv/Linear")
        return _Fail("feeds_op", f"{role} output feeds {what}, not a Conv/Linear")
    if name in rules.ACTIVATIONS:
        return _Fail("after_activation", f"{role} comes from {what}, not a Conv/ConvTranspose/Linear")
    if node.target in rules.BATCH_NORMS:
        return _Fail("after_norm", f"{role} comes from {what}, a norm that stays")
    if node.target in rules.MERGES:
        return _Fail(
            "merge_inputs",
            f"{role} comes from {what}, whose inputs are not all layer outputs used only there",
        )
    return _Fail("after_op", f"{role} comes from {what}, not a Conv/ConvTranspose/Linear")
