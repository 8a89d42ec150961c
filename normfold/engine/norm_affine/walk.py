"""From a norm's output to every op that reads it: the Linear layers it feeds, or what blocks a fold.

The walk follows each user of the norm's output through ops that only move elements (layout ops of
:meth:`~normfold.engine.view.GraphView.through`: views, reshapes, transposes, head splits and merges,
slices, eval-mode dropout; dtype casts of :meth:`NormView.cast_input`; gathers of whole rows,
:meth:`NormView.row_gather`, where every row carries the same channels), carrying a tensor of
channel ids (``c`` at every element of norm channel ``c``) through each op with
:meth:`~normfold.engine.view.GraphView.step_ids`. It stops at:

* a Linear (:meth:`~normfold.engine.view.GraphView.layer_reading` of kind ``linear``: ``linear``,
  ``addmm``, ``x @ W`` with ``W`` or ``W.T`` a parameter, ``x @ W + b``; or a batch of them,
  :meth:`NormView.matmul_layer`, MoE experts in one grouped matmul included) whose data input
  is the walked tensor: a *consumer*, with the
  channel ids at its input;
* a product ``x * z`` or quotient ``x / z`` (``z`` anything, a gate or a router weight): the walk goes
  on (the scale passes such an op, ``(g * n) * z = g * (n * z)``; a shift does not: the planner
  refuses a norm with a shift whose walk passed one, :attr:`Walk.products`);
* anything else: a *blocker*, classified into the code a kept norm gets (:func:`blocking_code`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from normfold.engine.context import Refused
from normfold.engine.norm_affine.view import AffineNorm, NormView
from normfold.engine.view import LayerRef, Node

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reached:
    """A Linear the norm feeds: the channel ids at its input, and the ops on the way."""

    layer: LayerRef
    ids: torch.Tensor
    through: tuple[str, ...]


@dataclass
class Walk:
    """What :func:`walk` found: the consumers, the blockers, and the products the scale passed
    (``x * z``, ``x / z``: the scale, not the shift, moves through them)."""

    reached: list[Reached]
    blockers: list[Node]
    products: list[Node]


def walk(view: NormView, norm: AffineNorm) -> Walk:
    """The consumers and blockers of ``norm`` (module docstring). A product with a tensor that
    itself carries the norm's scale (``h * h``) is a blocker: its scale would be squared."""
    shape = view.shape(norm.output)
    axis = norm.axis % len(shape)
    view_shape = [1] * len(shape)
    view_shape[axis] = norm.channels
    ids = torch.arange(norm.channels, dtype=torch.float64).reshape(view_shape).expand(shape).clone()
    stack: list[tuple[Node, torch.Tensor, tuple[str, ...]]] = [(norm.output, ids, ())]
    found = Walk([], [], [])
    carried = {norm.output}
    while stack:
        node, ids, path = stack.pop()
        for user in view.users(node):
            if view.uses(user, node) != 1:
                found.blockers.append(user)
                continue
            layer = None if view.is_output(user) else (view.layer_reading(user) or view.matmul_layer(user))
            layer = _weight_through_cast(view, layer)
            if layer is not None and layer.kind in ("linear", "batched_linear") and layer.input is node:
                found.reached.append(Reached(layer, ids, path))
                continue
            moved = None if view.is_output(user) else _moved(view, user, node, ids)
            if moved is None and _product(view, user, node):
                moved = torch.broadcast_to(ids, view.shape(user)).clone()
                found.products.append(user)
            if moved is None:
                found.blockers.append(user)
            elif user not in carried:
                carried.add(user)
                stack.append((user, moved, (*path, view.name(user))))
            else:  # reached twice: two operands of one op carry the scale (``h * h``, ``h + h``)
                found.blockers.append(user)
    return found


def _weight_through_cast(view: NormView, layer: LayerRef | None) -> LayerRef | None:
    """``layer`` with a weight read through a dtype cast (DeepSeek's router:
    ``F.linear(h.float(), self.weight.float())``) seen as reading the parameter ``via`` the cast: the
    fold scales the parameter, the cast then rounds the scaled value as it rounded the original."""
    if layer is None or layer.via is not None:
        return layer
    source = view.cast_input(layer.weight)
    if source is None or not view.is_parameter(source) or view.users(layer.weight) != [layer.node]:
        return layer
    return dataclasses.replace(layer, weight=source, via=layer.weight)


def _product(view: NormView, user: Node, node: Node) -> bool:
    """``user`` is ``node * z`` or ``node / z`` (any ``z``, constant or not): a per-channel scale
    on ``node`` passes it unchanged, ``(g * n) * z = g * (n * z)``."""
    operands = view.operands(user)
    if view.op_name(user) == "mul":
        return True
    return view.op_name(user) == "div" and bool(operands) and operands[0] is node


def _moved(view: NormView, user: Node, node: Node, ids: torch.Tensor) -> torch.Tensor | None:
    """The channel ids after ``user`` when it only moves elements of ``node``, else None."""
    if view.cast_input(user) is node:
        return ids
    if view.row_gather(user) is node:  # whole rows picked (an MoE's token dispatch): each keeps its ids
        rows = ids.reshape(-1, ids.shape[-1])
        if not bool((rows == rows[0]).all()):
            return None  # the norm's channels vary along a gathered axis
        return rows[0].expand(view.shape(user)).clone()
    through = view.through(user)
    if through is None or through.kind != "layout" or through.refused is not None:
        return None
    if through.input is not node:
        return None
    try:
        return view.step_ids(user, node, ids, lambda n: n)
    except Exception:  # an op that cannot run on channel ids (float64, CPU) is no path to follow
        logger.debug("cannot follow channel ids through %s", view.name(user), exc_info=True)
        return None


def input_channels(view: NormView, reached: Reached) -> tuple[int, ...]:
    """The norm channel each input feature of the Linear reads; Refused (``wrong_axis``) when one
    feature mixes channels or the Linear reads the norm along another axis."""
    ids = reached.ids
    name = view.describe(reached.layer.node)
    if ids.dim() == 0:
        raise Refused("wrong_axis", f"{name} reads the norm's output as a scalar")
    flat = ids.reshape(-1, ids.shape[-1])
    first = flat[0]
    if not bool((flat == first).all()) or bool((first < 0).any()) or bool((first != first.round()).any()):
        raise Refused(
            "wrong_axis",
            f"{name} reads the norm's output along another axis than the one its scale varies along",
        )
    return tuple(int(c) for c in first.tolist())


def blocking_code(view: NormView, norm: AffineNorm, blockers: list[Node], products: list[Node]) -> Refused:
    """The code and reason of a norm whose output reaches ``blockers``, not only Linear layers.

    ``model_output``: the model returns it; ``residual_user``: it is added to another tensor (the
    residual of a post-norm block); ``rope_after_norm``: it is multiplied and half-swapped (``mul``
    and ``neg``/``cat``: a rotary embedding after a qk-norm); ``nonlinear_consumer``: anything else
    (an activation, a product with another activation, a conv)."""
    names = ", ".join(dict.fromkeys(view.describe(b) for b in blockers))
    where = view.describe(norm.output)
    if any(view.is_output(b) for b in blockers):
        return Refused("model_output", f"the output of the norm at {where} is returned by the model: "
                       "its scale and shift must stay")  # fmt: skip
    ops = {view.op_name(b) for b in [*blockers, *products]}
    if "mul" in ops and ops & {"neg", "cat", "stack"}:
        ops_named = ", ".join(dict.fromkeys(view.describe(b) for b in [*products, *blockers]))
        return Refused("rope_after_norm", f"the output of the norm at {where} is rotated before any "
                       f"Linear (a rotary embedding: {ops_named})")  # fmt: skip
    if any(_sums(view, b) for b in blockers):
        return Refused("residual_user", f"the output of the norm at {where} is also added to another "
                       f"tensor (a residual: {names}): a Linear alone cannot absorb its scale")  # fmt: skip
    return Refused("nonlinear_consumer", f"the output of the norm at {where} feeds {names}, not a Linear "
                   "over its normalized axis")  # fmt: skip


def _sums(view: NormView, node: Node) -> bool:
    """``node`` adds (or subtracts) two tensors computed from the input."""
    operands = view.operands(node)
    summed = view.merge_kind(node) == "add" or view.op_name(node) == "sub"
    return summed and len(operands) >= 2 and not any(view.is_constant(o) for o in operands)
