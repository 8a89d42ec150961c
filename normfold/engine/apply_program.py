"""Apply a :class:`~normfold.engine.plan.Plan` to the exported program (see :mod:`normfold.engine.apply`).

Every folded norm op is bypassed and erased, the constants only it used go with it (dead code),
layers get their new parameter values by name, a layer without bias gets a new parameter
placeholder (a bare ``x @ W`` becomes ``x @ W + b``), and parameters nothing reads any more
leave the graph signature. A merged block's sum is replaced by its target conv.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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

from normfold.engine.branches import Merge
from normfold.engine.capture import Capture, quiet_exporter, set_arg
from normfold.engine.plan import Plan, new_bias_name


def apply_program(
    capture: Capture, plan: Plan, values: dict[str, torch.Tensor], merges: Sequence[Merge] = ()
) -> ExportedProgram:
    """The captured program with every fold of ``plan`` and every block of ``merges`` applied
    (the capture's graph is reused): a merged block's sum is replaced by its target conv, and
    the other branches, now unused, go as dead code."""
    program = capture.program
    gm = program.graph_module
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    becomes: dict[str, fx.Node] = {}  # a folded unit's output -> the node that replaced it
    for fold in plan.folds:  # each unit is bypassed: its users read the node it transforms
        nodes = [by_name[n] for n in fold.unit.nodes]
        x = by_name[fold.unit.input]
        while x.name in becomes:  # its input was itself a folded unit
            x = becomes[x.name]
        nodes[-1].replace_all_uses_with(x)
        becomes[nodes[-1].name] = x
        for node in reversed(nodes):
            graph.erase_node(node)
    for merge in merges:
        by_name[merge.adds[0]].replace_all_uses_with(by_name[merge.target.layer or ""])
        for name in merge.adds:  # the root first, then the sums only it used (``+=`` is no dead code)
            graph.erase_node(by_name[name])
    specs = list(program.graph_signature.input_specs)
    state = dict(program.state_dict)
    slot: tuple[int, fx.Node] | None = None  # new biases go after the last parameter, in order
    biasless = [  # a replaced weight alone makes no bias
        (u.layer, u.weight) for f in plan.folds for u in f.updates if u.bias is None and u.side != "replace"
    ]
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
    # no gm.recompile(): the new ExportedProgram makes its own graph module from the graph, and
    # generates its code then (a second code generation cost 2% of a fold on mixnet_s)
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
