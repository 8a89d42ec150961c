"""The fold pass: find ``producer -> BatchNorm`` pairs in a torch.fx trace and fold each norm.

A BatchNorm in eval mode is the per-channel affine map ``y = s * x + t`` (see
:mod:`normfold.affine` for the formula). When ``x`` is the output of a Conv, ConvTranspose or
Linear whose output channels sit on the axis the norm normalizes (axis 1), the map folds into
the producer: ``W' = s * W`` along the output-channel axis, ``b' = s * b + t``.

How it works:

1. The model (a deep copy unless ``inplace=True``) is put in eval mode and traced with
   ``torch.fx``; Conv/ConvTranspose/Linear and every norm (subclasses included, matched with
   ``isinstance``) stay leaf modules so they can be matched by module.
2. With ``example_inputs`` the trace is run once to record every activation's shape (the only
   way to tell which axis a ``Linear -> BatchNorm1d`` normalizes).
3. Each norm is checked against the declarative :data:`PATTERNS` table; every check returns the
   reason it does not hold, and that reason lands in :attr:`FoldResult.skipped`.
4. A fold updates the producer's parameters (new ``nn.Parameter`` objects, float64 arithmetic,
   cast back) and replaces the norm submodule with ``nn.Identity`` wherever it is registered, so
   the result is still the user's own class with unchanged module names.

A norm is never folded when doing so could change any output: shared modules (called at several
places), producers with several users, parameters read outside the module call, norms without
running statistics, non-finite or negative variances, channel mismatches, subclasses whose forward
does more than the BatchNorm formula, and Linear outputs whose feature axis is not the axis the
norm normalizes (or whose shapes are unknown).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.utils import parametrize

from normfold.affine import bn_affine, fold_affine
from normfold.errors import TraceError, UsageError, first_line

logger = logging.getLogger(__name__)

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONV, *_CONV_T, nn.Linear)
# Every norm layer is reported (folded or skipped with a reason); only BatchNorms can fold.
_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)
# Forwards known to compute exactly the eval-mode BatchNorm formula; anything else is probed.
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class Pattern:
    """One foldable ``producer -> BatchNorm`` shape.

    ``transpose``: the producer's weight is ``(C_in, C_out / groups, *k)`` (ConvTranspose).
    ``batched_ndim``: rank of the producer's batched output, whose axis 1 is the channel axis.
    ``needs_shapes``: the channel axis can only be confirmed from traced shapes (Linear acts on
    the last axis, BatchNorm on axis 1: they agree only for 2-D activations).
    """

    name: str
    producers: tuple[type[nn.Module], ...]
    transpose: bool
    batched_ndim: Callable[[nn.Module], int]
    needs_shapes: bool


PATTERNS: tuple[Pattern, ...] = (
    Pattern("conv-bn", _CONV, False, lambda m: len(m.kernel_size) + 2, needs_shapes=False),
    Pattern("conv_transpose-bn", _CONV_T, True, lambda m: len(m.kernel_size) + 2, needs_shapes=False),
    Pattern("linear-bn", (nn.Linear,), False, lambda m: 2, needs_shapes=True),
)


@dataclass(frozen=True)
class Folded:
    """A norm that was folded into the layer before it."""

    norm: str
    into: str
    pattern: str
    norm_type: str
    into_type: str


@dataclass(frozen=True)
class Skipped:
    """A norm left in place, with the reason a user can act on."""

    norm: str
    norm_type: str
    reason: str


@dataclass
class FoldResult:
    """What :func:`fold` produced: the model plus one record per norm layer."""

    model: nn.Module
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: True only when a pattern needed the model rewritten as a ``torch.fx.GraphModule``;
    #: every pattern in :data:`PATTERNS` keeps the user's own class.
    graph_module: bool = False
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "graph_module": self.graph_module,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
        }


class _Tracer(fx.Tracer):
    """Keeps producers and norms (user subclasses too) as leaves so they match by module."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_PRODUCERS, *_NORMS)) or super().is_leaf_module(m, module_qualified_name)


def fold(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    inplace: bool = False,
) -> FoldResult:
    """Fold every eval-mode BatchNorm that follows a Conv, ConvTranspose or Linear.

    ``example_inputs`` (a tensor or a tuple of tensors) lets the pass record activation shapes;
    without them a ``Linear -> BatchNorm1d`` is skipped because the normalized axis cannot be
    confirmed. The input model is left untouched unless ``inplace=True``; the returned model is
    in eval mode and keeps the user's class and module names, with folded norms replaced by
    ``nn.Identity``.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"fold() expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise UsageError(
                f"could not copy {type(model).__name__} (pass inplace=True to fold it in place): {e}"
            ) from e
    model.eval()
    params_before = _count_params(model)
    gm = _trace(model)
    shapes = _record_shapes(gm, inputs) if inputs is not None else None

    result = FoldResult(model=model, params_before=params_before)
    _Pass(model, gm, shapes, result).run()
    result.params_after = _count_params(model)
    logger.info("folded %d norm(s), skipped %d", len(result.folded), len(result.skipped))
    return result


def _as_tuple(example_inputs: ExampleInputs | None) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {first_line(e)}. "
            "normfold needs a forward without data-dependent Python control flow."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _record_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, tuple[int, ...]]:
    try:
        # fx prints the generated code's traceback to stderr on failure; the message says it all
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:
        described = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise TraceError(
            f"{gm.__class__.__name__} failed on example inputs [{described}]: {first_line(e.__cause__ or e)}"
        ) from e
    out: dict[fx.Node, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node] = tuple(meta.shape)
    return out


class _Pass:
    """One walk over the graph in execution order, folding as it goes."""

    def __init__(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        shapes: dict[fx.Node, tuple[int, ...]] | None,
        result: FoldResult,
    ) -> None:
        self.model = model
        self.gm = gm
        self.shapes = shapes
        self.result = result
        call_nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
        self.calls = Counter(id(gm.get_submodule(n.target)) for n in call_nodes)
        # module path -> attributes of it that forward reads directly (``self.conv.weight``)
        self.attr_reads: dict[str, list[str]] = defaultdict(list)
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                owner, _, attr = str(n.target).rpartition(".")
                self.attr_reads[owner].append(attr)
        # folded norm node -> the producer node it went into (a norm after a folded norm
        # sees through it)
        self.folded_into: dict[fx.Node, fx.Node] = {}

    def run(self) -> None:
        seen: set[int] = set()
        for node in self.gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = self.gm.get_submodule(node.target)
            if not isinstance(module, _NORMS) or id(module) in seen:
                continue
            seen.add(id(module))
            name = str(node.target)
            if not isinstance(module, _BatchNorm):
                self._skip(name, module, f"{type(module).__name__} normalizes with per-sample statistics")
                continue
            reason = self._try_fold(node, name, module)
            if reason is not None:
                self._skip(name, module, reason)
        for name, module in self.model.named_modules():
            if isinstance(module, _NORMS) and id(module) not in seen:
                seen.add(id(module))
                self._skip(name, module, "never called in forward (not in the traced graph)")

    def _skip(self, name: str, module: nn.Module, reason: str) -> None:
        logger.debug("skip %s: %s", name, reason)
        self.result.skipped.append(Skipped(norm=name, norm_type=type(module).__name__, reason=reason))

    def _try_fold(self, node: fx.Node, name: str, bn: _BatchNorm) -> str | None:
        reason = self._check_norm(name, bn)
        if reason is not None:
            return reason
        found = self._find_producer(node, name)
        if isinstance(found, str):
            return found
        src, prod_name, producer, pattern = found
        reason = self._check_producer(src, prod_name, producer, name, bn, pattern)
        if reason is not None:
            return reason
        reason = self._check_probe(name, bn, pattern.batched_ndim(producer))
        if reason is not None:
            return reason
        self._apply(node, src, name, bn, prod_name, producer, pattern)
        return None

    def _check_norm(self, name: str, bn: _BatchNorm) -> str | None:
        if self.calls[id(bn)] > 1:
            return f"{name} is called at {self.calls[id(bn)]} places; removing it would change all of them"
        if bn.running_mean is None or bn.running_var is None:
            return (
                f"{name} has no running statistics (track_running_stats=False): "
                "it normalizes with batch statistics even in eval mode"
            )
        if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in (bn.running_mean, bn.weight)):
            return f"{name} is a lazy module that was never run (uninitialized parameters)"
        for label, t in (("running_mean", bn.running_mean), ("weight", bn.weight), ("bias", bn.bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                return f"{name}.{label} has {int((~torch.isfinite(t)).sum())} non-finite value(s)"
        var = bn.running_var.detach().to(torch.float64)
        if not bool(torch.isfinite(var).all()):
            return f"{name}.running_var has {int((~torch.isfinite(var)).sum())} non-finite value(s)"
        if bool((var + bn.eps <= 0).any()):
            return f"{name}.running_var + eps is not positive (min running_var {var.min().item():.6g})"
        if bn._forward_hooks or bn._forward_pre_hooks:
            return f"{name} has forward hooks that would be lost"
        if self.attr_reads.get(name):
            return self._read_directly(name)
        return None

    def _read_directly(self, path: str) -> str:
        return f"forward reads {path}.{self.attr_reads[path][0]} directly, outside the module call"

    def _find_producer(
        self, node: fx.Node, name: str
    ) -> str | tuple[fx.Node, str, nn.Module, Pattern]:
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
            return f"{name} is called with extra arguments"
        # A norm right after an already-folded norm sees through it to the producer.
        while src in self.folded_into:
            if len(src.users) > 1:
                return f"{src.target} output has {len(src.users)} users"
            src = self.folded_into[src]
        if src.op != "call_module":
            what = {"placeholder": "a model input", "get_attr": "a parameter"}.get(src.op)
            if what is None:
                what = f"{_callable_name(src.target)} ({src.op.replace('_', ' ')})"
            return f"input of {name} is {what}, not a Conv/ConvTranspose/Linear"
        producer = self.gm.get_submodule(src.target)
        pattern = next((p for p in PATTERNS if isinstance(producer, p.producers)), None)
        if pattern is None:
            return (
                f"input of {name} comes from {src.target} ({type(producer).__name__}), "
                "not a Conv/ConvTranspose/Linear"
            )
        return src, str(src.target), producer, pattern

    def _check_producer(
        self,
        src: fx.Node,
        prod_name: str,
        producer: nn.Module,
        name: str,
        bn: _BatchNorm,
        pattern: Pattern,
    ) -> str | None:
        calls = self.calls[id(producer)]
        if calls > 1:
            return (
                f"{prod_name} is called at {calls} places (shared weights); "
                f"folding {name} into it would change the other call sites"
            )
        if len(src.users) > 1:
            return f"{prod_name} output has {len(src.users)} users"
        if self.attr_reads.get(prod_name):
            return self._read_directly(prod_name)
        base = next(t for t in pattern.producers if isinstance(producer, t))
        overridden = [
            m
            for m in ("forward", "_conv_forward")
            if getattr(type(producer), m, None) is not getattr(base, m, None)
        ]
        if overridden:
            return (
                f"{prod_name} ({type(producer).__name__}) overrides {overridden[0]}; "
                "its output may not be linear in its weight"
            )
        if parametrize.is_parametrized(producer):
            return f"{prod_name} has parametrized weights"
        if producer._forward_hooks or producer._forward_pre_hooks:
            return f"{prod_name} has forward hooks that would see different outputs"
        if isinstance(producer.weight, nn.parameter.UninitializedTensorMixin):
            return f"{prod_name} is a lazy module that was never run (uninitialized parameters)"
        if not producer.weight.is_floating_point():
            return f"{prod_name} weight is {producer.weight.dtype}, not floating point"
        out_channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        if out_channels != bn.num_features:
            return f"{name} has {bn.num_features} features but {prod_name} produces {out_channels} channels"
        return self._check_axis(src, prod_name, name, pattern.batched_ndim(producer), pattern)

    def _check_axis(
        self, src: fx.Node, prod_name: str, name: str, batched_ndim: int, pattern: Pattern
    ) -> str | None:
        """The norm's axis 1 must be the producer's output-channel axis."""
        shape = self.shapes.get(src) if self.shapes is not None else None
        if shape is None:
            if pattern.needs_shapes:
                return (
                    f"cannot tell which axis {name} normalizes without activation shapes "
                    f"({prod_name} acts on the last axis, BatchNorm on axis 1): pass example_inputs"
                )
            return None
        if len(shape) == batched_ndim:
            return None
        if pattern.needs_shapes:
            return (
                f"{name} normalizes axis 1 of the {shape} output of {prod_name}, "
                f"but {prod_name}'s features are on its last axis"
            )
        return f"{prod_name} output {shape} is unbatched, so its channels are not on {name}'s axis 1"

    def _check_probe(self, name: str, bn: _BatchNorm, ndim: int) -> str | None:
        """A BN subclass may add behaviour (an activation, say): compare it with the formula."""
        if type(bn).forward in _PLAIN_BN_FORWARDS:
            return None
        ref = bn.running_mean
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (2, bn.num_features, *([3] * (ndim - 2)))
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(ref.device, ref.dtype)
        scale, shift = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        bshape = (1, -1, *([1] * (ndim - 2)))
        expected = x.to(torch.float64) * scale.reshape(bshape) + shift.reshape(bshape)
        try:
            with torch.no_grad():
                got = bn(x)
        except Exception as e:
            return f"{name} ({type(bn).__name__}) failed on a probe input of shape {shape}: {e}"
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            return f"{name} ({type(bn).__name__}) does not return a tensor of its input's shape"
        diff = (got.to(torch.float64) - expected).abs().max().item()
        tol = 10 * torch.finfo(ref.dtype).eps * max(1.0, expected.abs().max().item())
        if not diff <= tol:
            return (
                f"{name} ({type(bn).__name__}) forward does more than the BatchNorm formula "
                f"(max abs difference {diff:.3g} on a probe input); left in place to keep that behaviour"
            )
        return None

    def _apply(
        self,
        node: fx.Node,
        src: fx.Node,
        name: str,
        bn: _BatchNorm,
        prod_name: str,
        producer: nn.Module,
        pattern: Pattern,
    ) -> None:
        scale, shift = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        weight, bias = fold_affine(
            producer.weight,
            producer.bias,
            scale.to(producer.weight.device),
            shift.to(producer.weight.device),
            transpose=pattern.transpose,
            groups=getattr(producer, "groups", 1),
        )
        requires_grad = producer.weight.requires_grad
        # New Parameter objects: a tied parameter elsewhere keeps its original values.
        producer.weight = nn.Parameter(weight, requires_grad=requires_grad)
        producer.bias = nn.Parameter(bias, requires_grad=requires_grad)
        _replace_module(self.model, bn, nn.Identity())
        self.folded_into[node] = src
        self.result.folded.append(
            Folded(
                norm=name,
                into=prod_name,
                pattern=pattern.name,
                norm_type=type(bn).__name__,
                into_type=type(producer).__name__,
            )
        )
        logger.debug("folded %s into %s (%s)", name, prod_name, pattern.name)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap ``old`` for ``new`` under every name it is registered (a module may be aliased)."""
    for parent in list(root.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def _callable_name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)
