"""``swap_norms``: replace BatchNorm modules by another normalization, keeping names and the user's class.

Every ``_BatchNorm`` instance (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses that do not
override ``forward``) is replaced under every name it is registered, in one walk over the modules;
its affine parameters move to the new module under the same names (``weight``/``bias``), so those
``state_dict`` keys stay where they were.

With ``x`` the input, ``c`` the channel (dim 1), ``gamma``/``beta`` the BN's affine parameters and
``mu``/``var`` its stored statistics, an eval-mode BatchNorm computes, per channel::

    y = (x - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c

The swaps (``to=``):

``"group"``  -> :class:`torch.nn.GroupNorm` ``(G, C)``. The channels are split into ``G`` groups of
    ``C / G``; each sample ``n`` is normalized with the mean and (biased) variance of its own
    group ``g`` over the group's channels and all positions::

        y[n, c, ...] = (x[n, c, ...] - m[n, g]) / sqrt(v[n, g] + eps) * gamma_c + beta_c

    ``G`` is ``num_groups``, or ``C // group_size``, or by default :func:`default_num_groups`: the
    largest divisor of ``C`` that is at most 32 and leaves at least 2 channels per group (1 when
    there is none, e.g. ``C = 7``). ``G == C`` (one channel per group, which on ``(N, C)`` inputs
    normalizes every value to ``beta``) happens only when asked for, or when ``C == 1``.

``"layer"``  -> :class:`torch.nn.LayerNorm` ``(C)`` for a norm seen on ``(N, C)`` inputs (statistics
    over the ``C`` features of each sample), else :class:`ChannelsLayerNorm` (statistics over ``C``
    at each sample and position, as in ConvNeXt)::

        y[n, c, p] = (x[n, c, p] - m[n, p]) / sqrt(v[n, p] + eps) * gamma_c + beta_c

    The input rank is recorded on ``example_inputs``; without them a ``BatchNorm1d`` is assumed
    to see ``(N, C)`` (recorded as a note) and a ``SyncBatchNorm`` gets :class:`ChannelsLayerNorm`,
    which is LayerNorm on ``(N, C)`` inputs too.

``"frozen"`` -> :class:`FrozenBatchNorm`: the eval formula above with the stored ``mu``, ``var``,
    ``gamma``, ``beta`` and the BN's own ``eps``, in train *and* eval mode (the usual choice for
    fine-tuning detectors on small batches). It calls ``F.batch_norm(training=False)``, the very
    kernel an eval BatchNorm calls, so its outputs are bit-identical to the BN's eval outputs in
    every dtype; in fp16/bf16 that kernel computes ``gamma / sqrt(var + eps)`` in float32.
    Statistics never update; ``gamma``/``beta`` are buffers unless ``trainable_affine=True``.

``"batch"``  -> ``SyncBatchNorm`` becomes ``BatchNorm1d`` (inputs of rank 2 or 3), ``BatchNorm2d``
    (rank 4) or ``BatchNorm3d`` (rank 5), with every setting and all state copied: the same
    function in eval mode, and the same per-process statistics in training. The rank comes from
    a run on ``example_inputs`` (required). Plain BatchNorms are left alone.

``"group"`` and ``"layer"`` change the function by design (per-sample statistics instead of stored
ones); :attr:`SwapResult.drift` says by how much on ``example_inputs`` (eval mode), as information.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from normfold.check.model_run import run_model
from normfold.codes.kept import Kept
from normfold.errors import UsageError
from normfold.prepare import as_inputs, working_copy
from normfold.transforms.swap_drift import Drift, drift_of
from normfold.transforms.swap_modules import (
    ChannelsLayerNorm,
    FrozenBatchNorm,
    factory_kwargs,
    move_affine,
    move_stats,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_DEFAULT_GROUPS",
    "TARGETS",
    "ChannelsLayerNorm",
    "Drift",
    "FrozenBatchNorm",
    "NotSwapped",
    "SwapResult",
    "Swapped",
    "default_num_groups",
    "swap_norms",
]

Target = Literal["group", "layer", "frozen", "batch"]
ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

TARGETS: tuple[str, ...] = ("group", "layer", "frozen", "batch")
#: the default group count is at most this (the GroupNorm paper's G = 32)
MAX_DEFAULT_GROUPS = 32

_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_BATCHNORM_BY_RANK: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


# --- records ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swapped:
    """A BatchNorm module that was replaced."""

    module: str  # path (first name it is registered under)
    from_type: str
    to_type: str
    num_features: int
    num_groups: int | None = None  # "group" only
    input_ranks: tuple[int, ...] = ()  # ranks seen on example_inputs (empty: not run / not called)
    aliases: tuple[str, ...] = ()  # other names the same module is registered under (also replaced)
    note: str | None = None


@dataclass(frozen=True)
class NotSwapped(Kept):
    """A BatchNorm module left in place, with a stable code and a readable reason."""

    module: str
    module_type: str
    code: str  # custom_forward, uninitialized, no_statistics, bad_statistics, not_sync, not_called
    reason: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class SwapResult:
    """What :func:`swap_norms` produced: the model, one record per BatchNorm, the drift."""

    model: nn.Module
    to: str
    swapped: tuple[Swapped, ...] = ()
    skipped: tuple[NotSwapped, ...] = ()
    drift: Drift | None = None  # None without example_inputs or when nothing was swapped

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "to": self.to,
            "swapped": [asdict(s) for s in self.swapped],
            "skipped": [asdict(s) for s in self.skipped],
            "drift": None if self.drift is None else self.drift.to_dict(),
        }


@dataclass(frozen=True)
class _Request:
    to: str
    num_groups: int | None
    group_size: int | None
    trainable_affine: bool
    has_inputs: bool


# --- API --------------------------------------------------------------------------------------------


def default_num_groups(num_channels: int) -> int:
    """The largest divisor of ``num_channels`` that is <= 32 and leaves >= 2 channels per group (else 1).

    64 -> 32, 48 -> 24, 30 -> 15, 7 -> 1, 2 -> 1, 1 -> 1.
    """
    limit = min(MAX_DEFAULT_GROUPS, num_channels // 2)
    return max((g for g in range(1, limit + 1) if num_channels % g == 0), default=1)


def swap_norms(
    model: nn.Module,
    to: Target,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    example_inputs: ExampleInputs | None = None,
    inplace: bool = False,
    trainable_affine: bool = False,
) -> SwapResult:
    """Replace every BatchNorm in ``model`` by the normalization ``to`` names (see the module docstring).

    ``num_groups``/``group_size`` (one of them) choose the GroupNorm groups for ``to="group"``;
    ``trainable_affine`` keeps ``weight``/``bias`` trainable for ``to="frozen"``.
    ``example_inputs`` (a tensor or a tuple of tensors) are run once before the swap (recording
    each BatchNorm's input rank) and once after (:attr:`SwapResult.drift`). The input model is
    left untouched unless ``inplace=True``; the returned model keeps the user's class, module
    names and training flags. A model that is itself a BatchNorm is returned as its replacement.
    Raises :class:`UsageError` for an impossible request, before anything is changed, and
    :class:`~normfold.errors.TraceError` when the model fails on ``example_inputs``.
    """
    request = _request(model, to, num_groups, group_size, trainable_affine, example_inputs is not None)
    inputs = None if example_inputs is None else as_inputs(example_inputs, "swap_norms")
    model = working_copy(model, "swap_norms", inplace=inplace)
    ranks, reference = _observe(model, inputs) if inputs is not None else ({}, None)
    replacements, swapped, skipped = _plan(model, request, ranks)
    model = _replace(model, replacements)
    drift = drift_of(model, inputs, reference) if inputs is not None and swapped else None
    logger.info("swapped %d norm(s) to %r, skipped %d", len(swapped), to, len(skipped))
    return SwapResult(model, to, tuple(swapped), tuple(skipped), drift)


# --- checks -----------------------------------------------------------------------------------------


def _request(
    model: Any, to: Any, num_groups: Any, group_size: Any, trainable_affine: Any, has_inputs: bool
) -> _Request:
    if not isinstance(model, nn.Module):
        raise UsageError(f"swap_norms() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(to, str) or to not in TARGETS:
        raise UsageError(f"swap_norms(): to must be one of {', '.join(map(repr, TARGETS))}, got {to!r}")
    for name, value in (("num_groups", num_groups), ("group_size", group_size)):
        _check_group_option(name, value, to)
    if num_groups is not None and group_size is not None:
        raise UsageError(
            f"swap_norms(): pass num_groups or group_size, not both "
            f"(got num_groups={num_groups}, group_size={group_size})"
        )
    if not isinstance(trainable_affine, bool):
        raise UsageError(f"swap_norms(): trainable_affine must be a bool, got {trainable_affine!r}")
    if trainable_affine and to != "frozen":
        raise UsageError(f"swap_norms(): trainable_affine applies to to='frozen' only, got to={to!r}")
    return _Request(to, num_groups, group_size, trainable_affine, has_inputs)


def _check_group_option(name: str, value: Any, to: str) -> None:
    if value is None:
        return
    if to != "group":
        raise UsageError(f"swap_norms(): {name} applies to to='group' only, got to={to!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"swap_norms(): {name} must be a positive int, got {value!r}")


def _observe(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, set[int]], Any]:
    """Run ``model`` once (eval, no grad): each BatchNorm's input ranks, and the outputs."""
    ranks: dict[int, set[int]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(module), set()).add(args[0].dim())

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        outputs = run_model(model, inputs, role="original")
    finally:
        for handle in handles:
            handle.remove()
    return ranks, outputs


# --- plan and apply ---------------------------------------------------------------------------------


def _plan(
    model: nn.Module, request: _Request, ranks: dict[int, set[int]]
) -> tuple[dict[int, nn.Module], list[Swapped], list[NotSwapped]]:
    """Every replacement module and record; raises before the model is changed."""
    names: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(path)
    replacements: dict[int, nn.Module] = {}
    swapped: list[Swapped] = []
    skipped: list[NotSwapped] = []
    for path, bn in model.named_modules():
        if not isinstance(bn, _BatchNorm):
            continue
        seen = ranks.get(id(bn), set())
        aliases = tuple(n for n in names[id(bn)] if n != path)
        skip = _skip_reason(bn, request, seen)
        if skip is not None:
            skipped.append(NotSwapped(path, type(bn).__name__, *skip, aliases=aliases))
            continue
        new, groups, note = _BUILDERS[request.to](path, bn, request, seen)
        replacements[id(bn)] = new.train(bn.training)
        swapped.append(
            Swapped(path, type(bn).__name__, type(new).__name__, bn.num_features, groups,
                    tuple(sorted(seen)), aliases, note)
        )  # fmt: skip
    return replacements, swapped, skipped


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """One walk: every name a replaced module is registered under gets its replacement."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]
    return replacements.get(id(model), model)


def _skip_reason(bn: _BatchNorm, request: _Request, ranks: set[int]) -> tuple[str, str] | None:
    cls = type(bn).__name__
    if type(bn).forward not in _PLAIN_FORWARDS:
        return "custom_forward", f"{cls} overrides forward: a swap would lose its extra behaviour"
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        return "uninitialized", f"{cls} has uninitialized parameters: run the model once before swapping"
    if request.to == "frozen" and (not bn.track_running_stats or bn.running_mean is None):
        return "no_statistics", "track_running_stats=False: no stored statistics to freeze"
    if request.to == "frozen" and not _finite_statistics(bn):
        return "bad_statistics", "non-finite statistics or running_var + eps <= 0: frozen outputs not finite"
    if request.to == "batch" and not isinstance(bn, nn.SyncBatchNorm):
        return "not_sync", f"already a {cls}: to='batch' converts SyncBatchNorm only"
    if request.to == "batch" and request.has_inputs and not ranks:
        return "not_called", "never called on example_inputs: its input rank (BatchNorm1d/2d/3d) is unknown"
    return None


def _finite_statistics(bn: _BatchNorm) -> bool:
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    return bool(mean.isfinite().all() and var.isfinite().all() and (var + bn.eps > 0).all())


# --- one builder per target: (path, bn, request, ranks) -> (new module, groups, note) -----------------

_Built = tuple[nn.Module, int | None, str | None]


def _to_group(path: str, bn: _BatchNorm, request: _Request, ranks: set[int]) -> _Built:
    groups = _num_groups(path, bn, request)
    new = nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine, **factory_kwargs(bn))
    move_affine(bn, new)
    return new, groups, None


def _num_groups(path: str, bn: _BatchNorm, request: _Request) -> int:
    c, where = bn.num_features, f"swap_norms(to='group'): {path or '<model>'} ({type(bn).__name__})"
    if request.num_groups is not None:
        if c % request.num_groups:
            raise UsageError(f"{where} has C={c} channels, not divisible by num_groups={request.num_groups}")
        return request.num_groups
    if request.group_size is not None:
        if c % request.group_size:
            raise UsageError(f"{where} has C={c} channels, not divisible by group_size={request.group_size}")
        return c // request.group_size
    return default_num_groups(c)


def _to_layer(path: str, bn: _BatchNorm, request: _Request, ranks: set[int]) -> _Built:
    unknown = "not called on example_inputs" if request.has_inputs else "no example_inputs"
    f, c = factory_kwargs(bn), bn.num_features
    new: nn.Module
    if ranks == {2} or (not ranks and isinstance(bn, nn.BatchNorm1d)):
        new = nn.LayerNorm(c, eps=bn.eps, elementwise_affine=bn.affine, bias=bn.affine, **f)
        note = None if ranks else f"input rank unknown ({unknown}): assumed (N, C), not (N, C, L)"
    else:
        new = ChannelsLayerNorm(c, eps=bn.eps, affine=bn.affine, **f)
        plain = ranks or isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d))
        note = None if plain else f"input rank unknown ({unknown}): channels LayerNorm, exact for any rank"
    move_affine(bn, new)
    return new, None, note


def _to_frozen(path: str, bn: _BatchNorm, request: _Request, ranks: set[int]) -> _Built:
    return FrozenBatchNorm.from_batchnorm(bn, trainable_affine=request.trainable_affine), None, None


def _to_batch(path: str, bn: _BatchNorm, request: _Request, ranks: set[int]) -> _Built:
    where = f"{path or '<model>'} ({type(bn).__name__})"
    if not ranks:
        raise UsageError(
            f"swap_norms(to='batch') needs example_inputs to choose BatchNorm1d/2d/3d for {where}: "
            "its input rank is only known from a run"
        )
    classes = {_BATCHNORM_BY_RANK.get(r) for r in ranks}
    if len(classes) != 1 or None in classes:
        raise UsageError(
            f"swap_norms(to='batch'): {where} sees inputs of rank {sorted(ranks)}; one BatchNorm class "
            "needs ranks 2-3 (BatchNorm1d), 4 (BatchNorm2d) or 5 (BatchNorm3d)"
        )
    cls = _BATCHNORM_BY_RANK[min(ranks)]
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory_kwargs(bn))
    move_affine(bn, new)
    move_stats(bn, new)
    return new, None, None


_BUILDERS = {"group": _to_group, "layer": _to_layer, "frozen": _to_frozen, "batch": _to_batch}


