"""Apply a :class:`~normfold.plan.Plan` to the user's module and to the exported program.

**Exported program**: every folded norm op is bypassed and erased, the constants only it used go
with it (dead code), layers get their new parameter values by name, a layer without bias gets a new
parameter placeholder, and parameters nothing reads any more leave the graph signature. Every
fold applies here, including norms written in a ``forward`` as functional calls.

**Eager module** (the user's class and module names are kept): a fold applies only when every op it
removes can also be removed from the module without touching the user's code:

* a norm module all of whose ops fold (every call, every op it owns, every op its submodules
  run, whoever calls them) becomes ``nn.Identity`` under every name it is registered;
* a ``_BatchNorm`` subclass that also runs other ops (its activation, say) keeps them: its norm part
  becomes exactly the identity (``mean 0, var 1, weight 1, bias 0, eps 0``: ``(x - 0) / sqrt(1 + 0)
  * 1 + 0 == x`` in every float format), provided its batch_norm op reads its own parameters and
  ``eps``;
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
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputSpec,
    TensorArgument,
)
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.graph import (
    Capture,
    Constants,
    bind,
    ops_by_module,
    quiet_exporter,
    set_arg,
    shape,
)
from normfold.plan import Fold, Plan, RowBlocks, input_arg, new_bias_name
from normfold.probe import isolated_rng, probe_input
from normfold.reparam import Merge

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
    export_only: dict[str, str] = field(default_factory=dict)  # unit's first node -> why
    #: module path -> the ops it runs (:func:`normfold.graph.ops_by_module`), for the merges
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
            (result.identity if how == "identity" else result.neutral).add(path)
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
        if reader is not None:
            return None, f"{reader} reads {path}'s state outside the norm"
        if self._ops_within(path) <= removed:
            return path, "identity"
        if unit.kind == "batch_norm" and self._neutralizable(module, path, unit.nodes[0]):
            return path, "neutral"
        return None, f"{path} ({type(module).__name__}) runs other ops that must stay"

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
    targets = {id(model.get_submodule(p)) for p in eager.identity}
    if targets:
        for parent in model.modules():  # one walk: every name a module is registered under
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in targets:
                    parent._modules[name] = nn.Identity()


def write_in_place(
    model: nn.Module, values: Iterable[tuple[str, torch.Tensor | RowBlocks]]
) -> dict[str, torch.Tensor]:
    """Copy each new value into the tensor ``model`` already holds under its FQN (same shape,
    dtype and device, and no other name of ``model`` shares its storage), so a fold allocates
    no second copy of the weights; the rest (new biases, tied tensors) stay new tensors. Returns
    FQN -> the tensor now holding the value, for :func:`apply_module` and the program."""
    shared = _shared_storage(model)
    out: dict[str, torch.Tensor] = {}
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
                value.write_into(current)  # a block of rows at a time, straight into place
            else:
                with torch.no_grad():
                    current.copy_(value)
            out[fqn] = current.detach()
        else:
            out[fqn] = value.tensor() if isinstance(value, RowBlocks) else value
    return out


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


# --- exported program -------------------------------------------------------------------------------


def apply_program(
    capture: Capture, plan: Plan, values: dict[str, torch.Tensor], merges: Sequence[Merge] = ()
) -> ExportedProgram:
    """The captured program with every fold of ``plan`` and every block of ``merges`` applied
    (the capture's graph is reused): a merged block's sum is replaced by its target conv, and
    the other branches, now unused, go as dead code."""
    program = capture.program
    gm = program.graph_module
    graph = gm.graph
    consts = Constants(capture)
    by_name = {n.name: n for n in graph.nodes}
    roles = {name: input_arg(by_name[name], consts) for f in plan.folds for name in f.unit.nodes}
    for fold in plan.folds:
        nodes = [by_name[n] for n in fold.unit.nodes]
        x = bind(nodes[0])[roles[nodes[0].name]]
        nodes[-1].replace_all_uses_with(x)
        for node in reversed(nodes):
            graph.erase_node(node)
    for merge in merges:
        by_name[merge.adds[0]].replace_all_uses_with(by_name[merge.target.layer or ""])
        for name in merge.adds:  # the root first, then the sums only it used (``+=`` is no dead code)
            graph.erase_node(by_name[name])
    specs = list(program.graph_signature.input_specs)
    state = dict(program.state_dict)
    slot: tuple[int, fx.Node] | None = None  # new biases go after the last parameter, in order
    biasless = [(u.layer, u.weight) for f in plan.folds for u in f.updates if u.bias is None]
    biasless += [(m.target.layer or "", m.target.weight or "") for m in merges if m.new_bias]
    for layer, weight in biasless:
        if new_bias_name(capture, weight) not in state:
            if slot is None:  # a folded layer's weight is a parameter: there is a last one
                last = max(i for i, s in enumerate(specs) if s.kind == InputKind.PARAMETER)
                slot = (last, by_name[specs[last].arg.name])
            slot = _add_bias(graph, specs, state, by_name[layer], capture, weight, values, slot)
    for fqn, value in values.items():
        old = state.get(fqn)
        state[fqn] = (
            nn.Parameter(value.detach(), requires_grad=False) if isinstance(old, nn.Parameter) else value
        )
    graph.eliminate_dead_code()
    constants = dict(program.constants)
    specs = _prune(graph, specs, state, constants, program.graph_signature)
    gm.recompile()
    signature = ExportGraphSignature(input_specs=specs, output_specs=_outputs(graph, program.graph_signature))
    with quiet_exporter():  # torch warns about its own pytree internals while copying the program
        return program._update(gm, signature, state_dict=state, constants=constants)


def _add_bias(
    graph: fx.Graph,
    specs: list[InputSpec],
    state: dict[str, torch.Tensor],
    layer: fx.Node,
    capture: Capture,
    weight_fqn: str,
    values: dict[str, torch.Tensor],
    slot: tuple[int, fx.Node],
) -> tuple[int, fx.Node]:
    """Add the new bias as a parameter input after ``slot`` (spec index, placeholder); return
    the slot after it, so a thousand new biases cost no thousand scans of the graph."""
    fqn = new_bias_name(capture, weight_fqn)
    last_param, anchor = slot
    with graph.inserting_after(anchor):
        node = graph.placeholder("p_" + re.sub(r"\W", "_", fqn))  # a Python identifier ("block1-0" too)
    fake = layer.meta["val"]  # the layer output's fake tensor: its fake mode makes the bias's
    node.meta["val"] = fake.fake_mode.from_tensor(values[fqn], static_shapes=True)
    specs.insert(last_param + 1, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), fqn))
    state[fqn] = nn.Parameter(values[fqn].detach(), requires_grad=False)
    if layer.target in _BARE_MATMULS:  # ``x @ W`` has no bias argument: it becomes ``x @ W + b``
        with graph.inserting_after(layer):
            add = graph.call_function(torch.ops.aten.add.Tensor, (layer, node))
        add.meta = dict(layer.meta)  # the same value (b broadcasts along the last axis), same module
        layer.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
    else:
        set_arg(layer, "bias", node)
    return last_param + 1, node


_BARE_MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.mm.default)


def _outputs(graph: fx.Graph, signature: ExportGraphSignature) -> list[OutputSpec]:
    """Output specs renamed after the nodes the output now returns (a folded norm may have been one)."""
    returned = graph.output_node().args[0]
    specs = []
    for spec, node in zip(signature.output_specs, returned, strict=True):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node):
            spec = OutputSpec(spec.kind, TensorArgument(node.name), spec.target)
        specs.append(spec)
    return specs


def _prune(
    graph: fx.Graph,
    specs: list[InputSpec],
    state: dict[str, torch.Tensor],
    constants: dict[str, object],
    signature: ExportGraphSignature,
) -> list[InputSpec]:
    """Drop parameter/buffer/constant inputs nothing reads any more (a folded norm's)."""
    mutated = {s.target for s in signature.output_specs if s.target is not None}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    kept = []
    for spec in specs:
        node = placeholders.get(spec.arg.name)
        if (
            spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
            and node is not None
            and not node.users
            and spec.target not in mutated
        ):
            graph.erase_node(node)
            state.pop(spec.target, None)
            constants.pop(spec.target, None)
            continue
        kept.append(spec)
    return kept
