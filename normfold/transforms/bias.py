"""``drop_redundant_biases``: remove a layer bias that only feeds a BatchNorm, and shift the norm.

A Conv/ConvTranspose/Linear ``y = W*x + b`` whose output goes straight into a BatchNorm carries a
bias the norm cancels: the norm subtracts a mean of its input, and ``b`` is constant per channel.
The bias is removed (``layer.bias = None``, the registered name is kept) and the norm's running
mean absorbs it, per channel ``c``::

    running_mean'[c] = running_mean[c] - b[c]        (float64, cast back once to the buffer dtype)

**Eval mode.** The norm used to see ``z = y + b`` and computes
``(z - running_mean) / sqrt(running_var + eps)``; it now sees ``y``, and
``y - running_mean' = y - running_mean + b = z - running_mean``: every output is the same,
``running_var``, ``eps``, ``weight`` and ``bias`` of the norm are untouched.

**Train mode.** The norm normalizes with the batch statistics of its input. Per channel,
``mean_B(y + b) = mean_B(y) + b`` and ``var_B(y + b) = var_B(y)``, so ``z - mean_B(z)`` equals
``y - mean_B(y)``: the same normalized output, the same gradients for the input and for every
other parameter (the removed bias's own gradient was zero up to rounding, for the same reason).
The running statistics stay consistent for any ``momentum`` ``m`` (``None``, the cumulative
average, included): the update ``r <- (1 - m) r + m mean_B`` gives, for the original norm,
``r_orig <- (1 - m) r_orig + m (mean_B(y) + b)`` and, for the new one,
``r_new <- (1 - m) (r_orig - b) + m mean_B(y) = [(1 - m) r_orig + m (mean_B(y) + b)] - b``: the
invariant ``r_new = r_orig - b`` holds after every step, and ``running_var`` (unbiased batch
variance) gets the same update in both. Caveats for later training: ``model.parameters()`` has
fewer entries, so build the optimizer after the call; and the original model's bias would only
have moved through weight decay or an optimizer's leftover momentum (its gradient is zero), which
the dropped model simply does not have.

**Which biases.** The engine decides, nothing is matched again here: the model is captured in
eval mode (:func:`normfold.engine.capture.capture`, static shapes), planned
(:func:`normfold.engine.plan.plan`) and the eager applicability of each fold is decided by
:func:`normfold.engine.apply.eager_plan`. A bias is
dropped when its norm op has a fold in the eager plan that

* is a ``batch_norm`` unit folded backward into exactly one layer (one output-side update),
* reads the layer output **directly** (``fold.through == ()``: no reshape, pooling, dropout, cat
  or add between them; those are reported as ``through_ops`` even where they would commute with
  a per-channel shift) and passes through no other folded norm (``fold.after == ()``),
* whose layer is a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` module (any groups)
  with its own ``bias`` parameter, which the op reads (a subclass with its own ``forward`` is
  probed once to still work, unchanged, with ``bias=None``),
* and whose norm is a ``_BatchNorm`` module with running statistics, called once.

So the folding preconditions hold: the layer output has one user, the layer is not shared, the
norm tracks running statistics and is a module that can be changed. Every other BatchNorm op of
the graph gets a :class:`KeptBias` record with a stable code: the engine's own for norms the plan
keeps (``multiple_users``, ``shared_producer``, ``batch_statistics``, ...), and

===================== ===============================================================================
``export_only``       the engine folds the norm in the export only (reason: the eager plan's note:
                      functional ``F.batch_norm``, hooks, a norm also called where it stays, ...)
``no_bias``           the layer has no bias: nothing to drop
``through_ops``       ops between the layer and the norm
``after_norm``        the norm reads the layer output through another folded norm or affine op
``forward_fold``      the norm folds forward into the layer after it: no layer feeds it directly
``multiple_users``    (forward folds) the layer output also goes elsewhere (the engine's wording)
``shared_producer``   (forward folds) the layer's weight or bias is read by several ops
``not_layer_module``  the layer is functional code or not a Conv/ConvTranspose/Linear module's op
``custom_forward``    a layer subclass whose ``forward`` does not run unchanged with ``bias=None``
``not_batchnorm``     the norm module is not a ``torch`` BatchNorm (its training behaviour is unknown)
``shared_norm``       one norm module called at several places: one running mean, several biases
===================== ===============================================================================

Every ``batch_norm`` op of the captured graph gets exactly one record (a norm module called twice
gets two); norm modules never called, per-sample norms and hand-written affine maps get none.
The train-mode argument assumes ``forward`` runs the same layer -> norm edge in train mode as in
the eval-mode graph the engine reads (true for any model whose ``forward`` does not branch on
``self.training`` around them).

The model keeps its class, module names and train/eval mode (capture switches it to eval for
the duration). With ``inplace=False`` (the default) the model is deep-copied first and the input
is never touched; every changed buffer is a new tensor, never an in-place write.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.codes.kept import Kept
from normfold.engine import aten
from normfold.engine.apply import LAYER_MODULES, EagerPlan, eager_plan
from normfold.engine.capture import Capture, CaptureOptions, bind, capture, owner, shape
from normfold.engine.plan import Fold, Plan, Unit, describe, plan
from normfold.engine.probe import isolated_rng, probe_input
from normfold.prepare import ExampleInputs, as_inputs, check_materialized, working_copy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DroppedBias:
    """A layer bias removed; its norm's ``running_mean`` was shifted by ``-bias``."""

    layer: str  # module path of the Conv/ConvTranspose/Linear
    norm: str  # module path of the BatchNorm
    params: int  # parameters removed (the bias's element count)


@dataclass(frozen=True)
class KeptBias(Kept):
    """A BatchNorm op whose input layer keeps its bias (or has none), with a stable code."""

    layer: str | None  # the layer whose output the norm reads, None when it reads no layer output
    norm: str
    code: str
    reason: str
    subject_field = "norm"


@dataclass
class BiasResult:
    """What :func:`drop_redundant_biases` did: the model, one record per BatchNorm op."""

    model: nn.Module
    dropped: list[DroppedBias] = field(default_factory=list)
    kept: list[KeptBias] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_saved": self.params_saved,
            "dropped": [asdict(d) for d in self.dropped],
            "kept": [asdict(k) for k in self.kept],
        }


def drop_redundant_biases(
    model: nn.Module, example_inputs: ExampleInputs, *, inplace: bool = False
) -> BiasResult:
    """Remove every Conv/ConvTranspose/Linear bias that feeds a BatchNorm directly (see the module
    docstring), shifting the norm's ``running_mean`` by ``-bias``: outputs are unchanged in eval
    and in train mode.

    ``example_inputs`` (a tensor or a tuple of tensors) are what ``torch.export`` runs the model on
    once, in eval mode; the model is returned in the train/eval mode it came in. The input model is
    left untouched unless ``inplace=True``. Raises :class:`~normfold.errors.TraceError` when the
    model cannot be captured.
    """
    check_materialized(model)  # a meta or lazy model has no values to work on
    model = working_copy(model, "drop_redundant_biases", inplace=inplace)
    inputs = as_inputs(example_inputs, "drop_redundant_biases")
    modes = [(m, m.training) for m in model.modules()]
    try:
        cap = capture(model.eval(), inputs, CaptureOptions(dynamic_batch=False))
        the_plan = plan(cap)
        eager = eager_plan(the_plan, cap, model)
    finally:
        for m, training in modes:
            m.training = training
    result = BiasResult(model=model, params_before=_count_params(model))
    candidates = _Decide(model, cap, the_plan, eager).run(result)
    for layer_path, norm_path in candidates:
        result.dropped.append(_drop(model, layer_path, norm_path))
    result.params_after = _count_params(model)
    logger.info(
        "dropped %d bias(es) (%d parameters), kept %d",
        len(result.dropped),
        result.params_saved,
        len(result.kept),
    )
    return result


def _drop(model: nn.Module, layer_path: str, norm_path: str) -> DroppedBias:
    layer = model.get_submodule(layer_path)
    norm = model.get_submodule(norm_path)
    bias, mean = layer.bias, norm.running_mean
    # float64 on the CPU, cast back once; a new tensor: the caller's model may share the old one
    shifted = mean.detach().to("cpu", torch.float64) - bias.detach().to("cpu", torch.float64)
    norm._buffers["running_mean"] = shifted.to(device=mean.device, dtype=mean.dtype)
    layer.bias = None  # stays registered, as None
    logger.debug("dropped %s.bias into %s.running_mean", layer_path, norm_path)
    return DroppedBias(layer=layer_path, norm=norm_path, params=bias.numel())


class _Decide:
    """One record per batch_norm op of the plan: a candidate ``(layer, norm)`` or a KeptBias."""

    def __init__(self, model: nn.Module, cap: Capture, the_plan: Plan, eager: EagerPlan) -> None:
        self.model, self.capture, self.plan, self.eager = model, cap, the_plan, eager
        self.by_name = {n.name: n for n in cap.graph.nodes}
        self.calls: dict[str, int] = {}  # running_mean FQN -> batch_norm ops reading it
        for unit in [f.unit for f in the_plan.folds] + [k.unit for k in the_plan.kept]:
            stats = unit.stats.get("running_mean")
            if unit.kind == "batch_norm" and stats:
                self.calls[stats] = self.calls.get(stats, 0) + 1

    def run(self, result: BiasResult) -> list[tuple[str, str]]:
        order = {n.name: i for i, n in enumerate(self.capture.graph.nodes)}
        decided: list[tuple[int, tuple[str, str] | KeptBias]] = []
        eager = {id(f) for f in self.eager.folds}
        for fold in self.plan.folds:
            if fold.unit.kind == "batch_norm":
                decided.append((order[fold.unit.nodes[0]], self._fold(fold, id(fold) in eager)))
        for keep in self.plan.kept:
            if keep.unit.kind == "batch_norm":
                layer = self._input_layer(keep.unit)
                decided.append(
                    (order[keep.unit.nodes[0]], KeptBias(layer, keep.unit.name, keep.code, keep.reason))
                )
        candidates = []
        for _, item in sorted(decided, key=lambda d: d[0]):
            if isinstance(item, KeptBias):
                logger.debug("keep bias before %s: %s", item.norm, item.reason)
                result.kept.append(item)
            else:
                candidates.append(item)
        return candidates

    def _fold(self, fold: Fold, is_eager: bool) -> tuple[str, str] | KeptBias:
        unit = fold.unit
        norm = unit.name
        layer = self._input_layer(unit)
        if not is_eager:
            note = self.eager.export_only.get(unit.nodes[0], "the norm stays in the eager model")
            return KeptBias(layer, norm, "export_only", note)
        updates = fold.updates
        if len(updates) != 1 or updates[0].side != "output":
            if layer is not None:  # a layer feeds the norm, but the engine folds the norm forward
                why = self._not_backward(unit, layer)
                if why is not None:
                    return why
            into = ", ".join(dict.fromkeys(u.module or u.layer for u in updates))
            return KeptBias(
                layer,
                norm,
                "forward_fold",
                f"{norm} reads {describe(self._input(unit))}, not a layer output used only there "
                f"(it folds forward into {into}, {fold.pattern})",
            )
        update = updates[0]
        if fold.through:
            return KeptBias(
                layer or update.module,
                norm,
                "through_ops",
                f"ops between the layer and the norm ({', '.join(fold.through)}): only a norm that "
                "reads the layer output directly is handled",
            )
        if fold.after:
            return KeptBias(
                layer or update.module,
                norm,
                "after_norm",
                f"{norm} reads the layer output through folded op(s) {', '.join(fold.after)}",
            )
        if update.bias is None:
            return KeptBias(layer or update.module, norm, "no_bias", f"{update.module} has no bias to drop")
        module = self._module(update.module)
        prefix, _, attr = update.bias.rpartition(".")
        if (
            not isinstance(module, LAYER_MODULES)
            or attr != "bias"
            or self._module(prefix) is not module
            or module._parameters.get("bias") is None
        ):
            where = f"{update.module} ({update.module_type})" if update.module else "the model's forward"
            return KeptBias(
                layer or update.module or None,
                norm,
                "not_layer_module",
                f"the {update.kind} op {update.layer} runs in {where}, not as a Conv/ConvTranspose/Linear "
                f"module reading its own bias ({update.bias})",
            )
        if not _runs_without_bias(module, shape(bind(self.by_name[update.layer])["input"])):
            return KeptBias(
                update.module,
                norm,
                "custom_forward",
                f"{update.module} ({type(module).__name__}) has its own forward, which does not run "
                "unchanged with bias=None",
            )
        stats = unit.stats.get("running_mean") or ""
        norm_path = stats.rpartition(".")[0]
        bn = self._module(norm_path) if "." in stats else None
        if not isinstance(bn, _BatchNorm):
            cls = type(bn).__name__ if bn is not None else "no module"
            return KeptBias(
                update.module,
                norm,
                "not_batchnorm",
                f"{norm} ({cls}) is not a torch BatchNorm module: its train-mode behaviour is unknown",
            )
        if not bn.track_running_stats or bn.running_mean is None:
            return KeptBias(update.module, norm, "batch_statistics", f"{norm} has no running statistics")
        if self.calls.get(stats, 0) > 1:
            return KeptBias(
                update.module,
                norm,
                "shared_norm",
                f"{norm} is called {self.calls[stats]} times: its one running_mean cannot absorb "
                "the bias of each caller",
            )
        return update.module, norm_path

    def _not_backward(self, unit: Unit, layer_path: str) -> KeptBias | None:
        """Why a norm that reads a layer output folds forward instead: the layer's output or
        parameters are shared (the engine's backward checks, in its words)."""
        node = self._input(unit)
        what = describe(node)
        if len(node.users) > 1:
            return KeptBias(
                layer_path, unit.name, "multiple_users", f"{what} output has {len(node.users)} users"
            )
        layer = aten.read_layer(node)
        for role, arg in (("weight", layer.weight), ("bias", layer.bias)):
            via = layer.via if role == "weight" else None
            if arg is not None and (len(arg.users) > 1 or (via is not None and len(via.users) > 1)):
                fqn = self.capture.state_of(arg) or arg.name
                return KeptBias(
                    layer_path,
                    unit.name,
                    "shared_producer",
                    f"{what} {role} {fqn} is used by {len(arg.users)} ops (a module called at several "
                    f"places, or a tied or directly read weight); dropping its bias would change the others",
                )
        return None

    def _module(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _input(self, unit: Unit) -> fx.Node:
        return bind(self.by_name[unit.nodes[0]])["input"]

    def _input_layer(self, unit: Unit) -> str | None:
        """The layer (module path of its weight, else its owner module) whose output the norm reads."""
        node = self._input(unit)
        layer = aten.read_layer(node) if isinstance(node, fx.Node) else None
        if layer is None:
            return None
        fqn = self.capture.state_of(layer.weight)
        if fqn is not None and "." in fqn:
            return self.capture.canonical(fqn.rpartition(".")[0])
        return self.capture.canonical(owner(node)[1]) or None


def _runs_without_bias(layer: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """A layer whose forward is the torch class's runs with ``bias=None``; a subclass with its own
    forward is probed on a copy: with a zero bias and with none, the same output."""
    base = next(t for t in LAYER_MODULES if isinstance(layer, t))
    if type(layer).forward is base.forward:
        return True
    try:
        probe = copy.deepcopy(layer)
        x = probe_input(input_shape, layer.weight.dtype, layer.weight.device)
        with torch.no_grad(), isolated_rng(layer.weight.device):  # the user's seeded RNG stays as it was
            probe.bias = nn.Parameter(torch.zeros_like(probe.bias))
            zero = probe(x)
            probe.bias = None
            none = probe(x)
    except Exception:  # a forward that cannot take the probe is not trusted without its bias
        return False
    return isinstance(zero, torch.Tensor) and isinstance(none, torch.Tensor) and torch.equal(zero, none)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
