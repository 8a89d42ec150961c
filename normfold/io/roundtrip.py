"""Save a folded module's weights, and rebuild the folded module from the user's own class.

``fold`` changes a module's structure as well as its values: folded norms become ``nn.Identity``,
merged branches :class:`~normfold.engine.reparam_eager.MergedBranch`, a conv that absorbs a norm's shift
gains a bias, a bias made redundant is dropped. So ``MyNet().load_state_dict(folded.state_dict())``
fails (missing ``bn*`` keys, an unexpected conv bias). :func:`save_folded` writes the state dict
together with those structural edits (a JSON manifest: no code, nothing to unpickle), and
:func:`load_folded` replays them on a fresh instance of the class, then loads the weights with
``strict=True`` (every key and shape checked)::

    normfold.save_folded(result.model, "folded.safetensors")      # after normfold.fold(...)
    model = normfold.load_folded(MyNet(), "folded.safetensors")   # in the serving process

The manifest lists, by module path, every module of the types a fold or a merge puts in place
(``nn.Identity``, ``MergedBranch``, convolutions, ``nn.Linear``) with its constructor arguments,
and every parameter slot that holds ``None``; where the fresh instance has another module there,
the recorded one is built in its place. A norm module rebuilt without its norm
(:class:`~normfold.engine.rebuild.Remainder`, a BatchNorm subclass with its own activation) is listed
with its steps (child names and ``torch.ops.aten`` op names, as data) and rebuilt around the fresh
instance's module at that path, whose children and parameters then receive the saved weights.
Formats: ``.safetensors`` (the manifest in its string metadata) or ``.pt``/``.pth`` (a dict
``{"state_dict": ..., "normfold_structure": json}``, loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.engine.rebuild import Recipe, Remainder
from normfold.engine.reparam_eager import MergedBranch
from normfold.errors import LoadError, UsageError, first_line
from normfold.io.files import OutputSet

__all__ = ["load_folded", "save_folded"]

_KEY = "normfold_structure"
_VERSION = 1
_FORMATS = (".safetensors", ".pt", ".pth")


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
         "padding_mode")  # fmt: skip
_CONV_T = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
           "dilation", "padding_mode")  # fmt: skip
#: the module types a fold or a merge puts in place, and the constructor arguments that rebuild them
_REBUILT: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Identity": (nn.Identity, ()),
    "MergedBranch": (MergedBranch, ("out_channels", "kernel_size", "stride", "padding", "dilation")),
    **{
        cls.__name__: (cls, _CONV)
        for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    },
    **{
        cls.__name__: (cls, _CONV_T)
        for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    },
    "Linear": (nn.Linear, ("in_features", "out_features")),
}
#: rebuilt from the fresh instance's own module and the manifest's steps (:mod:`normfold.engine.rebuild`)
_REBUILT_BY_DATA: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {"Remainder": (Remainder, ())}


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The modules a fold or a merge can put in place, with their constructor arguments, and the
    empty parameter slots, as they stand in ``model`` (JSON-able)."""
    modules: dict[str, Any] = {}
    empty: list[str] = []
    for name, module in model.named_modules():
        kind = _REBUILT.get(type(module).__name__)
        if name and type(module) is Remainder:  # a norm module without its norm: its steps, as data
            modules[name] = {"type": "Remainder", **module.recipe.to_json()}
        elif name and kind is not None and type(module) is kind[0]:
            args = {a: _plain(getattr(module, a)) for a in kind[1]}
            modules[name] = {"type": type(module).__name__, **args}
        empty += [f"{name}.{p}" if name else p for p, v in module._parameters.items() if v is None]
    return {"version": _VERSION, "modules": modules, "empty_parameters": sorted(empty)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_folded(model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
    """Write ``model``'s state dict and its structural edits to ``path`` (``.safetensors``,
    ``.pt`` or ``.pth``) atomically (the rule of :mod:`normfold.io.files`); :func:`load_folded`
    rebuilds the module from a fresh instance of its class."""
    manifest = json.dumps(structure_of(model), sort_keys=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with OutputSet({"out": path}, force=force, formats={"out": _FORMATS}) as files:
        staged = files.staged("out")
        if staged.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(staged), metadata={_KEY: manifest})
        else:
            torch.save({"state_dict": state, _KEY: manifest}, staged)
        files.commit()
    return Path(path)


def load_folded(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild, in place, the folded module that :func:`save_folded` wrote to ``path`` from
    ``model``, a fresh instance of the original class (built as for the fold): its modules and
    parameter slots are edited as the manifest says, then the weights are loaded with
    ``strict=True``. Returns ``model`` (in eval mode). Raises :class:`LoadError` when the file is
    not such a file, or when ``model`` does not have the structure the weights need."""
    path = Path(path)
    state, manifest = _read(path)
    try:
        _replay(model, manifest, state)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, AttributeError, TypeError, ValueError) as e:
        raise LoadError(
            f"{path}: the folded weights do not fit {type(model).__name__}: {first_line(e)} (build it as "
            "for the fold: the same class and arguments)"
        ) from e
    return model.eval()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the manifest, read as safely as any weights file (:mod:`normfold.io.load`)."""
    from normfold.io.load import _check_regular_file, _load_safetensors, _torch_load

    if path.suffix not in _FORMATS:
        shown = path.suffix or "(none)"
        raise UsageError(f"path={path}: unknown format {shown}; use {' or '.join(_FORMATS)}")
    _check_regular_file(path, "file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state: Any = _load_safetensors(path)  # its header checked before anything is read
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(_KEY)
    else:
        obj = _torch_load(path, trust=False)  # weights_only
        text = obj.get(_KEY) if isinstance(obj, dict) else None
        state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not isinstance(state, dict):
        raise LoadError(f"{path} was not written by normfold.save_folded (no {_KEY} manifest)")
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise LoadError(f"{path}: its {_KEY} manifest is not valid JSON") from e
    if not isinstance(manifest, dict) or manifest.get("version") != _VERSION:
        raise LoadError(f"{path}: manifest version {manifest.get('version')!r} is not {_VERSION}")
    return state, manifest


def _replay(model: nn.Module, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Apply the manifest's module replacements and empty parameter slots to ``model``, and give
    every slot the weights fill a parameter."""
    for name, spec in sorted(manifest["modules"].items(), key=lambda kv: kv[0].count(".")):  # parents first
        cls, arg_names = _REBUILT.get(spec["type"]) or _REBUILT_BY_DATA[spec["type"]]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if child not in parent._modules:
            raise KeyError(f"{type(model).__name__} has no module {name}")
        if spec["type"] == "Remainder":  # built from the fresh module: its children and parameters
            parent._modules[child] = Remainder(parent._modules[child], Recipe.from_json(spec))
            continue
        if type(parent._modules[child]) is cls:
            continue  # the class's own module: its weights (and a filled bias slot) are loaded below
        args = [tuple(spec[a]) if isinstance(spec[a], list) else spec[a] for a in arg_names]
        parent._modules[child] = cls(*args) if spec["type"] == "MergedBranch" else cls(
            *args[:2], **dict(zip(arg_names[2:], args[2:], strict=True)), bias=False
        )  # its bias slot is filled below when the weights have one
    for key in manifest["empty_parameters"]:
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr not in owner._parameters:
            raise KeyError(f"{type(model).__name__} has no parameter {key}")
        owner._parameters[attr] = None
    # a slot the fold filled (a conv's new bias): a placeholder of the saved tensor's kind
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters and owner._parameters[attr] is None:
            owner._parameters[attr] = nn.Parameter(torch.empty_like(value), requires_grad=False)
