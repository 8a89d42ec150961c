"""Checks decided from what is on disk, before torch is imported (a usage or file error comes
back in a fraction of a second instead of after a 5-20 s import).

* the output files' rule (:func:`normfold.io.files.check_outputs`: suffix, folder, not a directory,
  not a link, not an input, no overwrite without ``--force``);
* the model source: a factory spec whose top-level package exists (installed or in the working
  directory: a typo is answered at once), or a regular file whose first bytes or zip entries do
  not say it is a model normfold refuses (TorchScript, a ``torch.export`` program, ONNX); a
  ``.safetensors`` file (weights only) needs ``--model``, itself such a factory spec;
* tensor files (``--inputs``, ``--calibrate``, ``--data``): regular, non-empty, not a model;
* ``--opset`` within the exporter's range (the top needs ``onnx``, imported only when
  ``--opset`` is given: ~4 s against torch's ~9 s on a loaded 2-core machine, and an ``.onnx``
  export imports it anyway) and ``--providers`` installed in onnxruntime (~0.6 s).

The byte checks (a regular file, the kind from its first bytes or zip entries, the zip bomb
check) are the loader's own (:mod:`normfold.io.sniff`, torch-free, as ``import normfold`` is: its
public API is imported lazily): the loader (:mod:`normfold.io.load`, :mod:`normfold.io.tensor_files`)
runs them again with the same messages. Everything else (unpickling, shapes, the model's forward)
is the library's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from normfold.errors import LoadError, UsageError
from normfold.io.sniff import check_regular_file, refuse_compiled, sniff
from normfold.options import ExportOptions, LoadOptions, WriteOptions, check_lower_kept

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: the torch.onnx (dynamo) exporter's own opsets start here (normfold.io.export.MIN_OPSET)
MIN_OPSET = 18
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
    onnx: bool = False,
) -> None:
    """Every check of the module docstring, outputs first (as the library orders them); with
    ``onnx``, ``source`` is an ONNX model (:func:`is_onnx`): a regular file, sniffed by the library."""
    from normfold.io.files import check_outputs

    files = {k: v for k, v in (tensor_files or {}).items() if v is not None}
    outputs = {"out": out, "report": write.report, "save_inputs": write.save_inputs}
    check_outputs(outputs, inputs=[source, *files.values()], force=write.force, formats=formats)
    if onnx:
        check_regular_file(Path(source), "ONNX file")
    else:
        check_source(source, load or LoadOptions())
    for what, path in files.items():
        check_tensor_file(path, what)
    if export is not None:
        check_lower_kept(export.lower_kept)
        check_opset(export.opset)
        check_providers(export.providers)


def is_onnx(source: str) -> bool:
    """The model argument names an ONNX model, which ``fold`` and ``inspect`` fold as a graph: a
    ``.onnx`` name (the library tells a file that is not ONNX from its bytes), or a regular file
    whose first bytes are an ONNX protobuf's, whatever its name."""
    path = Path(source)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False
    return regular and sniff(path) == "onnx"


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
    check_regular_file(path, "file (and not a factory spec like package.module:callable)")
    refuse_compiled(path, sniff(path), onnx_fold="`normfold fold`", alternative=_SAFE_ALTERNATIVE)
    if load.model is not None:
        _check_factory_module(load.model)
    if path.suffix == ".safetensors" and load.model is None:
        raise UsageError(
            f"{path} holds weights only (safetensors); pass the architecture with --model "
            "package.module:callable"
        )


def _check_factory_module(spec: str) -> None:
    """The top-level package of a factory spec exists, installed or in the working directory
    (where :func:`normfold.io.load.resolve_factory` also looks), found without importing anything."""
    module_name = spec.partition(":")[0]
    top = module_name.partition(".")[0]
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return
    if importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None:
        return
    raise LoadError(f"cannot import {module_name!r} for factory {spec!r}: No module named {top!r}")


def check_tensor_file(path: Path, what: str) -> None:
    """A file of tensors (inputs, calibration batches): regular, not a model, not empty."""
    check_regular_file(path, f"{what} file")
    if sniff(path) != "other":  # also the zip bomb check
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
