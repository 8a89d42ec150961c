"""Capture: the model as a ``torch.export`` graph, and the facts the planner reads off it.

``torch.export.export(model, inputs, strict=False)`` records every ATen op that runs, whoever
wrote it: a BatchNorm module, a subclass that adds an activation, an ``F.batch_norm`` call in a
user's ``forward`` or hand-written ``(x - mean) / std`` arithmetic all become nodes of one graph.
From that graph:

* parameters, buffers and lifted constants are placeholders that the graph signature maps to the
  user's fully qualified names (:attr:`Capture.fqn`);
* every node's output shape is in ``node.meta["val"]`` (symbolic batch sizes are read through
  their example value, :func:`shape`);
* the module that owns a node is the innermost entry of ``node.meta["nn_module_stack"]``
  (:func:`owner`), whose key also tells repeated calls of one module apart (``bn``, ``bn@1``);
* op arguments are read by name through the op's schema (:func:`bind`), never by position.

A *constant* node is computed from parameters, buffers and literals only; :class:`Constants`
evaluates it in float64 so that folded values are rounded once, when cast back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from normfold.errors import TraceError, first_line

logger = logging.getLogger(__name__)

_STATE_KINDS = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}


@dataclass(frozen=True)
class CaptureOptions:
    """How the model is captured: a dynamic batch axis (for export) or static shapes, and more
    dynamic axes by name: ``axes`` holds ``(input index, axis, name)`` (e.g. ``(0, 2, "height")``)."""

    dynamic_batch: bool = True
    axes: tuple[tuple[int, int, str], ...] = ()


@dataclass
class Capture:
    """An exported program plus name lookups the planner needs."""

    program: ExportedProgram
    fqn: dict[str, str] = field(default_factory=dict)  # placeholder name -> fully qualified name
    kind: dict[str, str] = field(default_factory=dict)  # placeholder name -> parameter/buffer/constant
    #: module path -> the first path of the same module object (a module registered twice)
    aliases: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # every parameter, buffer and constant name
    #: facts derived from the graph, built once per capture (:attr:`consts`, the engine's view);
    #: a capture is read-only once planned: :func:`normfold.engine.apply_program.apply_program`, which
    #: edits its graph, is its last reader
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, program: ExportedProgram) -> Capture:
        capture = cls(program)
        for spec in program.graph_signature.input_specs:
            kind = _STATE_KINDS.get(spec.kind)
            if kind is not None and spec.target is not None:
                capture.fqn[spec.arg.name] = spec.target
                capture.kind[spec.arg.name] = kind
        capture.names = {*program.state_dict, *program.constants}
        return capture

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    @property
    def consts(self) -> Constants:
        """The capture's :class:`Constants`, built on first use."""
        if "consts" not in self.derived:
            self.derived["consts"] = Constants(self)
        return self.derived["consts"]

    def value(self, fqn: str) -> torch.Tensor:
        """The current tensor behind a parameter, buffer or constant name."""
        if fqn in self.program.state_dict:
            return self.program.state_dict[fqn]
        return self.program.constants[fqn]

    def canonical(self, path: str) -> str:
        """One name per module object: the first it is registered under. A path through a
        sliced container (``model.slice(None, -1, None).0.bn``, recorded for a ``forward`` that
        iterates ``self.model[:-1]``) names the registered module it is (:mod:`normfold.engine.modpaths`)."""
        if "slice(" in path and path not in self.aliases:
            from normfold.engine.modpaths import unslice  # only paths through a sliced container need it

            path = unslice(self, path)
        return self.aliases.get(path, path)

    def state_of(self, node: Any) -> str | None:
        """The FQN when ``node`` is a parameter/buffer/constant placeholder, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.fqn.get(node.name)
        return None


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporters log and warn about things users cannot act on; keep them quiet."""
    names = (
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch.export",
        "torch._dynamo",
        "onnxscript",  # its version converter warns when it hands a conversion to onnx's C API
    )
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def dynamic_shapes(inputs: Sequence[torch.Tensor], options: CaptureOptions) -> tuple[Any, ...] | None:
    """A shared dynamic batch axis when asked for and every input has a batch of at least 2
    (torch.export specializes size-1 dimensions), plus ``options.axes`` (``Dim.AUTO``: export
    infers their ranges, e.g. a conv's minimum size; :func:`axis_names` names them)."""
    specs: list[dict[int, Any]] = [{} for _ in inputs]
    if options.dynamic_batch and inputs and all(t.dim() > 0 and t.shape[0] >= 2 for t in inputs):
        batch = torch.export.Dim("batch", min=1, max=2**20)
        for spec in specs:
            spec[0] = batch
    for index, axis, _ in options.axes:
        specs[index][axis] = torch.export.Dim.AUTO
    return tuple(specs) if any(specs) else None


#: ATen ops by the ONNX op they become, for before/after counts a user can put beside the
#: written ONNX graph's (``linear`` is counted as one Gemm, as the exporter usually writes it)
_AS_ONNX = {
    "batch_norm": "BatchNormalization",
    "_native_batch_norm_legit_no_training": "BatchNormalization",
    "conv1d": "Conv", "conv2d": "Conv", "conv3d": "Conv",
    "conv_transpose1d": "ConvTranspose", "conv_transpose2d": "ConvTranspose",
    "conv_transpose3d": "ConvTranspose",
    "linear": "Gemm", "addmm": "Gemm", "matmul": "MatMul", "mm": "MatMul", "bmm": "MatMul",
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "cat": "Concat",
}  # fmt: skip


def op_counts(graph: fx.Graph) -> dict[str, int]:
    """Ops of a captured graph counted by the ONNX op they become (others by ATen name)."""
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._overloadpacket.__name__.rstrip("_")
        if name == "convolution":
            counts["ConvTranspose" if bind(node).get("transposed") else "Conv"] += 1
        else:
            counts[_AS_ONNX.get(name, f"aten.{name}")] += 1
    return dict(sorted(counts.items()))


def axis_names(inputs: Sequence[torch.Tensor], options: CaptureOptions) -> list[dict[int, str]]:
    """Per input, its dynamic axes by name (what :func:`dynamic_shapes` makes dynamic)."""
    dynamic = dynamic_shapes(inputs, options)
    if dynamic is None:
        return []
    names = [{a: "batch" for a in spec if a == 0 and options.dynamic_batch} for spec in dynamic]
    for index, axis, name in options.axes:
        names[index][axis] = name
    return names


def static_axes(program: ExportedProgram, options: CaptureOptions) -> list[tuple[int, int, str, int]]:
    """The ``options.axes`` the capture fixed to one size: ``(input, axis, name, size)`` each."""
    names = set(program.graph_signature.user_inputs)
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    fixed = []
    for index, axis, name in options.axes:
        size = user[index].meta["val"].shape[axis] if index < len(user) else None
        if isinstance(size, torch.SymInt):  # torch.export may specialize an axis yet keep a SymInt
            size = size.node.maybe_as_int()
        if isinstance(size, int):
            fixed.append((index, axis, name, size))
    return fixed


def capture(model: nn.Module, inputs: Sequence[torch.Tensor], options: CaptureOptions) -> Capture:
    """Export ``model`` (already in eval mode) at the ATen level, non-strict."""
    inputs = tuple(inputs)
    dynamic = dynamic_shapes(inputs, options)
    try:
        try:
            with quiet_exporter(), torch.no_grad():
                program = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            if dynamic is None:
                raise
            # the model fixes its batch size (or axis 0 is not a batch): capture static shapes
            logger.info("dynamic batch capture failed (%s); capturing static shapes", first_line(e))
            with quiet_exporter(), torch.no_grad():
                program = torch.export.export(model, inputs, strict=False)
    except Exception as e:
        described = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} on example inputs [{described}]: "
            f"{first_line(e)}"
        ) from e
    # an op whose value nothing uses (a module called for nothing) is no user: left in the graph it
    # would block a fold that the folded program, which drops it, then allows (re-planning finds it)
    if program.graph.eliminate_dead_code():
        program.graph_module.recompile()
    result = Capture.of(program)
    first: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        result.aliases[path] = first.setdefault(id(module), path)
    return result


# --- reading nodes ------------------------------------------------------------------------------


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of ``node`` (positional or keyword, as the schema has it)."""
    schema = node.target._schema  # type: ignore[union-attr]
    index = next(i for i, a in enumerate(schema.arguments) if a.name == name)
    if schema.arguments[index].kwarg_only:
        node.kwargs = {**node.kwargs, name: value}
        return
    args = list(node.args)
    while len(args) <= index:  # fill skipped positional defaults
        a = schema.arguments[len(args)]
        args.append(node.kwargs.get(a.name, a.default_value if a.has_default_value() else None))
    args[index] = value
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != name}


def concrete(value: Any) -> Any:
    """Replace symbolic ints (and nodes holding them) by their example values."""
    if isinstance(value, fx.Node):
        return concrete(value.meta.get("val"))
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v) for v in value)
    return value


def tensor_meta(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def shape(node: fx.Node) -> tuple[int, ...]:
    val = tensor_meta(node)
    if val is None:
        raise KeyError(f"{node.name} has no tensor value")
    return tuple(concrete(list(val.shape)))


def owner(node: fx.Node) -> tuple[str, str, str]:
    """``(call key, module path, class name)`` of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ("", "", "")
    key, (path, cls) = next(reversed(stack.items()))
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return key, path, cls_name.rsplit(".", 1)[-1]


def module_calls(node: fx.Node) -> list[tuple[str, str]]:
    """Every ``(call key, module path)`` on the node's module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(k, v[0]) for k, v in stack.items()]


def ops_by_module(capture: Capture, consts: Constants) -> dict[str, set[str]]:
    """Module path -> names of the non-constant ops it runs (any call, nested modules included)."""
    owned: dict[str, set[str]] = {}
    for node in capture.graph.nodes:
        if node.op == "call_function" and tensor_meta(node) is not None and not consts.is_const[node]:
            for _, path in module_calls(node):
                owned.setdefault(capture.canonical(path), set()).add(node.name)
    return owned


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0]


_DROPOUTS = {torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
             torch.ops.aten.alpha_dropout.default, torch.ops.aten.feature_alpha_dropout.default}  # fmt: skip


def _eval_dropout(node: fx.Node) -> bool:
    """A dropout op with ``train=False``: the identity, no random draw."""
    return node.target in _DROPOUTS and not bind(node).get("train")


class Constants:
    """Which nodes are computed from parameters/buffers/literals only, and their float64 values."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.is_const: dict[fx.Node, bool] = {}
        for node in capture.graph.nodes:
            self.is_const[node] = self._classify(node)
        self._values: dict[fx.Node, torch.Tensor | None] = {}

    def _classify(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return node.name in self.capture.fqn
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return False
        if tensor_meta(node) is None or node.target._schema.is_mutable:
            return False
        if torch.Tag.nondeterministic_seeded in node.target.tags and not _eval_dropout(node):
            return False  # a random draw (rand_like(w), dropout(w) in training) is new at every call
        inputs = node.all_input_nodes
        return bool(inputs) and all(self.is_const.get(n, False) for n in inputs)

    def value(self, node: Any) -> torch.Tensor | None:
        """float64 value of a constant node (None when it is not constant or fails)."""
        if not isinstance(node, fx.Node) or not self.is_const.get(node, False):
            return None
        if node not in self._values:
            self._values[node] = self._evaluate(node)
        return self._values[node]

    def _evaluate(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "placeholder":
            t = self.capture.value(self.capture.fqn[node.name]).detach()
            # on the CPU whatever the model's device: plans are small per-channel vectors
            return t.to("cpu", torch.float64) if t.is_floating_point() else t.cpu()

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.value(a)
            if isinstance(a, (list, tuple)):
                return type(a)(arg(v) for v in a)
            return concrete(a)

        try:
            with torch.no_grad():
                out = node.target(*arg(node.args), **{k: arg(v) for k, v in node.kwargs.items()})
        except Exception:  # an op that cannot run on real float64 tensors is simply not folded
            logger.debug("cannot evaluate constant %s", node.name, exc_info=True)
            return None
        return out if isinstance(out, torch.Tensor) else None
