"""Reading a :class:`~normfold.engine.rebuild.Recipe` off the captured graph: the ops of a module's
calls that a fold leaves (:mod:`normfold.engine.rebuild` states what a recipe may hold, and runs it).

:class:`CallIndex` lists the ops of every module call once per capture; :func:`recipe` walks the
calls of one module, skipping the nodes the fold removed, and returns its steps, or why the module
cannot be rebuilt (every call must leave the same steps).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from normfold.engine.capture import Capture, bind, module_calls
from normfold.engine.rebuild import ATTR, VALUE, Recipe, Step

__all__ = ["CallIndex", "recipe"]

#: arguments an op schema types ``SymInt`` (sizes: a view's, a slice's bounds)
_SIZED = re.compile(r"SymInt(?:\[\d*\])?\??\s+(\w+)")


class CallIndex:
    """The ops of every module call of a captured graph: call key -> its ``call_function`` nodes
    (in graph order) and the canonical path of the module it calls."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.nodes: dict[str, list[fx.Node]] = {}
        self.path: dict[str, str] = {}
        self.calls: dict[str, list[str]] = {}  # canonical path -> its call keys
        self.child: dict[tuple[str, str], str] = {}  # (call key, node name) -> the next call key
        for node in capture.graph.nodes:
            if node.op != "call_function":
                continue
            stack = module_calls(node)
            for i, (key, path) in enumerate(stack):
                if key not in self.nodes:
                    self.nodes[key] = []
                    canonical = capture.canonical(path)
                    self.path[key] = canonical
                    self.calls.setdefault(canonical, []).append(key)
                self.nodes[key].append(node)
                if i + 1 < len(stack):
                    self.child[key, node.name] = stack[i + 1][0]


def recipe(
    index: CallIndex,
    path: str,
    module: nn.Module,
    removed: Mapping[str, fx.Node | None],
    is_const: Mapping[fx.Node, bool],
    merged: Collection[str] = (),
) -> Recipe | str:
    """The :class:`Recipe` of ``module`` (at canonical ``path``) once the nodes of ``removed`` are
    gone (node name -> the node its output becomes, None for a node that only feeds removed ones),
    or why it cannot be rebuilt. A child call that runs a removed node is called whole (the eager
    module removed that node from the child too), unless the node is one of ``merged`` (a merged
    block's sum and branches, which no child of the eager module takes away): then the step calls
    the descendant of the child that runs all the rest (the merged conv's module)."""
    keys = index.calls.get(path, [])
    if not keys:
        return f"{path} runs no op"
    found: Recipe | None = None
    for key in keys:
        got = _call_recipe(index, key, path, module, removed, is_const, merged)
        if isinstance(got, str):
            return got
        if found is not None and got != found:
            return f"{path} runs other ops on another call"
        found = got
    assert found is not None
    if not found.steps:
        return f"{path} runs nothing once folded"
    return found


def _call_recipe(
    index: CallIndex,
    key: str,
    path: str,
    module: nn.Module,
    removed: Mapping[str, fx.Node | None],
    is_const: Mapping[fx.Node, bool],
    merged: Collection[str],
) -> Recipe | str:
    capture = index.capture
    nodes = index.nodes[key]
    inside = set(nodes)
    own = {f"{path}.{n}" if path else n: n for n, _ in [*module.named_parameters(recurse=False),
                                                      *module.named_buffers(recurse=False)]}  # fmt: skip
    children = {(f"{path}.{n}" if path else n): n for n, _ in module.named_children()}

    def outside(node: fx.Node) -> bool:
        return node not in inside and not is_const.get(node, False)

    entry = {a for n in nodes for a in n.all_input_nodes if outside(a)}
    if len(entry) != 1:
        return f"{path} takes {len(entry)} tensor inputs (one expected)"
    x = next(iter(entry))
    value: dict[fx.Node, fx.Node] = {}  # removed node -> the node its output became

    def resolve(node: fx.Node) -> fx.Node:
        while node in value:
            node = value[node]
        return node

    steps: list[Step] = []
    known: dict[fx.Node, int] = {x: 0}  # node -> index of its value (0: the input, then each step's)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        child_key = index.child.get((key, node.name))
        if child_key is None and node.name in removed:
            target = removed[node.name]
            if target is not None:
                value[node] = target
            i += 1
            continue
        if is_const.get(node, False):
            if any(not _dead(u, removed, is_const) for u in node.users):
                return f"{path} computes {node.name} from its parameters for the ops that stay"
            i += 1
            continue
        if child_key is not None:
            end = i
            while end < len(nodes) and index.child.get((key, nodes[end].name)) == child_key:
                end += 1
            group = nodes[i:end]
            i = end
            if any(index.child.get((key, n.name)) == child_key for n in nodes[end:]):
                return f"{path} runs other ops between the ops of {index.path[child_key]}"
            for n in group:
                if n.name in removed and removed[n.name] is not None:
                    value[n] = removed[n.name]  # type: ignore[assignment]
            if all(n.name in removed or is_const.get(n, False) for n in group):
                continue  # the child runs nothing once folded (an nn.Identity in the eager module)
            if any(n.name in merged for n in group):
                found = _descend(index, key, child_key, group, removed, merged, is_const)
                if found is None:
                    return f"{path} runs ops of {index.path[child_key]} besides the merged conv"
                sub, group = found
            else:
                sub = child_key
            name = _relative(index.path[sub], path)
            if name is None or name.partition(".")[0] not in children.values():
                return f"{path} calls {index.path[sub]}, not a module under it"
            got = _child_step(group, known, resolve, is_const, path)
            if isinstance(got, str):
                return got
            source, out = got
            steps.append(Step(module=name, args=({VALUE: source},)))
            known[out] = len(steps)
            continue
        step = _op_step(node, known, resolve, own, capture, path)
        if isinstance(step, str):
            return step
        steps.append(step)
        known[node] = len(steps)
        i += 1
    ends = {resolve(n) for n in nodes if any(u not in inside for u in n.users)}
    if not steps or ends != {next(n for n, k in known.items() if k == len(steps))}:
        return f"{path} does not return its last op's value alone"
    writer = _first_write(nodes, removed, x, resolve)
    if writer is not None:
        readers = {u for n in [x, *value] if resolve(n) is x for u in n.users if u.name not in removed}
        if x.op == "placeholder" or readers - {writer}:
            return f"{path} would change its input in place ({writer.name}), which other ops read"
    return Recipe(type(module).__name__, tuple(steps))


def _descend(
    index: CallIndex,
    key: str,
    child_key: str,
    group: list[fx.Node],
    removed: Mapping[str, fx.Node | None],
    merged: Collection[str],
    is_const: Mapping[fx.Node, bool],
) -> tuple[str, list[fx.Node]] | None:
    """The outermost call under ``child_key`` that runs every op of ``group`` the merge keeps and
    none it takes away, with its ops; None when there is none."""
    kept = [n for n in group if n.name not in removed and not is_const.get(n, False)]
    if not kept:
        return None
    stack = [k for k, _ in module_calls(kept[0])]
    below = stack[stack.index(child_key) + 1 :] if child_key in stack else []
    for sub in below:
        ops = index.nodes[sub]
        if set(kept) <= set(ops) and not any(n.name in merged for n in ops):
            return sub, ops
    return None


def _relative(sub: str, path: str) -> str | None:
    """``sub``'s path under ``path`` (``"mixer.convs.0"``), or None when it is not under it."""
    if not path:
        return sub or None
    return sub[len(path) + 1 :] if sub.startswith(path + ".") else None


def _child_step(
    group: list[fx.Node],
    known: Mapping[fx.Node, int],
    resolve: Any,
    is_const: Mapping[fx.Node, bool],
    path: str,
) -> tuple[int, fx.Node] | str:
    """A child call's input (an index of ``known``) and output node: it must read one tensor
    (besides constants) and give one, or why not."""
    members = set(group)
    inputs = {
        resolve(a) for n in group for a in n.all_input_nodes if a not in members and not is_const.get(a)
    }
    if len(inputs) != 1 or next(iter(inputs)) not in known:
        return f"{path} feeds a child module more than one tensor of its own call"
    outs = [n for n in group if any(u not in members for u in n.users)]
    if len(outs) != 1:
        return f"{path} uses {len(outs)} outputs of a child module (one expected)"
    return known[next(iter(inputs))], outs[0]


def _op_step(
    node: fx.Node,
    known: Mapping[fx.Node, int],
    resolve: Any,
    own: Mapping[str, str],
    capture: Capture,
    path: str,
) -> Step | str:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return f"{path} runs {node.name} ({target}), not an ATen op"
    sized = _SIZED.findall(str(target._schema))
    if sized:  # sizes the capture read off this input (a view's): another input needs others
        return f"{path} runs {node.name}, whose {sized[0]} the capture may have fixed to this input"

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            fqn = capture.state_of(a)
            if fqn is not None:
                prefix, _, attr = fqn.rpartition(".")
                full = f"{capture.canonical(prefix)}.{attr}" if prefix else fqn
                if full in own:
                    return {ATTR: own[full]}
            if resolve(a) in known:
                return {VALUE: known[resolve(a)]}
            raise ValueError(f"{path} feeds {node.name} with {a.name}")
        if isinstance(a, (list, tuple)):
            return [arg(v) for v in a]
        if a is None or isinstance(a, (bool, int, str)) or (isinstance(a, float) and math.isfinite(a)):
            return a
        raise ValueError(f"{path} passes {node.name} an argument of type {type(a).__name__}")

    try:
        args = tuple(arg(a) for a in node.args)
        kwargs = tuple((k, arg(v)) for k, v in node.kwargs.items())
    except ValueError as e:
        return str(e)
    packet = target._overloadpacket.__name__
    return Step(op=f"{packet}.{target._overloadname}", args=args, kwargs=kwargs)


def _dead(node: fx.Node, removed: Mapping[str, fx.Node | None], is_const: Mapping[fx.Node, bool]) -> bool:
    if node.name in removed:
        return True
    return bool(is_const.get(node, False)) and all(_dead(u, removed, is_const) for u in node.users)


def _first_write(
    nodes: Sequence[fx.Node], removed: Mapping[str, fx.Node | None], x: fx.Node, resolve: Any
) -> fx.Node | None:
    """An op of the call that writes in place to what, once folded, is the call's input ``x``
    (an ``inplace=True`` activation after the norm: the norm made a new tensor for it before)."""
    for n in nodes:
        if n.name in removed or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        if not schema.is_mutable:
            continue
        args = bind(n)
        for a in schema.arguments:
            written = a.alias_info is not None and a.alias_info.is_write
            if written and isinstance(args.get(a.name), fx.Node) and resolve(args[a.name]) is x:
                return n
    return None
