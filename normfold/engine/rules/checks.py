"""Checks every fold rule shares: the layer may change, the scale may cross the path, the folded
values fit their dtype; and why a walk stops where it does (the codes users see most).

Each check raises :class:`~normfold.engine.context.Refused` with a code and a reason; none returns
a bare ``False``.
"""

from __future__ import annotations

import torch

from normfold.engine import signs
from normfold.engine.context import Context, Refused
from normfold.engine.records import Fold
from normfold.engine.view import GraphView, LayerRef, Node


def check_layer(view: GraphView, layer: LayerRef, change: str) -> None:
    """Refuse unless ``layer``'s weight and bias are parameters that op alone reads, and its weight
    has its output's floating dtype (``change``: what would change them)."""
    what = view.describe(layer.node)
    for role, arg in (("weight", layer.weight), ("bias", layer.bias)):
        if arg is None:
            continue
        fqn = view.state_name(arg)
        if fqn is None or not view.is_parameter(arg):
            raise Refused(
                "weight_not_parameter",
                f"{what} {role} is computed in forward "
                f"({view.describe(arg)}), not a parameter; its output may not be linear in it",
            )
        via = layer.via if role == "weight" else None
        users = len(view.users(arg))
        if users > 1 or (via is not None and len(view.users(via)) > 1):
            raise Refused(
                "shared_producer",
                f"{what} {role} {fqn} is used by {users} ops "
                f"(a module called at several places, or a tied or directly read weight); "
                f"{change} would change the others",
            )
    weight, out = view.dtype(layer.weight), view.dtype(layer.node)
    if weight is None or not weight.is_floating_point or weight != out:
        raise Refused("dtype", f"{what} weight is {weight}, its output {out}")


def check_positive(view: GraphView, name: str, path: list[Node], scale: torch.Tensor) -> None:
    """``max(s*x + t) = s*max(x) + t`` only for ``s > 0`` (:mod:`normfold.engine.signs`): ``scale`` is what
    the fold writes, a scalar map's value included."""
    found = signs.blocking(view, path, scale)
    if found is not None:
        op, bad = found
        raise Refused(
            "negative_scale",
            f"{name} has {bad} non-positive scale(s), which {view.describe(op)} does not commute with",
        )


def check_range(ctx: Context, fold: Fold) -> None:
    """A fold whose new values overflow the parameter dtype (fp16: |x| > 65504) is no fold."""
    found = ctx.plan.overflow(ctx.values, [*ctx.related(fold), fold])
    if found is not None:
        name, dtype = found
        raise Refused(
            "overflow",
            f"the folded {name} does not fit in {str(dtype).removeprefix('torch.')} "
            f"(largest finite {torch.finfo(dtype).max:.4g}): the fold would make it inf",
        )


def stop(view: GraphView, node: Node, role: str, *, forward: bool = False) -> Refused:
    """Why a walk stops at ``node``."""
    what = view.describe(node)
    if view.is_input(node):
        return Refused("after_input", f"{role} is {what}, not a Conv/ConvTranspose/Linear output")
    if view.is_output(node):
        return Refused("model_output", f"{role} output is returned by the model")
    if forward:
        if view.is_activation(node):
            return Refused("before_activation", f"{role} output feeds {what}, not a Conv/Linear")
        return Refused("feeds_op", f"{role} output feeds {what}, not a Conv/Linear")
    if view.is_activation(node):
        return Refused("after_activation", f"{role} comes from {what}, not a Conv/ConvTranspose/Linear")
    if view.batch_norm(node) is not None:
        return Refused("after_norm", f"{role} comes from {what}, a norm that stays")
    if view.merge_kind(node) is not None:
        return Refused(
            "merge_inputs",
            f"{role} comes from {what}, whose inputs are not all layer outputs used only there",
        )
    return Refused("after_op", f"{role} comes from {what}, not a Conv/ConvTranspose/Linear")
