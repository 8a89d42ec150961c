"""Reparameterization in the user's module: which merged blocks change there too, and how.

A merge (:mod:`normfold.engine.reparam`) is planned on the exported program, where every fold of the
plan has happened. The eager module takes only the folds it can (``EagerPlan.folds``, "both"): an
op folded in the export only (forward code such as ``x + 100.0`` or ``F.batch_norm``) still runs
in its ``forward``, and the layers it was folded into keep their own values there. So a block
merges in the module only when

1. seen with the eager folds only (:func:`normfold.engine.reparam.plan_merges` with ``folds``), it is the
   same block: the same sum of the same branches (an export-only op inside a branch, or between
   a branch and the block's input, makes it another block or none);
2. its merged kernel is computed from the module's own values (the eager folds' values, the
   capture's for the rest), never from the program's, which include the export-only folds. The
   module then computes ``forward``'s ops around the block on a conv equal to the sum of the
   branches it has, exactly as before;
3. every branch is a module of its own (running that branch's ops and nothing else, no hooks):
   the branch with the largest kernel becomes one conv, the others :class:`MergedBranch` (zeros).
   A block whose own ``forward`` subtracts or scales branches (FastViT's ``x + gamma * (mixer(x)
   - norm(x))``) needs only its largest-kernel branch to be a module: the block's module is
   rebuilt (:class:`~normfold.engine.rebuild.Remainder`) to call that conv, now merged, and whatever
   its ``forward`` does after the sum; the branches and scale modules nothing calls any more
   become ``nn.Identity``.

A later round of planning (:mod:`normfold.engine.replan`) plans on the program, which differs from the
module wherever the export alone changed: a block with a branch there (:class:`~normfold.engine.replan.Drift`)
merges in the export only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import fx, nn

from normfold.engine.capture import Capture, Constants, module_calls
from normfold.engine.rebuild import Recipe, Remainder
from normfold.engine.recipes import CallIndex, recipe

if TYPE_CHECKING:
    from normfold.engine.branches import Branch, Merge, Unmerged
    from normfold.engine.plan import Fold

_WEIGHTED = "the block subtracts or scales branches in forward code"


class Differences(Protocol):
    """Where the eager module and the program already differ (:class:`~normfold.engine.replan.Drift`)."""

    weights: Mapping[str, str]  # layer weight FQN -> why it differs
    modules: Mapping[str, str]  # module path -> the op the program lost


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
    #: a block that subtracts or scales branches in its own forward: the module rebuilt to run the
    #: merged conv (and what its forward does after the sum), and the modules nothing runs any more
    block: str | None = None
    recipe: Recipe | None = None
    drop: tuple[str, ...] = ()


def eager_merges(
    capture: Capture,
    merges: Sequence[Merge],
    model: nn.Module,
    owned: Mapping[str, set[str]],
    *,
    eager_view: tuple[Sequence[Merge], Sequence[Unmerged]] | None = None,
    export_only: Sequence[Fold] = (),
    drift: Differences | None = None,
) -> list[EagerMerge]:
    """For each merge: the modules to swap in ``model`` (conditions 1 and 3 of the module
    docstring), or why it applies to the export only. ``owned``: module path -> the ops it runs
    (:func:`normfold.engine.capture.ops_by_module`); ``eager_view``: the merges and the blocks that stay,
    planned with the eager folds only (None: ``merges``, no fold is export-only); ``export_only``: the
    plan's folds the module does not take; ``drift``: where the module and the program differ
    (a later round's merges)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_name = {n.name: n for n in capture.graph.nodes}
    same, stay = (list(merges), []) if eager_view is None else (list(eager_view[0]), list(eager_view[1]))
    out = []
    weighted = _Weighted(capture, owned, modules, by_name, drift)
    for m in merges:
        why = _export_only_reason(m, same, stay, export_only, drift)
        if why is None and m.weighted:
            got = weighted.rebuild(m, same[same.index(m)].values)
            out.append(
                got if isinstance(got, EagerMerge) else EagerMerge(note=f"merged in the export only: {got}")
            )
            continue
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


class _Weighted:
    """Blocks that subtract or scale branches in their own ``forward`` (FastViT's RepMixer:
    ``x + gamma * (mixer(x) - norm(x))``): no module swap makes that ``forward`` compute the merged
    conv alone, so the block's module is rebuilt (:class:`~normfold.engine.rebuild.Remainder`) to run what
    its call runs in the merged program: the merged conv's module (and what follows the sum)."""

    def __init__(
        self,
        capture: Capture,
        owned: Mapping[str, set[str]],
        modules: Mapping[str, nn.Module],
        by_name: Mapping[str, fx.Node],
        drift: Differences | None,
    ) -> None:
        self.capture, self.owned, self.modules, self.by_name, self.drift = (
            capture,
            owned,
            modules,
            by_name,
            drift,
        )
        self._index: CallIndex | None = None
        self._consts: Constants | None = None

    def rebuild(self, m: Merge, values: dict[str, torch.Tensor]) -> EagerMerge | str:
        """The merge as the module takes it, or why it cannot (the reason of its note)."""
        why = _WEIGHTED
        block = self.modules.get(m.module) if m.module else None
        if block is None:
            return f"{why}, in the model's own forward"
        if block._forward_hooks or block._forward_pre_hooks:
            return f"{why}, and {m.module} has forward hooks that would be lost"
        target = _branch_module(m.target, self.owned, self.by_name, self.capture)
        if target is None or target not in self.modules:
            return f"{why}, and the {m.target.label()} branch is not a module of its own"
        if self.modules[target]._forward_hooks or self.modules[target]._forward_pre_hooks:
            return f"{why}, and {target} has forward hooks that would be lost"
        if self.drift is not None and target in self.drift.modules:
            return f"{target} differs in the eager module: {self.drift.modules[target]}"
        if self._index is None:
            self._index, self._consts = CallIndex(self.capture), Constants(self.capture)
        index, is_const = self._index, self._consts.is_const  # type: ignore[union-attr]
        gone = self._gone(m, index)
        last = self._target_output(m, index)
        if last is None:
            return f"{why}, and {target} runs more than the {m.target.label()} branch"
        removed: dict[str, fx.Node | None] = dict.fromkeys(gone)
        removed[m.adds[0]] = last  # the sum's value is the merged conv's
        got = recipe(index, m.module, block, removed, is_const, merged=gone)
        if isinstance(got, str):
            return f"{why}, and its module cannot be rebuilt: {got}"
        reached = [f"{m.module}.{s.module}" for s in got.steps if s.module is not None]
        mine = {n.name for key in index.calls.get(m.module, []) for n in index.nodes[key]}
        drop = []
        paths = [_branch_module(b, self.owned, self.by_name, self.capture) for b in m.branches]
        paths += [u.module for u in m.scales if u.module != m.module]  # a layer scale module's
        for path in paths:
            if path is None or path == target or path not in self.modules:
                continue
            near = any(path == r or path.startswith(r + ".") or r.startswith(path + ".") for r in reached)
            if not near and self.owned.get(path, set()) <= mine:  # runs nothing outside the block
                drop.append(path)
        return EagerMerge(target, (), values=values, block=m.module, recipe=got, drop=tuple(drop))

    def _gone(self, m: Merge, index: CallIndex) -> set[str]:
        """The ops the merge takes away from the block's call: the sum, the branches, the scales,
        and the ops only those read (the program's dead code)."""
        gone = {*m.adds, *(n for b in m.branches for n in b.nodes), *(n for u in m.scales for n in u.nodes)}
        gone -= set(m.target.nodes)
        for key in index.calls.get(m.module, []):
            for node in reversed(index.nodes[key]):
                users = node.users
                if node.name not in m.target.nodes and users and all(u.name in gone for u in users):
                    gone.add(node.name)
        return gone

    def _target_output(self, m: Merge, index: CallIndex) -> fx.Node | None:
        """The output of the outermost module call in the block that runs the target branch's
        ops and nothing else: the merged conv's module, whose value the sum becomes."""
        layer = self.by_name[m.target.layer or ""]
        stack = [k for k, _ in module_calls(layer)]
        keys = set(index.calls.get(m.module, []))
        start = next((i for i, k in enumerate(stack) if k in keys), None)
        if start is None:
            return None
        mine = set(m.target.nodes)
        for sub in stack[start + 1 :]:
            ops = [n for n in index.nodes[sub] if not self._consts.is_const.get(n, False)]  # type: ignore[union-attr]
            if {n.name for n in ops} <= mine:
                inside = set(index.nodes[sub])
                outs = [n for n in ops if any(u not in inside for u in n.users)]
                return outs[0] if len(outs) == 1 else None
        return None


def _export_only_reason(
    m: Merge,
    same: Sequence[Merge],
    stay: Sequence[Unmerged],
    export_only: Sequence[Fold],
    drift: Differences | None,
) -> str | None:
    """Why the module cannot take ``m`` whatever its modules (None: it can)."""
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
        for path in e.drop:  # a weighted block's other branches: its rebuilt module never calls them
            swaps[id(model.get_submodule(path))] = nn.Identity()
        old = model.get_parameter(m.target.weight or "")
        swaps[id(model.get_submodule(e.target))] = _conv_module(m, e.values, old.requires_grad)
        t = m.target
        dilation = t.dilation or (1,) * len(t.kernel)  # a conv target always has one
        for path in e.zero:
            out_channels = e.values[t.weight or ""].shape[0]
            swaps[id(model.get_submodule(path))] = MergedBranch(
                out_channels, t.kernel, t.stride, t.padding, dilation
            )
    _swap(model, swaps)
    # then the weighted blocks, rebuilt around their children as swapped above
    blocks = {id(model.get_submodule(e.block)): (e.block, e.recipe) for e in eager if e.block and e.recipe}
    _swap(model, {k: Remainder(model.get_submodule(path), r) for k, (path, r) in blocks.items()})


def _swap(model: nn.Module, swaps: Mapping[int, nn.Module]) -> None:
    """Put ``swaps[id(old)]`` in place of ``old`` under every name it is registered."""
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
