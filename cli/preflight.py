"""Checks decided from what is on disk, before torch is imported (a usage or file error comes
back in a fraction of a second instead of after a 5-20 s import).

* the output files' rule (:func:`normfold.files.check_outputs`: suffix, folder, not a directory,
  not a link, not an input, no overwrite without ``--force``);
* the model source: a factory spec whose top-level package exists (installed or in the working
  directory: a typo is answered at once), or a regular file whose first bytes or zip entries do
  not say it is a model normfold refuses (TorchScript, a ``torch.export`` program, ONNX); a
  ``.safetensors`` file (weights only) needs ``--model``, itself such a factory spec;
* tensor files (``--inputs``, ``--calibrate``, ``--data``): regular, non-empty, not a model;
* ``--opset`` within the exporter's range (the top needs ``onnx``, imported only when
  ``--opset`` is given: ~4 s against torch's ~9 s on a loaded 2-core machine, and an ``.onnx``
  export imports it anyway) and ``--providers`` installed in onnxruntime (~0.6 s).

The loader (:mod:`normfold.load`) decides the same facts again with the same messages when it
runs: the byte checks here are a torch-free copy of its ``_check_regular_file``/``_sniff``
(that module imports torch at its top). Everything else (unpickling, shapes, the model's
forward) is the library's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import stat
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from normfold.errors import LoadError, UsageError, first_line
from normfold.options import ExportOptions, LoadOptions, WriteOptions

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: the torch.onnx (dynamo) exporter's own opsets start here (normfold.export.MIN_OPSET)
MIN_OPSET = 18
_ZIP_MAX_RATIO, _ZIP_MIN_ALLOWANCE = 16, 64 * 2**20  # normfold.load.ZIP_MAX_RATIO / ZIP_MIN_ALLOWANCE
_SAFE_ALTERNATIVE = (
    "save the weights instead with torch.save(model.state_dict(), 'weights.pt') and pass the "
    "architecture with --model package.module:callable"
)


def check(
    source: str,
    out: Path | None,
    *,
    load: LoadOptions | None = None,
    write: WriteOptions,
    formats: Mapping[str, Sequence[str]],
    tensor_files: Mapping[str, Path | None] | None = None,
    export: ExportOptions | None = None,
) -> None:
    """Every check of the module docstring, outputs first (as the library orders them)."""
    from normfold.files import check_outputs

    files = {k: v for k, v in (tensor_files or {}).items() if v is not None}
    outputs = {"out": out, "report": write.report, "save_inputs": write.save_inputs}
    check_outputs(outputs, inputs=[source, *files.values()], force=write.force, formats=formats)
    check_source(source, load or LoadOptions())
    for what, path in files.items():
        check_tensor_file(path, what)
    if export is not None:
        check_opset(export.opset)
        check_providers(export.providers)


def check_source(source: str, load: LoadOptions) -> None:
    """The model argument: a factory spec, or a file the loader may read (module docstring)."""
    if load.model is not None and not _SPEC.match(load.model):
        raise UsageError(f"{load.model!r} is not a factory spec of the form package.module:callable")
    path = Path(source)
    if _SPEC.match(source) and not path.exists():
        if load.model is not None:
            raise UsageError(f"{source} is already a factory spec; --model is only for weights files")
        _check_factory_module(source)
        return
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
    if load.model is not None:
        _check_factory_module(load.model)
    if path.suffix == ".safetensors" and load.model is None:
        raise UsageError(
            f"{path} holds weights only (safetensors); pass the architecture with --model "
            "package.module:callable"
        )


def _check_factory_module(spec: str) -> None:
    """The top-level package of a factory spec exists, installed or in the working directory
    (where :func:`normfold.load.resolve_factory` also looks), found without importing anything."""
    module_name = spec.partition(":")[0]
    top = module_name.partition(".")[0]
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return
    if importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None:
        return
    raise LoadError(f"cannot import {module_name!r} for factory {spec!r}: No module named {top!r}")


def check_tensor_file(path: Path, what: str) -> None:
    """A file of tensors (inputs, calibration batches): regular, not a model, not empty."""
    _check_regular_file(path, f"{what} file")
    if _sniff(path) != "other":
        raise LoadError(f"{path} is not a readable tensor file: it is a model, not torch.save'd tensors")
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is not a readable tensor file: it is empty")


def check_opset(opset: int | None) -> None:
    """``--opset`` from :data:`MIN_OPSET` to the installed onnx's newest."""
    if opset is None:
        return
    import onnx.defs

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise UsageError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {top}")


def check_providers(providers: Sequence[str] | None) -> None:
    """Each ``--providers`` entry installed in this onnxruntime build, none twice."""
    if providers is None:
        return
    import onnxruntime as ort

    installed = ort.get_available_providers()
    for provider in providers:
        if provider not in installed:
            raise UsageError(
                f"--providers {','.join(providers)}: {provider!r} is not installed in this onnxruntime "
                f"{ort.__version__} (installed: {', '.join(installed)})"
            )
    if len(set(providers)) != len(providers):
        raise UsageError(f"--providers {','.join(providers)}: a provider is given twice")


# A torch-free copy of normfold.load's byte checks ----------------------------------------------------
_FILE_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _check_regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file, from ``os.stat`` alone (opening a FIFO blocks)."""
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


# field 1 (ir_version, a varint) first, then a length-delimited or varint ModelProto field
_ONNX_SECOND_FIELD = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


def _sniff(path: Path) -> str:
    """``onnx``, ``torchscript``, ``exported program`` or ``other``: an ONNX protobuf by its first
    fields, archives by their zip entries (a zip checked for decompression bombs first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror})") from e
    onnx = len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_FIELD
    if onnx and head[8:9] != b"{":  # a safetensors header length can start with the same bytes
        return "onnx"
    if not head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "other"
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        why = first_line(e)
        raise LoadError(f"{path} is not a readable zip archive (truncated or corrupt?): {why}") from e
    allowed = max(_ZIP_MAX_RATIO * size, _ZIP_MIN_ALLOWANCE)
    if sum(i.file_size for i in infos) > allowed:
        return "other"  # the loader refuses it with the numbers (normfold.load._check_zip)
    tails = {n.split("/", 1)[1] if "/" in n else n for n in (i.filename for i in infos)}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "exported program"
    return "other"
