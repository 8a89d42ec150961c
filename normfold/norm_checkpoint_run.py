""":func:`fold_norm_checkpoint_and_write`: the norm-affine fold of a (sharded) safetensors
checkpoint folder into an out folder, with its report: one library call
(:func:`normfold.fold_norm_affine_checkpoint`) behind ``normfold fold-norms CHECKPOINT_FOLDER``.

The architecture comes from the factory spec ``LoadOptions.model`` (``"package.module:callable"``),
called under ``torch.device("meta")`` (no memory: its parameters have shapes and no values; the
factory must not read or fill their values) and cast to the checkpoint's floating dtype; the
example inputs from the usual :class:`InputSpec` (given shapes or input files, or the shapes the
factory registers). The report (``WriteOptions.report``) is the result's ``to_dict`` (records,
per-norm proofs, the norm -> consumers map in each format), written after the checkpoint is in
place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from normfold.errors import UsageError
from normfold.inputs import example_inputs
from normfold.io.factory import build
from normfold.io.files import OutputSet, check_outputs
from normfold.io.load import LoadedModel
from normfold.io.sharded import ShardedCheckpoint
from normfold.norm_affine_checkpoint import NormAffineCheckpointResult, fold_norm_affine_checkpoint
from normfold.options import InputSpec, LoadOptions, WriteOptions
from normfold.report import write_json

__all__ = ["fold_norm_checkpoint_and_write"]


def fold_norm_checkpoint_and_write(
    source: str | Path,
    out: str | Path,
    *,
    new_biases: bool = False,
    untie: bool = False,
    inputs: InputSpec | None = None,
    load: LoadOptions | None = None,
    write: WriteOptions | None = None,
) -> NormAffineCheckpointResult:
    """Fold the checkpoint folder ``source`` into the folder ``out`` (module docstring)."""
    load, write, spec = load or LoadOptions(), write or WriteOptions(), inputs or InputSpec()
    if load.model is None:
        raise UsageError(f"{source} is a checkpoint folder: give its architecture as LoadOptions(model="
                         "'package.module:callable'), a factory built on the meta device, without "
                         "weights")  # fmt: skip
    if write.report is not None:
        check_outputs({"report": write.report}, inputs=[source], force=write.force)
    ckpt = ShardedCheckpoint.open(source)
    dtype = next((e.torch_dtype for entries in ckpt.shards.values() for e in entries.values()
                  if e.torch_dtype.is_floating_point), torch.float32)  # fmt: skip
    code: list[Path] = []
    with torch.device("meta"):
        model, shapes = build(load.model, load.model_args, code)
    model = model.to(dtype).eval()
    loaded = LoadedModel(model, f"factory {load.model} (meta device)", shapes, dtype=dtype, code_files=code)
    example = example_inputs(loaded, spec)
    if example is None:  # not optional: example_inputs raises first
        raise UsageError("no example inputs")
    result = fold_norm_affine_checkpoint(model, example, source, out, new_biases=new_biases, untie=untie,
                                         force=write.force)  # fmt: skip
    if write.report is not None:
        placed = [source, *code, *result.files]
        with OutputSet({"report": write.report}, inputs=placed, force=write.force) as files:
            record = {"command": "fold-norms", "status": "ok", "source": str(source), **result.to_dict()}
            write_json(files.staged("report"), record)
            files.commit()
    return result
