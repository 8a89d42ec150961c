"""Norm units: what a plan tries to fold, each with its per-channel affine map ``y = s * x + t``.

* a batch norm in eval mode (running statistics):
      s = gamma / sqrt(var + eps),  t = beta - mean * s       (channel axis 1; one channel: a
                                                               scalar map, the same everywhere)
* a maximal chain of elementwise ops of one module call with constant operands (``x*c``, ``x/c``,
  ``x+c``, ``x-c``, ``c-x``; constants computed from parameters, buffers and literals): the
  tutorials' ``gain * (h - mean) / std + bias``, composed op by op; every constant may vary along
  one axis only (the channel axis).

A unit whose map cannot be formed (training mode, non-finite statistics, constants varying along
two axes) is a candidate with ``refused`` set: a batch norm is then kept with that code, an
arithmetic chain is simply no norm. A batch norm computed on parameters alone (weight
standardization: ``F.batch_norm(W, None, None, training=True)``) is ``constant``: no map on data,
but a value a rule may compute once.
"""

from __future__ import annotations

import torch

from normfold.engine.affine import bn_affine
from normfold.engine.context import Candidate, Refused
from normfold.engine.records import Unit
from normfold.engine.view import GraphView, Node


def candidates(view: GraphView) -> list[Candidate]:
    """Every norm unit of the graph, in graph order."""
    found: list[Candidate] = []
    chain: list[Node] = []

    def close() -> None:
        if chain:
            found.append(_chain(view, list(chain)))
            chain.clear()

    for node in view.nodes():
        bn = view.batch_norm(node)
        step = view.affine_step(node) if bn is None else None
        if bn is not None:
            close()
            found.append(_batch_norm(view, node))
        elif step is not None:
            # a chain stays within one module call: the eager module can remove a module's ops
            # (the module becomes nn.Identity) but never part of its caller's forward
            same_call = bool(chain) and view.owner(node)[0] == view.owner(chain[-1])[0]
            if not (same_call and step.input is chain[-1] and len(view.users(step.input)) == 1):
                close()
            chain.append(node)
    close()
    return found


def _unit(view: GraphView, kind: str, nodes: list[Node], x: Node, stats: dict[str, str | None]) -> Unit:
    call, module, cls = view.owner(nodes[0])
    names = tuple(view.name(n) for n in nodes)
    return Unit(names, kind, view.canonical(module), cls, call, stats, view.name(x))


def _batch_norm(view: GraphView, node: Node) -> Candidate:
    bn = view.batch_norm(node)
    roles = {
        "weight": bn.weight,
        "bias": bn.bias,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }
    stats: dict[str, str | None] = {}
    for role, arg in roles.items():
        fqn = view.state_name(arg)
        prefix, _, attr = (fqn or "").rpartition(".")
        stats[role] = f"{view.canonical(prefix)}.{attr}" if prefix else fqn
    cand = Candidate(_unit(view, "batch_norm", [node], bn.input, stats), [node], [bn.input])
    cand.constant = view.is_constant(node)
    try:
        cand.s, cand.t, cand.axis = _bn_map(view, cand, roles)
    except Refused as r:
        cand.refused = r
    return cand


def _bn_map(
    view: GraphView, cand: Candidate, roles: dict[str, Node | None]
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    bn, unit = view.batch_norm(cand.nodes[0]), cand.unit
    name = unit.name
    if bn.training:
        stats = "without running statistics" if bn.running_mean is None else "in training mode"
        raise Refused("batch_statistics", f"{name} runs {stats}: it normalizes with batch statistics")
    values = {role: view.constant(arg) for role, arg in roles.items()}
    for role in ("running_mean", "running_var"):
        if values[role] is None:
            raise Refused("not_constant", f"{name} {role} is computed from the input, not a buffer")
    for role, v in values.items():
        if v is None and roles[role] is not None:
            raise Refused("not_constant", f"{name} {role} is computed from the input, not a parameter")
        if v is not None and not bool(torch.isfinite(v).all()):
            label = unit.stats.get(role) or f"{name} {role}"
            raise Refused(
                "bad_statistics", f"{label} has {int((~torch.isfinite(v)).sum())} non-finite value(s)"
            )
    var, eps = values["running_var"], bn.eps
    if bool((var + eps <= 0).any()):
        label = unit.stats.get("running_var") or f"{name} running_var"
        raise Refused("bad_statistics", f"{label} + eps is not positive (min {var.min().item():.6g})")
    x_shape = view.shape(bn.input)
    if len(x_shape) < 2:
        raise Refused("unbatched", f"{name} input {x_shape} has no channel axis")
    s, t = bn_affine(values["running_mean"], var, values["weight"], values["bias"], eps)
    if x_shape[1] == 1 and s.numel() == 1:  # one channel: the same map on every element, any axis
        return s.reshape(()), t.reshape(()), None
    shape = (-1, *([1] * (len(x_shape) - 2)))
    return s.reshape(shape), t.reshape(shape), 1


def _chain(view: GraphView, nodes: list[Node]) -> Candidate:
    steps = [view.affine_step(n) for n in nodes]
    cand = Candidate(_unit(view, "affine", nodes, steps[0].input, {}), nodes, [st.input for st in steps])
    ndim = len(view.shape(cand.inputs[0]))
    s = torch.ones((), dtype=torch.float64)
    t = torch.zeros((), dtype=torch.float64)
    for st in steps:
        c = st.constant
        if st.op == "mul":
            s, t = s * c, t * c
        elif st.op == "div":
            s, t = s / c, t / c
        elif st.op == "add":
            t = t + c * st.alpha
        elif st.op == "sub":
            t = t - c * st.alpha
        else:  # rsub: c - alpha*x
            s, t = -st.alpha * s, c - st.alpha * t
    s, t = torch.broadcast_tensors(s, t)
    name = cand.unit.name
    varying = [i for i, n in enumerate(s.shape) if n != 1]
    if s.dim() > ndim:
        cand.refused = Refused("not_per_channel", f"{name} constants broadcast beyond the input's rank")
    elif len(varying) > 1:
        dims = [i + ndim - s.dim() for i in varying]
        cand.refused = Refused(
            "not_per_channel", f"{name} constants vary along axes {dims}, not one channel axis"
        )
    elif not bool(torch.isfinite(s).all() & torch.isfinite(t).all()):
        cand.refused = Refused("bad_statistics", f"{name} constants are not finite")
    else:
        cand.s, cand.t = s, t
        cand.axis = varying[0] + ndim - s.dim() if varying else None
    return cand


def norm_like(cand: Candidate) -> bool:
    """A hand-written map worth reporting when it stays: per-channel scale *and* shift, like a BN."""
    return cand.axis is not None and bool((cand.s != 1).any()) and bool((cand.t != 0).any())
