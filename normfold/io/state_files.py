"""Tensors written to a file with ``torch.save`` or safetensors: a model's state dict, the parity
input sets of a run.

Serialized in memory first, then written with Python's I/O (:func:`write_via_memory`): torch's zip
writer aborts the whole process (or fails cryptically) on a full disk, where Python raises an
``OSError`` that is reported with the file's name. A state dict is written through an
:class:`~normfold.io.files.OutputSet` (staged beside the destination, committed after it is
complete, never overwriting without ``force``); safetensors gets clones (it refuses shared storage).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from normfold.check.input_sets import InputSet
from normfold.errors import ExportError, NormfoldError, first_line
from normfold.io.files import STATE_FORMATS, OutputSet

__all__ = ["save_sets", "stage_state_dict", "write_state_dict", "write_via_memory"]


def write_state_dict(model: nn.Module, out: str | Path, *, force: bool = False) -> Path:
    """Write ``model.state_dict()`` to ``out`` (``.pt``/``.pth`` or ``.safetensors``) atomically."""
    with OutputSet({"out": out}, force=force, formats={"out": STATE_FORMATS}) as files:
        stage_state_dict(model, files)
        files.commit()
    return Path(out)


def stage_state_dict(model: nn.Module, files: OutputSet) -> None:
    """Write ``model.state_dict()`` into ``files``' staged ``out``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    staged = files.staged("out")
    try:
        if staged.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.clone() for k, v in state.items()}, str(staged))  # no shared storage
        else:
            write_via_memory(staged, lambda f: torch.save(state, f))
    except NormfoldError:
        raise
    except Exception as e:
        raise ExportError(f"writing {files.paths['out']} failed: {first_line(e)}") from e


def save_sets(path: Path, sets: Sequence[InputSet]) -> None:
    """Write parity input sets as ``{set name: [tensors]}`` (``torch.save``, CPU tensors; loads
    with ``torch.load(path, weights_only=True)``)."""
    data = {s.name: [t.detach().cpu() for t in s.inputs] for s in sets}
    write_via_memory(path, lambda f: torch.save(data, f))


def write_via_memory(path: Path, save: Callable[[io.BytesIO], None]) -> None:
    """Serialize in memory, then write with Python's I/O: torch's zip writer aborts the whole
    process (or fails cryptically) on a full disk; Python raises an OSError we can report."""
    buffer = io.BytesIO()
    save(buffer)
    try:
        path.write_bytes(buffer.getbuffer())
    except OSError as e:
        raise ExportError(f"writing {path.name} failed: {e.strerror or e}") from e
