"""A checkpoint folder rewritten shard by shard as a :class:`ShardPlan` says (the norm-affine fold
of a sharded checkpoint, :mod:`normfold.norm_affine_checkpoint`; the plan is made by
:mod:`normfold.norm_checkpoint_plan`): this module decides nothing, it applies the plan.

Each output shard holds the plan's tensors in the plan's order, each either the raw bytes of a
stored tensor (never decoded) or a folded value, computed when its turn comes (one at a time) in
its stored dtype, checked against the plan's shape, dtype and the digest of the value its proof
ran on (SHA-256 of its bytes) before it is written. The index file (``weight_map``,
``metadata.total_size``) is rewritten; the plan's other files are copied, ``config.json`` with the
plan's contents when it has some.

Every file is written by the rules of :mod:`normfold.io.files`: staged beside its destination,
committed only when all are written (shards and files first, the index last), never over an
existing file without ``force``; an error leaves no output file. :func:`check_out_folder` runs the
folder's checks before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from normfold.errors import ConsistencyError, UsageError
from normfold.heap import release
from normfold.io.files import OutputSet, check_outputs
from normfold.io.safetensors_stream import StreamWriter
from normfold.io.sharded import INDEX_NAME, ShardedCheckpoint

__all__ = ["FoldedValue", "OutTensor", "RawCopy", "ShardPlan", "check_out_folder", "digest", "write_folded"]


@dataclass(frozen=True)
class RawCopy:
    """The original bytes of the stored tensor ``name``."""

    name: str


@dataclass(frozen=True)
class FoldedValue:
    """The fold's value of tensor ``fqn``."""

    fqn: str


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, stored dtype and shape, and where its value comes from."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: RawCopy | FoldedValue


@dataclass(frozen=True)
class ShardPlan:
    """What the output holds: ``shards`` (output shard -> its tensors, in order; named as the
    input's), the ``others`` files copied, ``config`` (the ``config.json`` written, or None: copied
    as it is), ``digests`` (folded name -> SHA-256 of the proved value's bytes), ``notes``."""

    shards: Mapping[str, tuple[OutTensor, ...]]
    others: tuple[Path, ...]
    config: dict | None
    digests: Mapping[str, str]
    notes: tuple[str, ...] = ()


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (its dtype's, row-major)."""
    return hashlib.sha256(_bytes(t)).hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _roles(ckpt: ShardedCheckpoint, out: Path, others: Iterable[Path]) -> dict[str, Path]:
    roles = {f"shard{i}": out / s for i, s in enumerate(ckpt.shards)}
    roles.update({f"file{i}": out / p.name for i, p in enumerate(others)})
    if ckpt.index is not None:
        roles["out"] = out / INDEX_NAME
    else:
        roles["out"] = roles.pop("shard0")
    return roles


def check_out_folder(ckpt: ShardedCheckpoint, out: Path, others: Iterable[Path], *, force: bool) -> None:
    """The checks :func:`write_folded` makes on ``out`` and its files, made before any work: not a
    link, a folder if it exists, its parent existing, not the checkpoint folder nor inside it, no
    file it would write already there unless ``force``."""
    _folder(out, create=False)
    inside = os.path.realpath(out)
    folder = os.path.realpath(ckpt.folder)
    if inside == folder or inside.startswith(folder + os.sep):
        raise UsageError(f"out={out} is the checkpoint folder {ckpt.folder} or inside it; choose another "
                         "folder")  # fmt: skip
    if not out.is_dir():
        return  # nothing in it yet: no file to overwrite
    others = list(others)
    check_outputs(_roles(ckpt, out, others), inputs=[*ckpt.files(), *others], force=force)


def write_folded(
    ckpt: ShardedCheckpoint,
    out: Path,
    plan: ShardPlan,
    value: Callable[[str, torch.dtype], torch.Tensor],
    *,
    force: bool = False,
) -> list[Path]:
    """Write ``plan`` into folder ``out`` (module docstring); ``value(fqn, dtype)``: the folded
    value of ``fqn`` in ``dtype``. The files placed."""
    created = _folder(out, create=True)
    try:
        roles = _roles(ckpt, out, plan.others)
        with OutputSet(roles, inputs=[*ckpt.files(), *plan.others], force=force) as outputs:
            by_path = {p: r for r, p in outputs.paths.items()}
            sizes, weight_map = 0, {}
            for shard, tensors in plan.shards.items():
                staged = outputs.staged(by_path[out / shard])
                sizes += _write_shard(ckpt, shard, tensors, plan, value, staged)
                weight_map.update(dict.fromkeys([t.name for t in tensors], shard))
            for p in plan.others:
                staged = outputs.staged(by_path[out / p.name])
                if p.name == "config.json" and plan.config is not None:
                    staged.write_text(json.dumps(plan.config, indent=2) + "\n")
                else:
                    shutil.copyfile(p, staged)
            if ckpt.index is not None:
                index = dict(ckpt.index)
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": sizes}
                index["weight_map"] = dict(sorted(weight_map.items()))
                outputs.staged("out").write_text(json.dumps(index, indent=2) + "\n")
            written = outputs.commit()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: this run created it and placed nothing
        raise
    return written


def _folder(out: Path, *, create: bool) -> bool:
    """Check ``out`` (not a link; a folder if it exists; its parent exists); create it if missing
    and ``create`` (True when created)."""
    if out.is_symlink():
        raise UsageError(f"out={out} is a symbolic link; normfold never writes through a link")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"out={out} exists and is not a folder")
        return False
    if not out.parent.is_dir():
        raise UsageError(f"out={out}: folder {out.parent} does not exist")
    if not create:
        return False
    try:
        out.mkdir()
    except FileExistsError:  # made by another process since the check: not ours to remove
        if out.is_symlink() or not out.is_dir():
            raise UsageError(f"out={out} appeared while normfold was writing, not as a folder") from None
        return False
    except OSError as e:
        raise UsageError(f"out={out}: cannot create the folder: {e.strerror or e}") from e
    return True


def _write_shard(
    ckpt: ShardedCheckpoint,
    shard: str,
    tensors: tuple[OutTensor, ...],
    plan: ShardPlan,
    value: Callable[[str, torch.dtype], torch.Tensor],
    staged: Path,
) -> int:
    """One output shard; its tensor bytes."""
    specs = {t.name: (t.dtype, t.shape) for t in tensors}
    writer = StreamWriter(staged, specs, ckpt.metadata.get(shard, {}))
    try:
        for t in tensors:
            if isinstance(t.source, RawCopy):
                where = ckpt.where(t.source.name) or ""
                writer.write_raw(t.name, ckpt.folder / where, ckpt.entry(t.source.name))
                continue
            folded = value(t.source.fqn, t.dtype)
            if tuple(folded.shape) != t.shape or folded.dtype != t.dtype:
                raise ConsistencyError(f"{t.name}: the folded value of {t.source.fqn} is {folded.dtype} "
                                       f"{tuple(folded.shape)}, stored {t.dtype} {t.shape}")  # fmt: skip
            if digest(folded) != plan.digests.get(t.source.fqn):
                raise ConsistencyError(f"{t.name}: the value about to be written is not the one the "
                                       f"proof of {t.source.fqn} ran on (digests differ); no file was "
                                       "placed")  # fmt: skip
            writer.write(t.name, folded)
            del folded
            release()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return sum(dtype.itemsize * _count(shape) for dtype, shape in specs.values())


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
