"""Loading a model and its example inputs, safely.

Accepted sources, tried in this order:

* a factory spec ``package.module:callable`` (``normfold.models:resnet``) called with JSON keyword
  arguments. Importing it runs the named module's code, which the user chose explicitly.
* a ``.safetensors`` file, or a ``torch.save`` file (``.pt``/``.pth``/``.bin``/...) read with
  ``torch.load(weights_only=True)``, holding a state_dict or a checkpoint dict with a
  ``state_dict``/``model``/``model_state_dict`` key; the architecture comes from a factory spec.
* a whole pickled ``nn.Module`` (``torch.save(model)``): unpickling it can run arbitrary code,
  so it is refused unless ``trust=True``.
* TorchScript archives and ``torch.export`` programs are recognised and refused with a message
  naming the format: both are compiled graphs with no module structure left to fold, and loading
  either can run code from the file.

Nothing here ever falls back to an unsafe load silently.

Limits, checked before anything is allocated (a file or option over one is refused with one line):

* a model or tensor file must be a regular file (not a FIFO, device, directory or dangling link);
* a zip checkpoint's members may declare at most ``max(16 x file size, 64 MiB)`` uncompressed
  bytes in total (torch.save stores them uncompressed: a higher ratio is a decompression bomb);
* a safetensors header may be at most 100 MiB and must fit in the file (safetensors then checks
  every offset, dtype and shape against the byte ranges);
* example inputs hold at most :data:`~normfold.limits.MAX_INPUT_ELEMENTS` (2**28) elements in
  total, counted from their shapes (an expanded, stride-0 tensor counts every element it shows);
  each calibration batch the same, and a data file may not show more elements than it stores
  beyond that limit;
* ``model_args`` JSON text is at most 65,536 characters, nested at most 32 levels deep.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import io
import logging
import os
import pickle
import pickletools
import re
import stat
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.errors import LoadError, UsageError, first_line, printable
from normfold.limits import MAX_INPUT_ELEMENTS, input_limit_rule

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
#: A zip checkpoint's members may declare at most this many times the file's size uncompressed
#: (at least :data:`ZIP_MIN_ALLOWANCE` bytes) in total.
ZIP_MAX_RATIO = 16
ZIP_MIN_ALLOWANCE = 64 * 2**20
#: The safetensors library's own header limit, checked here before it reads anything.
SAFETENSORS_MAX_HEADER = 100 * 2**20
_SAFE_ALTERNATIVE = (
    "save the weights instead with torch.save(model.state_dict(), 'weights.pt') and pass the "
    "architecture with model=package.module:callable"
)


@dataclass
class LoadedModel:
    """A model ready to fold, and what is known about its inputs."""

    model: nn.Module
    source: str  # what was loaded, e.g. "factory normfold.models:resnet"
    input_shapes: list[tuple[int, ...]] | None = None  # default example input shapes, if known
    notes: list[str] = field(default_factory=list)  # how the model was taken (e.g. a dtype kept)
    dtype: torch.dtype | None = None  # the weights' floating dtype the architecture was cast to
    #: source files of the code the load ran (the factory's module, modules found in the working
    #: directory): inputs of the run like the weights, so never an output (a ``report`` over them
    #: would replace the user's code)
    code_files: list[Path] = field(default_factory=list)


def is_factory_spec(text: str) -> bool:
    return bool(_SPEC.match(text)) and not Path(text).exists()


class _WorkingDirFinder(importlib.abc.MetaPathFinder):
    """Finds a top-level module in the working directory, consulted only after every other
    finder failed: unlike a ``sys.path`` entry (even the last one), it cannot take a name an
    installed package owns, not even a namespace package's (``google.protobuf``)."""

    def __init__(self, folder: str, found: list[Path] | None = None) -> None:
        self.folder = folder
        self.found = found if found is not None else []  # the files of the modules it found

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if path is not None:  # a submodule: its package's own __path__ finds it
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [self.folder])
        if spec is not None and spec.has_location and spec.origin:
            self.found.append(Path(spec.origin))
        return spec


@contextlib.contextmanager
def _working_dir_importable(found: list[Path] | None = None) -> Iterator[None]:
    """Modules of the working directory importable for the block only, after everything else;
    the files of those it finds are appended to ``found``."""
    saved = list(sys.path)
    # the script's folder or '' (python -c, -m) would put the working directory first
    sys.path[:] = [p for p in saved if p not in ("", os.getcwd())]
    finder = _WorkingDirFinder(os.getcwd(), found)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.path[:] = saved


def resolve_factory(spec: str, code_files: list[Path] | None = None) -> Callable[..., Any]:
    """Import ``package.module:callable``.

    Installed modules come first; a module found only in the working directory is importable
    too (as with ``python -m``) while the factory's module is imported (and, in :func:`build`,
    while the factory runs), never before anything installed and never afterwards, so a file
    there cannot shadow an installed package (onnx, sympy, ...) then or later. ``code_files``
    collects the source files of the factory's module and of the working directory's modules
    the import found (inputs of the run: never to be written over).
    """
    if not _SPEC.match(spec):
        raise UsageError(f"{spec!r} is not a factory spec of the form package.module:callable")
    module_name, _, attr = spec.partition(":")
    try:
        with _working_dir_importable(code_files):
            obj: Any = importlib.import_module(module_name)
        if code_files is not None and getattr(obj, "__file__", None):
            code_files.append(Path(obj.__file__))
    except ImportError as e:
        raise LoadError(f"cannot import {module_name!r} for factory {spec!r}: {e}") from e
    except Exception as e:  # the module itself raised (SyntaxError, an error in its top-level code)
        raise LoadError(f"importing {module_name!r} for factory {spec!r} failed: {first_line(e)}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise LoadError(f"{module_name!r} has no attribute {attr!r} (factory {spec!r})") from e
    if not callable(obj):
        raise LoadError(f"factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(
    spec: str, model_args: Mapping[str, Any] | None = None, code_files: list[Path] | None = None
) -> tuple[nn.Module, list[tuple[int, ...]] | None]:
    """Call a factory spec; return the module and the zoo's default input shape if it is a zoo
    model. ``code_files``: see :func:`resolve_factory`."""
    factory = resolve_factory(spec, code_files)
    try:
        with _working_dir_importable(code_files):  # a factory may import its siblings lazily
            model = factory(**dict(model_args or {}))
    except Exception as e:
        raise LoadError(f"factory {spec!r} failed with arguments {dict(model_args or {})}: {e}") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    from normfold.models import spec_of

    entry = spec_of(factory)
    return model, ([tuple(s) for s in entry.input_shapes] if entry is not None else None)


def load_model(
    source: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load ``source`` (a factory spec or a file) as described in the module docstring.

    ``model`` is the factory spec that builds the architecture for a weights file; ``trust``
    allows unpickling a whole ``nn.Module``, which runs code from the file.
    """
    text = str(source)
    if is_factory_spec(text):
        if model is not None:
            raise UsageError(f"{text} is already a factory spec; model= is only for weights files")
        code: list[Path] = []
        module, shapes = build(text, model_args, code)
        return LoadedModel(module, f"factory {text}", shapes, code_files=code)

    path = Path(text)
    _check_regular_file(path, "file (and not a factory spec like package.module:callable)")
    kind = _sniff(path)
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive: it is compiled code (loading it runs that code) with no "
            f"module structure left to fold; {_SAFE_ALTERNATIVE}"
        )
    if kind == "exported program":
        raise LoadError(
            f"{path} is a torch.export program (.pt2): it is already lowered to aten operators with "
            f"no module structure left to fold; {_SAFE_ALTERNATIVE}"
        )
    if kind == "onnx":
        raise LoadError(
            f"{path} is an ONNX model, not a readable torch.save file: an exported graph has no "
            f"PyTorch module left to fold; {_SAFE_ALTERNATIVE}"
        )
    if path.suffix == ".safetensors":
        return _with_architecture(_load_safetensors(path), path, model, model_args, "safetensors")

    if model is not None and trust:
        # model= takes weights: decide from the pickle's opcodes (nothing is run) before any
        # trusted load, so a whole pickled module given with model= is never unpickled
        _refuse_pickled_object_for_model(path)
    obj = _torch_load(path, trust=trust)
    if isinstance(obj, nn.Module):
        if model is not None:
            raise UsageError(f"{path} holds a whole module; model= is only for weights files")
        cls_file = getattr(sys.modules.get(type(obj).__module__), "__file__", None)
        code = [Path(cls_file)] if cls_file else []  # the class's code ran: an input too
        return LoadedModel(obj.cpu(), f"pickled module {path} (trusted)", code_files=code)
    state = _state_dict_of(obj, path)
    return _with_architecture(state, path, model, model_args, "state_dict")


_FILE_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _check_regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file, from ``os.stat`` alone: opening a FIFO blocks, and a
    device like /dev/zero never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise LoadError(f"{path}: a symbolic link to {target!r}, which does not exist") from None
        raise LoadError(f"{path}: no such {what}") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS.items() if test(st.st_mode)), "a special file")
        raise LoadError(f"{path}: not a file but {kind}; pass a regular file")


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror})") from e


# field 1 (ir_version, a varint) first, then a length-delimited or varint ModelProto field
_ONNX_SECOND_FIELD = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


def _sniff(path: Path) -> str:
    """Tell TorchScript and torch.export archives from plain torch.save zips by their entries, and
    an ONNX protobuf by its first fields. A zip is checked for decompression bombs first."""
    head = _head(path)
    onnx = len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_FIELD
    if onnx and head[8:9] != b"{":  # a safetensors header length can start with the same bytes
        return "onnx"
    if not head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "other"
    names = _check_zip(path)
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "exported program"
    return "other"


def _check_zip(path: Path) -> list[str]:
    """The member names of a zip archive, once its declared sizes passed the bomb check.

    torch.save stores members uncompressed, and torch's reader allocates each member's declared
    uncompressed size before inflating it: a few MB of deflated zeros could claim gigabytes. The
    members together may declare ``max(ZIP_MAX_RATIO x file size, ZIP_MIN_ALLOWANCE)`` bytes.
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise LoadError(
            f"{path} is not a readable zip archive (truncated or corrupt?): {first_line(e)}"
        ) from e
    allowed = max(ZIP_MAX_RATIO * size, ZIP_MIN_ALLOWANCE)
    total = sum(i.file_size for i in infos)
    if total > allowed:
        big = max(infos, key=lambda i: i.file_size)
        raise LoadError(
            f"{path}: zip member {big.filename!r} declares {big.file_size:,} bytes uncompressed from "
            f"{big.compress_size:,} compressed; the members declare {total:,} bytes in total, over the "
            f"limit of {allowed:,} ({ZIP_MAX_RATIO}x the file's {size:,} bytes, at least "
            f"{ZIP_MIN_ALLOWANCE // 2**20} MiB): a decompression bomb? refused before reading it"
        )
    return [i.filename for i in infos]


def _refuse_pickled_object_for_model(path: Path) -> None:
    """With ``model=``, a file is a weights file: a trusted load is only for a pickled mapping (a
    checkpoint dict with non-tensor extras). Anything else (a whole module) is a usage error, told
    from the pickle's first opcodes without running any of it."""
    top = _pickled_top_level(path)
    if top in ("dict", "collections.OrderedDict"):
        return
    what = f"a pickled {top}" if top else "a pickled object that is not a dict"
    raise UsageError(
        f"{path} holds {what} (a whole module?), not a state_dict; model= is only for weights "
        "files: leave model= out to load a whole module with trust=True (it was not unpickled)"
    )


def _pickled_top_level(path: Path) -> str | None:
    """The class of the object a torch.save file pickles (``"dict"``, ``"pkg.mod.Class"``), read
    from its opcodes without unpickling; None when it cannot be told."""
    try:
        if _head(path, 4) == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:  # sizes already checked by _sniff
                names = z.namelist()  # torch reads <the first member's folder>/data.pkl
                name = f"{names[0].split('/', 1)[0]}/data.pkl" if names else None
                if name not in names:
                    return None
                with z.open(name) as f:
                    stream = io.BytesIO(f.read(1 << 16))
            skip = 0
        else:  # legacy format: magic number, protocol version and sys info pickles come first
            with open(path, "rb") as f:
                stream = io.BytesIO(f.read(1 << 16))
            skip = 3
        for _ in range(skip):  # genops stops after one pickle's STOP
            for _op in pickletools.genops(stream):
                pass
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                continue
            if isinstance(arg, str) and op.name.endswith("UNICODE"):
                strings.append(arg)
                continue
            if op.name == "EMPTY_DICT":
                return "dict"
            if op.name == "GLOBAL" and isinstance(arg, str):
                return arg.replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return ".".join(strings[-2:])
            return None
    except Exception:  # a malformed pickle: unknown, and so refused for model=
        return None
    return None


def _torch_load(path: Path, *, trust: bool) -> Any:
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is not a readable torch.save file (truncated or corrupt?): it is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_save(path):
            # weights_only reports any non-pickle bytes (text, ONNX, ...) as an UnpicklingError too
            raise LoadError(
                f"{path} is not a readable torch.save file (truncated or corrupt?): "
                "it is neither a zip archive nor a pickle"
            ) from e
        if not trust:
            raise LoadError(
                f"{path} holds pickled Python objects beyond tensors (a whole nn.Module?); unpickling "
                "them can run arbitrary code, so it is refused without trust=True. "
                f"Safer: {_SAFE_ALTERNATIVE}"
            ) from e
        logger.warning("loading %s with weights_only=False because trust=True", path)
        try:
            # Reached only with the explicit trust opt-in. The pickle's classes are imported like
            # a factory's module: the working directory's modules too (after everything installed)
            with _working_dir_importable():
                return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise LoadError(f"{path}: trusted load failed: {first_line(e2)}") from e2
    except Exception as e:
        raise LoadError(
            f"{path} is not a readable torch.save file (truncated or corrupt?): {_reason(e)}"
        ) from e


def _looks_like_torch_save(path: Path) -> bool:
    """A torch.save file is a zip archive (the default since torch 1.6) or a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    head, size = _head(path, 8), path.stat().st_size
    header = int.from_bytes(head, "little") if len(head) == 8 else None
    if header is None or header > min(size - 8, SAFETENSORS_MAX_HEADER):
        why = (
            f"only {size} bytes long" if header is None
            else f"declares a header of {header:,} bytes in a file of {size:,} bytes (at most "
            f"{SAFETENSORS_MAX_HEADER // 2**20} MiB and within the file)"
        )  # fmt: skip
        raise LoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): it {why}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _state_dict_of(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors) "
        f"or a checkpoint with a {'/'.join(_CHECKPOINT_KEYS)} key"
    )


def _with_architecture(
    state: Mapping[str, torch.Tensor],
    path: Path,
    spec: str | None,
    model_args: Mapping[str, Any] | None,
    what: str,
) -> LoadedModel:
    if spec is None:
        raise UsageError(
            f"{path} holds weights only ({what}); pass the architecture with model=package.module:callable"
        )
    code: list[Path] = []
    module, shapes = build(spec, model_args, code)
    expected = set(module.state_dict())
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    if not (set(state) & expected) and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    notes, dtype = _keep_weights_dtype(module, state, path, spec)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        detail = (
            f"{len(missing)} of the model's {len(expected)} keys are missing from the file "
            f"{_first(missing)}, {len(unexpected)} of the file's {len(state)} keys are unexpected "
            f"{_first(unexpected)}{_prefix_hint(set(state), expected)}"
        )
        if not (missing or unexpected):  # same keys, so a shape mismatch: name the tensors
            own = module.state_dict()
            mismatched = [
                f"{printable(k)} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                for k, v in state.items()
                if tuple(v.shape) != tuple(own[k].shape)
            ]
            detail = f"size mismatch: {'; '.join(mismatched[:LISTED_KEYS])}" if mismatched else first_line(e)
        raise LoadError(f"{path} does not fit {spec}: {detail}") from e
    return LoadedModel(module, f"{what} {path} into {spec}", shapes, notes, dtype, code)


#: at most this many key names are listed in a message (the counts say how many there are)
LISTED_KEYS = 5


def _first(keys: list[str], n: int = LISTED_KEYS) -> str:
    """The first ``n`` names, escaped (a key from a file may hold a newline or a terminal escape)."""
    shown = ", ".join(printable(k) for k in keys[:n])
    return "" if not keys else f"({shown}{', ...' if len(keys) > n else ''})"


def _prefix_hint(found: set[str], expected: set[str]) -> str:
    """The likeliest fix for keys that differ by a prefix (a Lightning ``model.``, a wrapper's
    ``backbone.``): the one prefix whose removal from, or addition to, the file's keys matches
    the most model keys. Linear in the number of keys: a key starts with a one- or two-part
    prefix only if that prefix is its own, so each key counts for its own two at most."""
    best: tuple[int, str] = (0, "")
    for keys, other, verb in ((found, expected, "strip"), (expected, found, "add")):
        hits: dict[str, int] = {}
        for k in keys:
            parts = k.split(".", 2)
            for d in (1, 2):
                if len(parts) > d:
                    p = ".".join(parts[:d]) + "."
                    if k[len(p) :] in other:
                        hits[p] = hits.get(p, 0) + 1
        for p, n in sorted(hits.items(), key=lambda item: (-item[1], item[0])):
            if n > best[0]:
                where = "from" if verb == "strip" else "to"
                best = (n, f"{verb} the prefix {printable(repr(p))} {where} the file's keys")
            break
    if best[0] < max(1, len(expected) / 2, len(found & expected) + 1):  # a fix, not a coincidence
        return ""
    return f"; {best[1]} and {best[0]} of the model's {len(expected)} keys match"


#: the floating dtypes a model is folded, run and exported in
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _keep_weights_dtype(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: str
) -> tuple[list[str], torch.dtype | None]:
    """Cast the built architecture to the weights' floating dtype when they all share one, so an
    fp16 checkpoint is folded and exported in fp16, not silently in the factory's fp32."""
    file_dtypes = {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    own = {v.dtype for v in module.state_dict().values() if v.is_floating_point()}
    if not file_dtypes or file_dtypes == own:
        return [], None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in file_dtypes))
    own_names = ", ".join(sorted(str(d).removeprefix("torch.") for d in own)) or "no floating tensors"
    if len(file_dtypes) > 1:
        return [
            f"the weights in {path} mix floating dtypes ({names}); each was converted to the dtype "
            f"of its tensor in {spec} ({own_names})"
        ], None
    (dtype,) = file_dtypes
    if dtype not in COMPUTE_DTYPES:  # float8: a storage format, no kernels to fold, run or export
        raise LoadError(
            f"the weights in {path} are {names}, a storage dtype normfold cannot fold, run or export "
            f"in (it computes in {', '.join(str(d).removeprefix('torch.') for d in COMPUTE_DTYPES)}); "
            "convert them first, e.g. {k: v.float() for k, v in state.items()}"
        )
    module.to(dtype)
    note = f"the weights in {path} are {names}: {spec} ({own_names}) was cast to {names} to keep them"
    return [note], dtype


def _load_tensors(path: str | Path, what: str) -> tuple[Path, Any]:
    """Whatever a ``torch.save`` file holds, read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    _check_regular_file(path, f"{what} file")
    if _sniff(path) != "other":  # also checks a zip for decompression bombs
        raise LoadError(f"{path} is not a readable tensor file: it is a model, not torch.save'd tensors")
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is not a readable tensor file: it is empty")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _looks_like_torch_save(path):  # torch's own message advises an unsafe load: not ours
            raise LoadError(
                f"{path} is not a readable tensor file: it holds pickled Python objects beyond "
                f"tensors, which are never unpickled for {what} (that can run arbitrary code from "
                "the file); save plain tensors"
            ) from e
        raise LoadError(
            f"{path} is not a readable tensor file (truncated or corrupt?): it is neither a zip "
            "archive nor a pickle"
        ) from e
    except Exception as e:
        raise LoadError(f"{path} is not a readable tensor file (weights_only load): {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    """torch's error in one line, without terminal escapes or its advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))
    if "weights_only" in text.partition(": ")[2]:
        return f"{type(e).__name__}: the safe (weights_only) loader cannot read it"
    return text


def load_inputs(path: str | Path) -> tuple[torch.Tensor, ...]:
    """Example inputs saved with ``torch.save`` (a tensor or a tuple/list of tensors), read safely."""
    path, obj = _load_tensors(path, "inputs")
    if isinstance(obj, torch.Tensor):
        inputs: tuple[torch.Tensor, ...] = (obj,)
    elif isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        inputs = tuple(obj)
    else:
        raise LoadError(f"{path} holds a {type(obj).__name__}; expected a tensor or a tuple of tensors")
    total = _check_tensors(inputs, path)
    if total > MAX_INPUT_ELEMENTS:
        raise LoadError(
            f"{path}: its inputs have {total:,} elements in total (shapes "
            f"{', '.join(str(tuple(t.shape)) for t in inputs)}), {input_limit_rule()}"
        )
    return inputs


def _check_tensors(tensors: Sequence[torch.Tensor], path: Path) -> int:
    """Plain dense CPU tensors only; their total element count, from shapes (nothing is read)."""
    total = 0
    for i, t in enumerate(tensors):
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise LoadError(
                f"{path}: tensor {i} is a {t.layout} {t.dtype} tensor on {t.device}; "
                "expected a dense (strided) CPU tensor"
            )
        total += t.numel()
    return total


def load_batches(path: str | Path) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches saved with ``torch.save``, read safely: a list of batches, each a tensor
    or a tuple of tensors (one per model input); a single tensor is one batch."""
    path, obj = _load_tensors(path, "data")
    items = [obj] if isinstance(obj, torch.Tensor) else obj
    if not isinstance(items, (list, tuple)) or not items:
        raise LoadError(f"{path} holds a {type(obj).__name__}; expected a list of batches")
    batches = []
    shown = 0
    for i, item in enumerate(items):
        batch = (item,) if isinstance(item, torch.Tensor) else item
        if (
            not isinstance(batch, (list, tuple))
            or not batch
            or not all(isinstance(t, torch.Tensor) for t in batch)
        ):
            raise LoadError(
                f"{path}: batch {i} is a {type(item).__name__}, not a tensor or a tuple of tensors"
            )
        batches.append(tuple(batch))
        elements = _check_tensors(batch, path)
        if elements > MAX_INPUT_ELEMENTS:
            raise LoadError(f"{path}: batch {i} has {elements:,} elements, {input_limit_rule()}")
        shown += elements
    stored = sum(_storage_elements(batches).values())
    if shown > max(MAX_INPUT_ELEMENTS, stored):
        raise LoadError(
            f"{path}: its batches show {shown:,} elements in total but the file stores only {stored:,} "
            f"(tensors expanded from a smaller storage, stride 0?); beyond {MAX_INPUT_ELEMENTS:,} (2**28) "
            "elements, a data file may not show more elements than it stores"
        )
    return batches


def _storage_elements(batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[int, int]:
    """Elements each distinct storage of ``batches`` holds, keyed by its data pointer."""
    stored: dict[int, int] = {}
    for batch in batches:
        for t in batch:
            storage = t.untyped_storage()
            stored[storage.data_ptr()] = max(1, storage.nbytes() // max(1, t.element_size()))
    return stored
