"""Apply a :class:`~normfold.engine.plan.Plan` to the user's module (and,
:mod:`normfold.engine.apply_program`, to the exported program, where every fold applies, including
norms written in a ``forward`` as functional calls).

**Eager module** (the user's class and module names are kept): a fold applies only when every op it
removes can also be removed from the module without touching the user's code:

* a norm module all of whose ops fold (every call, every op it owns, every op its submodules
  run, whoever calls them) becomes ``nn.Identity`` under every name it is registered;
* a norm module that also runs other ops (a ``_BatchNorm`` subclass with its own activation,
  timm's ``BatchNormAct2d``) is rebuilt (:mod:`normfold.engine.rebuild`): a
  :class:`~normfold.engine.rebuild.Remainder` takes its place that runs only the ops the fold left
  (``act(drop(x))``), with the module's own children and parameters under their names, so the
  eager module runs no norm op the program does not;
* where its remaining ops are not a form :mod:`normfold.engine.rebuild` can run (two tensor inputs, say),
  a ``_BatchNorm``'s norm part becomes exactly the identity instead (``mean 0, var 1, weight 1,
  bias 0, eps 0``: ``(x - 0) / sqrt(1 + 0) * 1 + 0 == x`` in every float format), provided its
  batch_norm op reads its own parameters and ``eps`` (:attr:`EagerPlan.not_rebuilt` says why);
* a layer that needs a bias it does not have gets one only where it is a standard Conv/Linear
  module with ``bias=None`` (a bare ``x @ W`` in a ``forward`` has nowhere to take one: such a
  fold is export only, where the matmul becomes ``x @ W + b``).

Other folds (``F.batch_norm`` or arithmetic in the user's own ``forward``, a fold through such an
op) are applied to the export only; the eager module keeps both the norm and the layer's old
values, so it computes exactly what it did. :func:`eager_plan` decides; it is pure, so ``inspect``
can report it.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.check.workers import run_all
from normfold.engine.apply_program import _BARE_MATMULS, apply_program
from normfold.engine.capture import Capture, Constants, bind, ops_by_module, shape
from normfold.engine.plan import Fold, Plan, RowBlocks
from normfold.engine.probe import isolated_rng, probe_input
from normfold.engine.rebuild import Recipe, Remainder
from normfold.engine.recipes import CallIndex, recipe
from normfold.engine.records import materialize

__all__ = ["LAYER_MODULES", "EagerPlan", "apply_module", "apply_program", "eager_plan", "write_in_place"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)  # fmt: skip


@dataclass
class EagerPlan:
    """What changes in the eager module: folds applied there and the norm modules they remove."""

    folds: list[Fold] = field(default_factory=list)
    identity: set[str] = field(default_factory=set)  # module paths replaced by nn.Identity
    neutral: set[str] = field(default_factory=set)  # BatchNorm modules set to the identity map
    #: module path -> the ops its call keeps once its norm is folded (:mod:`normfold.engine.rebuild`)
    rebuilt: dict[str, Recipe] = field(default_factory=dict)
    not_rebuilt: dict[str, str] = field(default_factory=dict)  # neutral module path -> why
    export_only: dict[str, str] = field(default_factory=dict)  # unit's first node -> why
    #: module path -> the ops it runs (:func:`normfold.engine.capture.ops_by_module`), for the merges
    owned: dict[str, set[str]] = field(default_factory=dict)


def eager_plan(plan: Plan, capture: Capture, model: nn.Module) -> EagerPlan:
    """Decide which folds can also be applied to ``model`` itself (see the module docstring)."""
    return _Eager(plan, capture, model).run()


class _Eager:
    def __init__(self, plan: Plan, capture: Capture, model: nn.Module) -> None:
        self.plan, self.capture = plan, capture
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.by_name = {n.name: n for n in capture.graph.nodes}
        self.consts = consts = Constants(capture)
        self.owned = ops_by_module(capture, consts)  # module path -> the ops it runs
        # module path -> placeholders of its own parameters and buffers
        self.state: dict[str, list[fx.Node]] = {}
        for node in capture.graph.nodes:
            fqn = capture.state_of(node)
            if fqn is not None:
                self.state.setdefault(capture.canonical(fqn.rpartition(".")[0]), []).append(node)
        # BatchNorm stats FQN -> every batch_norm op reading it (folded or not)
        self.stat_users: dict[str, set[str]] = {}
        self.calls: CallIndex | None = None  # built on the first module that needs a rebuild
        self.recipes: dict[str, Recipe | str] = {}  # module path -> its rebuild (the last asked)
        self.becomes: dict[str, fx.Node | None] = {}  # built with ``calls``
        for unit in [f.unit for f in plan.folds] + [k.unit for k in plan.kept]:
            key = unit.stats.get("running_mean")
            if key:
                self.stat_users.setdefault(key, set()).update(unit.nodes)

    def run(self) -> EagerPlan:
        eager = list(self.plan.folds)
        notes: dict[str, str] = {}
        changed = True
        while changed:  # dropping a fold can make another one impossible: iterate to a fixed point
            changed = False
            removed = {n for f in eager for n in f.unit.nodes}
            for fold in list(eager):
                why = self._why_not(fold, removed)
                if why is not None:
                    eager.remove(fold)
                    notes[fold.unit.nodes[0]] = why
                    changed = True
        removed = {n for f in eager for n in f.unit.nodes}
        result = EagerPlan(folds=eager, export_only=notes, owned=self.owned)
        for fold in eager:
            path, how = self._removal(fold, removed)
            if how == "identity":
                result.identity.add(path)
            elif how == "rebuild":
                result.rebuilt[path] = self.recipes[path]
            else:
                result.neutral.add(path)
                result.not_rebuilt[path] = str(self.recipes.get(path))
        return result

    def _why_not(self, fold: Fold, removed: set[str]) -> str | None:
        for node in fold.after:
            if node not in removed:
                return f"it passes through {node}, which stays in the eager model"
        path, how = self._removal(fold, removed)
        if path is None:
            return how
        for u in fold.updates:
            layer = self.modules.get(u.module)
            if layer is not None and (layer._forward_hooks or layer._forward_pre_hooks):
                return f"{u.module} has forward hooks that would see its changed output"
            if u.side == "replace":  # a new weight, no shift: nothing to add a bias for
                continue
            if u.bias is None and self.by_name[u.layer].target in _BARE_MATMULS:
                where = u.module or "forward"
                return f"the matmul x @ {u.weight} in {where} has no bias to receive the norm's shift"
            if u.bias is None and not self._can_add_bias(layer, u.module, u.weight, u.layer):
                return f"{u.module or 'forward'} has no bias parameter to receive the norm's shift"
        return None

    def _can_add_bias(self, layer: nn.Module | None, path: str, weight_fqn: str, node_name: str) -> bool:
        """A Conv/Linear module with ``bias=None`` whose forward adds ``self.bias`` once set."""
        if not (
            isinstance(layer, LAYER_MODULES)
            and weight_fqn == (f"{path}.weight" if path else "weight")
            and layer._parameters.get("bias", 0) is None
        ):
            return False
        base = next(t for t in LAYER_MODULES if isinstance(layer, t))
        if type(layer).forward is base.forward:
            return True
        # a subclass with its own forward (timm's Conv2dSame, say): probe that it uses self.bias
        device = layer.weight.device
        x = probe_input(shape(bind(self.by_name[node_name])["input"]), layer.weight.dtype, device)
        probe = copy.deepcopy(layer)
        try:
            with torch.no_grad(), isolated_rng(device):  # the user's seeded RNG stays as it was
                before = probe(x)
                out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
                probe.bias = nn.Parameter(
                    torch.ones(out, dtype=layer.weight.dtype, device=layer.weight.device)
                )
                after = probe(x)
        except Exception:  # a forward that cannot take the probe is not trusted with a bias
            return False
        return bool(torch.allclose(after - before, torch.ones_like(after), atol=1e-3))

    def _removal(self, fold: Fold, removed: set[str]) -> tuple[str | None, str]:
        """``(module path, "identity" | "neutral")`` that removes the fold's norm, or
        ``(None, why not)``."""
        unit = fold.unit
        path = unit.module
        if fold.pattern == "weight_std":
            return self._stored_weight(path, removed)
        if unit.kind == "batch_norm":
            stats = unit.stats.get("running_mean") or ""
            path = stats.rpartition(".")[0] if "." in stats else ""
            if not stats or (path != unit.module and not unit.module.startswith(path + ".")):
                return None, "the norm is a functional call in forward code, not a norm module"
            if not self.stat_users.get(stats, set()) <= removed:
                return None, f"{path} is also called where it stays"
        module = self.modules.get(path) if path else None
        if module is None:
            return None, "the norm is written in forward code, not a module that can be removed"
        outside = [n for n in unit.nodes if n not in self.owned.get(path, set())]
        if outside:  # removing the module would leave these ops in its caller, computed twice
            return None, f"{unit.name} also runs {', '.join(outside)} outside {path}, which stay"
        hooked = next((m for m in module.modules() if m._forward_hooks or m._forward_pre_hooks), None)
        if hooked is not None:  # its own or a submodule's: nn.Identity in its place runs neither
            return None, f"{path} has forward hooks that would be lost"
        reader = self._outside_reader(path, removed)
        if reader is None and self._ops_within(path) <= removed:
            return path, "identity"
        # a BatchNorm's module, or a module whose own code runs nothing but the folded arithmetic
        # (a hand-written frozen norm with an activation child): a block whose forward code holds
        # other ops besides a folded affine op stays whole (it may branch on shapes a recipe fixes)
        if self._rebuildable(path, module, removed) and (
            unit.kind == "batch_norm" or self._children_only(path)
        ):
            return path, "rebuild"
        if reader is not None:
            return None, f"{reader} reads {path}'s state outside the norm"
        if unit.kind == "batch_norm" and self._neutralizable(module, path, unit.nodes[0]):
            return path, "neutral"
        return None, f"{path} ({type(module).__name__}) runs other ops that must stay"

    def _stored_weight(self, path: str, removed: set[str]) -> tuple[str | None, str]:
        """A layer whose ``forward`` computes its weight from parameters (weight standardization):
        rebuilt to run its remaining ops on the stored weight, ``conv(x, self.weight, ...)``."""
        module = self.modules.get(path) if path else None
        if module is None:
            return None, "the weight is computed in forward code, not by a module that can be rebuilt"
        if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
            return None, f"{path} has forward hooks that would be lost"
        if self._rebuildable(path, module, removed):
            return path, "rebuild"
        return None, f"{path} ({type(module).__name__}) cannot be rebuilt: {self.recipes[path]}"

    def _rebuildable(self, path: str, module: nn.Module, removed: set[str]) -> bool:
        """The module's calls, once ``removed`` are gone, are a chain :class:`Remainder` runs,
        and nothing outside its calls reads its state (the remainder drops the norm's)."""
        if self.calls is None:
            self.calls = CallIndex(self.capture)
            for fold in self.plan.folds:  # every folded op -> the node its output becomes (None: dead)
                self.becomes.update(dict.fromkeys(fold.unit.nodes))
                self.becomes[fold.unit.nodes[-1]] = self.by_name[fold.unit.input]
        becomes = {n: self.becomes[n] for n in removed}
        got = recipe(self.calls, path, module, becomes, self.consts.is_const)
        self.recipes[path] = got
        if isinstance(got, str):
            return False
        mine = {n.name for key in self.calls.calls.get(path, []) for n in self.calls.nodes[key]}
        return self._outside_reader(path, removed | mine) is None

    def _children_only(self, path: str) -> bool:
        """The rebuilt module's steps only call its children: its own code ran only folded ops."""
        got = self.recipes.get(path)
        return isinstance(got, Recipe) and all(s.module is not None for s in got.steps)

    def _within(self, table: dict[str, T], path: str) -> list[T]:
        """The entries of ``path`` and of every submodule under it: an ``nn.Identity`` in its place
        takes them all away, whoever calls or reads them."""
        return [v for k, v in table.items() if k == path or k.startswith(path + ".")]

    def _ops_within(self, path: str) -> set[str]:
        """Every op ``path`` or one of its submodules runs (a submodule called from elsewhere too)."""
        return set().union(*self._within(self.owned, path))

    def _outside_reader(self, path: str, removed: set[str]) -> str | None:
        """An op that still reads a parameter or buffer of ``path`` (or of a submodule of it)
        once ``removed`` are gone."""
        for nodes in self._within(self.state, path):
            for node in nodes:
                for user in node.users:
                    if not self._dead(user, removed):
                        return user.name
        return None

    def _dead(self, node: fx.Node, removed: set[str]) -> bool:
        """Removed, or a constant feeding only removed ops (a view of a folded norm's buffer)."""
        if node.name in removed:
            return True
        return self.consts.is_const.get(node, False) and all(self._dead(u, removed) for u in node.users)

    def _neutralizable(self, module: nn.Module, path: str, node_name: str) -> bool:
        if not isinstance(module, _BatchNorm) or module.running_mean is None:
            return False
        args = bind(self.by_name[node_name])
        own = {r: f"{path}.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
        for role, fqn in own.items():
            arg = args[role]
            got = self.capture.state_of(arg) if arg is not None else None
            if got is not None:
                prefix, _, attr = got.rpartition(".")
                got = f"{self.capture.canonical(prefix)}.{attr}"
            if got != (fqn if getattr(module, role) is not None else None):
                return False
        return float(args["eps"]) == float(module.eps)


# --- eager module -----------------------------------------------------------------------------------


def apply_module(model: nn.Module, eager: EagerPlan, values: dict[str, torch.Tensor]) -> None:
    """Write ``values`` (FQN -> tensor) and remove the norms of ``eager`` from ``model``. A
    tensor registered under several names (tied) gets the value under every one: the export
    names it once, by any of them, and the module it calls may be registered under another."""
    names: dict[int, list[str]] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in [*params.items(), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    for fqn, value in values.items():
        prefix, _, attr = fqn.rpartition(".")
        held = getattr(model.get_submodule(prefix), attr, None)
        first, *others = names.get(id(held), [fqn]) if held is not None else [fqn]
        _set_tensor(model, first, value)
        new = model.get_parameter(first) if first in params else None
        for name in others:  # the same new object under every name: the tie stays a tie
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if new is not None and leaf in module._parameters:
                module._parameters[leaf] = new
            else:
                _set_tensor(model, name, value)
    for path in eager.neutral:
        bn = model.get_submodule(path)
        # new tensors, never in-place: the caller's model may share them (inplace=False copies)
        bn.running_mean = torch.zeros_like(bn.running_mean)
        bn.running_var = torch.ones_like(bn.running_var)
        if bn.weight is not None:
            bn.weight = nn.Parameter(torch.ones_like(bn.weight), requires_grad=bn.weight.requires_grad)
            bn.bias = nn.Parameter(torch.zeros_like(bn.bias), requires_grad=bn.bias.requires_grad)
        bn.eps = 0.0
    swaps: dict[int, nn.Module] = {id(model.get_submodule(p)): nn.Identity() for p in eager.identity}
    for path, steps in eager.rebuilt.items():
        module = model.get_submodule(path)
        swaps[id(module)] = Remainder(module, steps)
    if swaps:
        for parent in model.modules():  # one walk: every name a module is registered under
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in swaps:
                    parent._modules[name] = swaps[id(child)]


def write_in_place(
    model: nn.Module, values: Iterable[tuple[str, torch.Tensor | RowBlocks]]
) -> dict[str, torch.Tensor]:
    """Copy each new value into the tensor ``model`` already holds under its FQN (same shape,
    dtype and device, and no other name of ``model`` shares its storage), so a fold allocates
    no second copy of the weights; the rest (new biases, tied tensors) stay new tensors. Returns
    FQN -> the tensor now holding the value, for :func:`apply_module` and the program."""
    shared = _shared_storage(model)
    out: dict[str, torch.Tensor] = {}
    writes: list[Callable[[], None]] = []  # side by side, one weight each (records.materialize)
    lazy: dict[str, RowBlocks] = {}
    for fqn, value in values:
        prefix, _, name = fqn.rpartition(".")
        current = getattr(model.get_submodule(prefix), name, None)
        like = value.weight if isinstance(value, RowBlocks) else value
        fits = isinstance(current, torch.Tensor) and (current.shape, current.dtype, current.device) == (
            like.shape,
            like.dtype,
            like.device,
        )
        if fits and current.untyped_storage().data_ptr() not in shared:
            if isinstance(value, RowBlocks):
                writes.append(functools.partial(value.write_into, current))  # a block of rows at a time
            else:
                with torch.no_grad():
                    current.copy_(value)
            out[fqn] = current.detach()
        elif isinstance(value, RowBlocks):
            lazy[fqn] = value
        else:
            out[fqn] = value
    run_all(writes)
    return {**out, **materialize(lazy)}


def _shared_storage(model: nn.Module) -> set[int]:
    """Storages that more than one tensor of ``model`` uses (views of one buffer). One tensor
    under several names (tied) is not in it: :func:`apply_module` gives every name the value."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _set_tensor(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    prefix, _, name = fqn.rpartition(".")
    module = model.get_submodule(prefix)
    held = module._parameters.get(name, module._buffers.get(name))
    if held is not None and held.data_ptr() == value.data_ptr():
        return  # written in place (write_in_place): the module holds it already
    if name in module._buffers:
        module._buffers[name] = value
        return
    old = module._parameters.get(name)
    requires_grad = (
        old.requires_grad if old is not None else module._parameters.get("weight", value).requires_grad
    )
    # a new Parameter object: a tied parameter elsewhere keeps its original values
    module._parameters[name] = nn.Parameter(value.detach(), requires_grad=requires_grad)
