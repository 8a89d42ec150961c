"""Reparameterization in the user's module: which merged blocks change there too, and how.

A merge (:mod:`normfold.reparam`) is planned on the exported program, where every fold of the
plan has happened. The eager module takes only the folds it can (``EagerPlan.folds``, "both"): an
op folded in the export only (forward code such as ``x + 100.0`` or ``F.batch_norm``) still runs
in its ``forward``, and the layers it was folded into keep their own values there. So a block
merges in the module only when

1. seen with the eager folds only (:func:`normfold.reparam.plan_merges` with ``folds``), it is the
   same block: the same sum of the same branches (an export-only op inside a branch, or between
   a branch and the block's input, makes it another block or none);
2. its merged kernel is computed from the module's own values (the eager folds' values, the
   capture's for the rest), never from the program's, which include the export-only folds. The
   module then computes ``forward``'s ops around the block on a conv equal to the sum of the
   branches it has, exactly as before;
3. every branch is a module of its own (running that branch's ops and nothing else, no hooks):
   the branch with the largest kernel becomes one conv, the others :class:`MergedBranch` (zeros).

A later round of planning (:mod:`normfold.replan`) plans on the program, which differs from the
module wherever the export alone changed: a block with a branch there (:class:`~normfold.replan.Drift`)
merges in the export only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from normfold.graph import Capture, module_calls

if TYPE_CHECKING:
    from normfold.plan import Fold
    from normfold.reparam import Branch, Merge, Unmerged
    from normfold.replan import Drift

_WEIGHTED = "the block subtracts or scales branches in forward code"


class MergedBranch(nn.Module):
    """A branch reparameterization merged into a sibling conv: it returns zeros of the block's
    output shape (the shape the merged conv gives ``x``), so the block's own ``forward`` still
    adds it, in place or not, and gets the merged conv's output."""

    def __init__(
        self,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        geometry = zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation, strict=True)
        spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in geometry]  # conv arithmetic
        return x.new_zeros(x.shape[0], self.out_channels, *spatial)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


@dataclass(frozen=True)
class EagerMerge:
    """How a merge lands in the user's module: ``target`` becomes the merged conv, ``zero``
    become :class:`MergedBranch`; or, with ``note``, it is applied to the export only."""

    target: str | None = None
    zero: tuple[str, ...] = ()
    note: str | None = None
    #: the merged conv's weight and bias in the module (FQN -> tensor): from the module's values
    values: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)


def eager_merges(
    capture: Capture,
    merges: Sequence[Merge],
    model: nn.Module,
    owned: Mapping[str, set[str]],
    *,
    eager_view: tuple[Sequence[Merge], Sequence[Unmerged]] | None = None,
    export_only: Sequence[Fold] = (),
    drift: Drift | None = None,
) -> list[EagerMerge]:
    """For each merge: the modules to swap in ``model`` (conditions 1 and 3 of the module
    docstring), or why it applies to the export only. ``owned``: module path -> the ops it runs
    (:func:`normfold.graph.ops_by_module`); ``eager_view``: the merges and the blocks that stay,
    planned with the eager folds only (None: ``merges``, no fold is export-only); ``export_only``: the
    plan's folds the module does not take; ``drift``: where the module and the program differ
    (a later round's merges)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_name = {n.name: n for n in capture.graph.nodes}
    same, stay = (list(merges), []) if eager_view is None else (list(eager_view[0]), list(eager_view[1]))
    out = []
    for m in merges:
        why = _export_only_reason(m, same, stay, export_only, drift)
        if why is not None:
            out.append(EagerMerge(note=f"merged in the export only: {why}"))
            continue
        paths = []
        for branch in m.branches:
            path = _branch_module(branch, owned, by_name, capture)
            if path is None or path not in modules:
                paths = [
                    "the identity branch is the block's input itself, added in forward code"
                    if branch.kind == "identity"
                    else f"the {branch.label()} branch is not a module of its own (it is in forward code)"
                ]
                break
            if modules[path]._forward_hooks or modules[path]._forward_pre_hooks:
                paths = [f"{path} has forward hooks that would be lost"]
                break
            if drift is not None and path in drift.modules:
                paths = [f"{path} differs in the eager module: {drift.modules[path]}"]
                break
            paths.append(path)
        if len(paths) != len(m.branches):
            out.append(EagerMerge(note=f"merged in the export only: {paths[0]}"))
            continue
        target = paths[m.branches.index(m.target)]
        values = same[same.index(m)].values  # condition 2: computed from the module's own values
        out.append(EagerMerge(target, tuple(p for p in paths if p != target), values=values))
    return out


def _export_only_reason(
    m: Merge,
    same: Sequence[Merge],
    stay: Sequence[Unmerged],
    export_only: Sequence[Fold],
    drift: Drift | None,
) -> str | None:
    """Why the module cannot take ``m`` whatever its modules (None: it can)."""
    if m.weighted:
        return _WEIGHTED
    for b in m.branches:
        if drift is not None and b.weight in drift.weights:
            return f"{b.weight} differs in the eager module: {drift.weights[b.weight]}"
    if m in same:
        return None
    for u in stay:  # the module's own values do not fit where the program's do
        if u.adds[0] == m.adds[0] and u.code == "overflow":
            return f"in the eager module, {u.reason}"
    # the block differs in the eager module: name the export-only folds on its branches
    layers = {b.layer for b in m.branches if b.layer is not None}
    nodes = {n for b in m.branches for n in b.nodes} | set(m.adds)
    names = [
        f.unit.name for f in export_only if nodes & set(f.unit.nodes) or layers & {u.layer for u in f.updates}
    ]
    keeps = ", ".join(dict.fromkeys(names)) or "ops"
    return (
        f"the eager module keeps {keeps} (folded in the export only) on the block's branches, "
        "so its block is not the program's"
    )


def _branch_module(
    branch: Branch, owned: Mapping[str, set[str]], by_name: dict[str, fx.Node], capture: Capture
) -> str | None:
    """The outermost module that runs the branch's ops and nothing else, or None."""
    if not branch.nodes:
        return None
    ops = set(branch.nodes)
    for _, path in module_calls(by_name[branch.nodes[0]]):
        path = capture.canonical(path)
        if path and owned.get(path, set()) <= ops:
            return path
    return None


def apply_merges(model: nn.Module, merges: Sequence[Merge], eager: Sequence[EagerMerge]) -> None:
    """Swap the merged blocks' branch modules in ``model``: the target becomes one conv with the
    merged values (``EagerMerge.values``: computed from the module's own values, condition 2),
    the other branches :class:`MergedBranch`, under every name they have."""
    swaps: dict[int, nn.Module] = {}
    for m, e in zip(merges, eager, strict=True):
        if e.target is None:
            continue
        old = model.get_parameter(m.target.weight or "")
        swaps[id(model.get_submodule(e.target))] = _conv_module(m, e.values, old.requires_grad)
        t = m.target
        dilation = t.dilation or (1,) * len(t.kernel)  # a conv target always has one
        for path in e.zero:
            out_channels = e.values[t.weight or ""].shape[0]
            swaps[id(model.get_submodule(path))] = MergedBranch(
                out_channels, t.kernel, t.stride, t.padding, dilation
            )
    if swaps:
        for parent in model.modules():
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in swaps:
                    parent._modules[name] = swaps[id(child)]


def _conv_module(m: Merge, values: Mapping[str, torch.Tensor], requires_grad: bool) -> nn.Module:
    """A ConvNd with the target's geometry and the merged values."""
    weight, bias = values[m.target.weight or ""], values[m.bias]
    nd = weight.dim() - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    t = m.target
    conv = cls(
        weight.shape[1] * (t.groups or 1), weight.shape[0], t.kernel, stride=t.stride, padding=t.padding,
        dilation=t.dilation or 1, groups=t.groups or 1, bias=True, device="meta",
    )  # fmt: skip
    conv.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)  # the program may share it
    conv.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)
    return conv
