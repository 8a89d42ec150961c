"""What every transform does first with the caller's arguments: check the model, take the copy it
changes, and turn the example inputs and the dynamic-shape arguments into what a capture needs.

Shared by :func:`normfold.fold` and the training transforms (:mod:`normfold.transforms.bias`,
:mod:`normfold.transforms.calibration`, :mod:`normfold.transforms.swap`), so none of them imports the fold
orchestrator for its helpers. Nothing here captures, plans or runs a model.

* :func:`working_copy`: the model itself with ``inplace=True``, else ``copy.deepcopy(model)``.
* :func:`borrowing_copy` / :func:`own_tensors`: :func:`normfold.fold`'s working copy in two steps. The
  modules are copied at once, the parameters and buffers only once the plan is applied, and then
  only those it left unchanged (a folded weight gets a new tensor anyway: copying it first is wasted
  time, the largest part of a fold's cost over its capture on a model with little else to do).
* :func:`as_inputs`: a tensor or a sequence of tensors as a tuple of *clones* (a forward that
  changes its input in place never changes the caller's tensors).
* :func:`check_materialized`: refuse weights without values (meta tensors, lazy modules).
* :func:`capture_options`: ``dynamic_batch`` and ``dynamic_axes`` (``{input index: {axis: name}}``)
  as :class:`~normfold.engine.capture.CaptureOptions`, each axis checked against the inputs' shapes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from normfold.engine.capture import CaptureOptions
from normfold.errors import UsageError

__all__ = [
    "ExampleInputs",
    "as_inputs",
    "borrowing_copy",
    "capture_options",
    "check_materialized",
    "own_tensors",
    "working_copy",
]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def working_copy(model: nn.Module, caller: str, *, inplace: bool) -> nn.Module:
    """The module a transform changes: ``model`` itself with ``inplace=True``, else a deep copy."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"{caller}() expects a torch.nn.Module, got {type(model).__name__}")
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise UsageError(
            f"could not copy {type(model).__name__} (pass inplace=True to change it in place): {e}"
        ) from e


def borrowing_copy(model: nn.Module, caller: str) -> tuple[nn.Module, frozenset[int]]:
    """A copy of ``model``'s modules that still holds ``model``'s own parameters and buffers (the
    same tensor objects), and the storages of those tensors (their ``data_ptr``). Until
    :func:`own_tensors` has run, nothing may change those tensors in place or run the copy's
    ``forward`` (which may update a buffer): a capture (fake tensors) and a plan only read them,
    and applying a plan gives each changed weight a new tensor."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"{caller}() expects a torch.nn.Module, got {type(model).__name__}")
    check_materialized(model)  # a lazy parameter has no storage yet
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    memo: dict[int, object] = {id(t): t for _, t in named}  # deepcopy's memo: these "copy" to themselves
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as e:
        raise UsageError(
            f"could not copy {type(model).__name__} (pass inplace=True to change it in place): {e}"
        ) from e
    return copied, frozenset(p for _, t in named if (p := t.untyped_storage().data_ptr()))


def own_tensors(
    module: nn.Module, borrowed: frozenset[int], states: Sequence[dict[str, torch.Tensor]] = ()
) -> None:
    """Give ``module`` its own copy of every tensor that still uses a borrowed storage (a
    ``data_ptr`` in ``borrowed``: the borrowed tensor itself, or a view of it, e.g. a float64
    value that ``.to(torch.float64)`` returned as is), and point the entries of ``states`` (an
    exported program's ``state_dict`` and ``constants``) that did at the same copy. One
    ``deepcopy`` of them all: a tensor under two names stays one tensor, views of one storage stay
    views (as ``copy.deepcopy(model)`` keeps them)."""

    def borrowing(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in borrowed

    slots = [
        (m._parameters if name in m._parameters else m._buffers, name)
        for m in module.modules()
        for name, t in [*m._parameters.items(), *m._buffers.items()]
        if borrowing(t)
    ]
    slots += [(state, name) for state in states for name, t in state.items() if borrowing(t)]
    if not slots:
        return
    originals = {id(d[name]): d[name] for d, name in slots}
    copies = copy.deepcopy(originals)
    for d, name in slots:
        d[name] = copies[id(d[name])]
    for m in module.modules():
        if isinstance(m, nn.RNNBase):  # it also lists its weights in a plain list: rebuilt from the slots
            m._init_flat_weights()


def as_inputs(example_inputs: ExampleInputs | None, caller: str = "fold") -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, or a UsageError naming ``caller``."""
    if example_inputs is None:
        raise UsageError(f"{caller}() needs example_inputs: torch.export runs the model on them once")
    # copies: a forward that changes its input in place must not change the caller's tensors
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs.clone(),)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(t.clone() for t in example_inputs)
    raise UsageError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights have no values yet: meta tensors or lazy modules. (Not a
    module at all is for :func:`working_copy` to refuse, naming the caller.)"""
    if not isinstance(model, nn.Module):
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise UsageError(
                f"{name} is not initialized yet (a lazy module): run the model once on a real input "
                "before folding it"
            )
        if t.is_meta:
            raise UsageError(
                f"{name} is on the meta device (it has no values to fold): load the weights first, "
                "e.g. model.to_empty(device='cpu') and load_state_dict"
            )


def capture_options(
    inputs: Sequence[torch.Tensor],
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[int, Mapping[int, str]] | None = None,
) -> CaptureOptions:
    """:class:`CaptureOptions` from the API's arguments, checked against the inputs."""
    axes = []
    for index, spec in (dynamic_axes or {}).items():
        for axis, name in spec.items():
            valid = isinstance(index, int) and isinstance(axis, int) and 0 <= index < len(inputs)
            if not (valid and 0 <= axis < inputs[index].dim()):
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise UsageError(
                    f"dynamic axis {name!r}: input {index!r} has no axis {axis!r} (inputs: {shapes})"
                )
            if not (isinstance(name, str) and name.isidentifier()):
                raise UsageError(f"dynamic_axes: the name of input {index} axis {axis} must be an identifier")
            if name in [n for _, _, n in axes] or (name == "batch" and dynamic_batch):
                raise UsageError(f"dynamic axis name {name!r} is used twice (the batch axis is 'batch')")
            axes.append((index, axis, name))
    return CaptureOptions(dynamic_batch=dynamic_batch, axes=tuple(axes))
