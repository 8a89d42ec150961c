"""Channel correspondence, proven by running the path on channel ids.

Between a layer and a norm sit layout ops (reshape, permute, slice, cat, upsample, ...). Instead
of reasoning about each, the path is run on a float64 tensor holding, at every element, the index
of the layer channel it came from (``-1``: not from this layer). Along the norm's channel axis each
index must then hold exactly one layer channel (:func:`axis_ids`); a reduction over the channel
axis, or an op that mixes values, breaks that and is refused (``channel_mixing``).

With ``rows[c]`` the layer channel under norm channel ``c``:

    backward (layer -> norm):   scale[rows[c]] = s[c],  shift[rows[c]] = t[c]   (every other
                                layer channel keeps scale 1, shift 0: it never reaches the norm)
    forward  (norm -> layer):   scale[i] = s[ids[i]],   shift[i] = t[ids[i]]    (every layer input
                                channel must come from the norm)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normfold.engine.context import Context, Refused
from normfold.engine.view import LayerRef, Node


def channel_ids(full_shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """float64 tensor of ``full_shape`` holding each element's channel index along ``axis``."""
    if axis is None:
        return torch.zeros(full_shape, dtype=torch.float64)
    axis = axis % len(full_shape)
    view = [1] * len(full_shape)
    view[axis] = full_shape[axis]
    return torch.arange(full_shape[axis], dtype=torch.float64).reshape(view).expand(full_shape).clone()


def propagate_ids(
    ctx: Context, ids: Callable[[], torch.Tensor], path: list[Node], start: Node
) -> torch.Tensor | None:
    """Run ``path`` on channel ids starting from node ``start``; None for an empty path (the
    channel axis is where it started: no tensor needed)."""
    if not path:
        return None
    view, out, prev = ctx.view, ids(), start
    for node in path:
        dims = view.reduced_dims(node, out.dim())
        for d in dims or ():
            if not bool((out == out.narrow(d, 0, 1)).all()):
                raise Refused("channel_mixing", f"{view.describe(node)} reduces over the channel axis")
        out = view.step_ids(node, prev, out, ctx.resolve)
        prev = node
    return out


def axis_ids(ids: torch.Tensor, axis: int, name: str, *, allow_missing: bool) -> torch.Tensor:
    """For each index along ``axis``: the one channel id found there (``-1`` if none)."""
    rows = ids.movedim(axis, 0).reshape(ids.shape[axis], -1)
    if bool((rows != rows.round()).any()):
        raise Refused("channel_mixing", f"channels are mixed on the way to {name}")
    # ids are -1 (not from the layer) or a channel >= 0: the largest is the channel when there is
    # one, and the smallest equals it unless the index holds two channels, or a channel and -1
    lo, hi = torch.aminmax(rows, dim=1)
    has = hi >= 0
    partial = has & (lo < 0)  # part from the layer, part not (a cat along another axis)
    if bool(partial.any()):
        some = rows[partial]
        lo = lo.clone()
        lo[partial] = some.masked_fill(some < 0, float("inf")).amin(1)
    if bool((has & (hi != lo)).any()):
        raise Refused(
            "channel_mixing",
            f"{name} normalizes an axis that does not hold one layer "
            "channel per index (the channel axis is lost on the way)",
        )
    if not allow_missing and not bool(has.all()):
        raise Refused("channel_mixing", f"some inputs of the layer after {name} do not come from it")
    return hi.long()  # -1 where no channel of the layer is found


def pull_back(
    ctx: Context,
    name: str,
    s: torch.Tensor,
    t: torch.Tensor,
    axis: int | None,
    x_shape: tuple[int, ...],
    layer: LayerRef,
    path: list[Node],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer-output-channel ``(scale, shift)``: the norm's map pulled back through ``path``."""
    view = ctx.view
    out_shape = view.shape(layer.node)
    channels = out_shape[layer.channel_axis]
    scale = torch.ones(channels, dtype=torch.float64)
    shift = torch.zeros(channels, dtype=torch.float64)
    # run even for a scalar map: a reduction over the layer's channels refuses the fold
    ids = propagate_ids(ctx, lambda: channel_ids(out_shape, layer.channel_axis), path, layer.node)
    if axis is None:
        scale[:], shift[:] = s.item(), t.item()
        return scale, shift
    out_axis = layer.channel_axis % len(out_shape)
    if not path and axis != out_axis:
        raise Refused(
            "wrong_axis",
            f"{name} normalizes axis {axis} of the {out_shape} output of "
            f"{view.describe(layer.node)}, whose channels are on axis {out_axis}",
        )
    if ids is None:  # the norm reads the layer output itself, channel axis checked above
        rows = torch.arange(channels)
    else:
        rows = axis_ids(ids, axis, name, allow_missing=True)  # norm channel -> layer channel or -1
    s, t = s.reshape(-1).expand(x_shape[axis]), t.reshape(-1).expand(x_shape[axis])
    hit = rows >= 0
    targets = rows[hit]
    if targets.unique().numel() != targets.numel():
        raise Refused(
            "channel_mixing",
            f"one channel of {view.describe(layer.node)} reaches several channels of {name}",
        )
    scale[targets], shift[targets] = s[hit], t[hit]
    return scale, shift


def push_forward(
    ctx: Context,
    name: str,
    s: torch.Tensor,
    t: torch.Tensor,
    axis: int | None,
    x_shape: tuple[int, ...],
    out: Node,
    layer: LayerRef,
    path: list[Node],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per consumer-input-channel ``(scale, shift)`` of the norm's map pushed forward to ``layer``
    (``out``: the norm's output node, where ``path`` starts)."""
    ids = propagate_ids(ctx, lambda: channel_ids(x_shape, axis), path, out)
    channels = x_shape[layer.channel_axis] if ids is None else ids.shape[layer.channel_axis]
    if axis is None:
        return (torch.full((channels,), s.item(), dtype=torch.float64),
                torch.full((channels,), t.item(), dtype=torch.float64))  # fmt: skip
    if ids is None:  # the layer reads the norm output itself
        in_axis = layer.channel_axis % len(x_shape)
        if in_axis != axis:
            what = ctx.view.describe(layer.node)
            raise Refused(
                "wrong_axis",
                f"{name} normalizes axis {axis} of the input of {what}, whose channels are on axis {in_axis}",
            )
        idx = torch.arange(channels)
    else:
        idx = axis_ids(ids, layer.channel_axis % ids.dim(), name, allow_missing=False)
    n = x_shape[axis]
    return s.reshape(-1).expand(n)[idx], t.reshape(-1).expand(n)[idx]
