"""A checkpoint folder rewritten shard by shard with some tensors changed (the norm-affine fold
of a sharded checkpoint, :mod:`normfold.norm_affine_checkpoint`).

Each output shard has its input's name and its tensors in the input's order, each changed tensor
computed when its turn comes (one at a time) and cast to its stored dtype once, every other copied
as raw bytes; tensors the edit adds (a new bias, a head given its own copy) go last in the shard
of the tensor they belong to. A changed value goes to every name the checkpoint stores the tensor
under (a tied tensor is one tensor), except an untied copy, which is its own. The index file
(``weight_map``, ``metadata.total_size``) is rewritten; the folder's other files are copied, a
``config.json`` with ``tie_word_embeddings: true`` set to false when a weight was untied (a Hugging
Face load would tie it back to the unscaled original), and then, as
:func:`normfold.fold_norm_affine` does in memory, every name of a tied tensor the checkpoint lacks
is written as a copy (such a config no longer ties them on load).

Every file is written by the rules of :mod:`normfold.io.files`: staged beside its destination,
committed only when all are written (shards and files first, the index last), never over an
existing file without ``force``; an error leaves no output file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normfold.errors import UsageError
from normfold.io.files import OutputSet
from normfold.io.heap import release
from normfold.io.safetensors_stream import Entry, StreamWriter
from normfold.io.sharded import INDEX_NAME, ShardedCheckpoint

__all__ = ["ShardEdit", "write_folded"]


@dataclass
class ShardEdit:
    """The changes: ``weights`` (name -> a function computing its value, in its stored dtype, when
    its turn comes), ``small`` (name -> float64 value), the model's ``aliases`` (name -> its other names),
    the ``untied`` names (a copy of their own), ``dtype_of`` (the stored dtype of a name)."""

    weights: Mapping[str, Callable[[], torch.Tensor]]
    small: Mapping[str, torch.Tensor]
    aliases: Mapping[str, tuple[str, ...]]
    untied: set[str]
    dtype_of: Callable[[str], torch.dtype]
    #: a name of a tied tensor the checkpoint lacks -> the stored name it copies (raw, or its
    #: folded value when that one changes)
    copies: dict[str, str] = field(default_factory=dict)


def write_folded(
    ckpt: ShardedCheckpoint, out: Path, edit: ShardEdit, *, force: bool = False
) -> tuple[list[Path], list[str]]:
    """Write the edited checkpoint into folder ``out`` (module docstring); the files placed, and notes."""
    targets, new, notes = _targets(ckpt, edit)
    others = [p for p in sorted(ckpt.folder.iterdir()) if p.is_file() and p.name not in ckpt.shards
              and p.name != INDEX_NAME and not p.name.startswith(".")]  # fmt: skip
    config = _config(ckpt.folder, bool(edit.untied & set(new)))
    if config is not None:
        notes.append(f"untied {', '.join(sorted(edit.untied))}: config.json tie_word_embeddings set to false")
        for name, source in _missing_aliases(ckpt, edit, targets, new).items():
            edit.copies[name] = source  # its stored dtype and shape; its value the source's new one
            if source in targets:
                targets[name] = targets[source]
            new[name] = ckpt.where(source) or next(iter(ckpt.shards))
        if edit.copies:
            notes.append(f"{', '.join(sorted(edit.copies))}: each written as a copy of its own (an untied "
                         "config no longer ties them on load)")  # fmt: skip
    created = _folder(out)
    try:
        roles = {f"shard{i}": out / s for i, s in enumerate(ckpt.shards)}
        roles.update({f"file{i}": out / p.name for i, p in enumerate(others)})
        if ckpt.index is not None:
            roles["out"] = out / INDEX_NAME
        else:
            roles["out"] = roles.pop("shard0")
        with OutputSet(roles, inputs=[*ckpt.files(), *others], force=force) as outputs:
            by_path = {p: r for r, p in outputs.paths.items()}
            sizes, weight_map = 0, {}
            for shard, entries in ckpt.shards.items():
                added = {n: _spec(ckpt, edit, n) for n, s in new.items() if s == shard}
                staged = outputs.staged(by_path[out / shard])
                sizes += _write_shard(ckpt, shard, entries, added, targets, edit, staged)
                weight_map.update(dict.fromkeys([*entries, *added], shard))
            for p in others:
                staged = outputs.staged(by_path[out / p.name])
                if p.name == "config.json" and config is not None:
                    staged.write_text(json.dumps(config, indent=2) + "\n")
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
    return written, notes


def _folder(out: Path) -> bool:
    """Create ``out`` if missing (True); its parent must exist."""
    if out.is_symlink():
        raise UsageError(f"out={out} is a symbolic link; normfold never writes through a link")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"out={out} exists and is not a folder")
        return False
    if not out.parent.is_dir():
        raise UsageError(f"out={out}: folder {out.parent} does not exist")
    out.mkdir()
    return True


def _names(edit: ShardEdit, fqn: str) -> set[str]:
    return {fqn} if fqn in edit.untied else {fqn, *edit.aliases.get(fqn, ())}


def _targets(ckpt: ShardedCheckpoint, edit: ShardEdit) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Stored name -> the changed name whose value it takes; new name -> its shard; notes."""
    targets, new = {}, {}
    for fqn in [*edit.weights, *edit.small]:
        stored = [n for n in _names(edit, fqn) if ckpt.where(n) is not None]
        for n in stored:
            targets[n] = fqn
        if not stored:
            new[fqn] = _home(ckpt, edit, fqn)
    return targets, new, []


def _home(ckpt: ShardedCheckpoint, edit: ShardEdit, fqn: str) -> str:
    """The shard a new tensor goes to: that of the tensor it copies, or of its layer's weight."""
    for n in (fqn, *edit.aliases.get(fqn, ())):
        if ckpt.where(n) is not None:
            return ckpt.where(n) or ""
    layer, _, attr = fqn.rpartition(".")
    if attr != "weight" and layer:
        return _home(ckpt, edit, f"{layer}.weight")
    return list(ckpt.shards)[-1]


def _spec(ckpt: ShardedCheckpoint, edit: ShardEdit, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    if name in edit.copies:
        entry = ckpt.entry(edit.copies[name])
        return entry.torch_dtype, entry.shape
    if name in edit.small:
        return edit.dtype_of(name), tuple(edit.small[name].shape)
    source = next(n for n in edit.aliases.get(name, ()) if ckpt.where(n) is not None)  # an untied copy
    entry = ckpt.entry(source)
    return entry.torch_dtype, entry.shape


def _write_shard(
    ckpt: ShardedCheckpoint,
    shard: str,
    entries: Mapping[str, Entry],
    added: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    targets: Mapping[str, str],
    edit: ShardEdit,
    staged: Path,
) -> int:
    """One output shard; its tensor bytes."""
    specs = {n: (e.torch_dtype, e.shape) for n, e in entries.items()}
    specs.update(added)
    writer = StreamWriter(staged, specs, ckpt.metadata[shard])
    try:
        for name, (dtype, shape) in specs.items():
            if name in edit.copies and name not in targets:
                source = edit.copies[name]
                writer.write_raw(name, ckpt.folder / (ckpt.where(source) or ""), ckpt.entry(source))
                continue
            fqn = targets.get(name, name if name in added else None)
            if fqn is None:
                writer.write_raw(name, ckpt.folder / shard, entries[name])
                continue
            value = edit.weights[fqn]() if fqn in edit.weights else edit.small[fqn].to(dtype)
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"{name}: the folded value is {value.dtype} {tuple(value.shape)}, "
                                 f"stored {dtype} {shape}")  # fmt: skip
            writer.write(name, value)
            del value
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


def _config(folder: Path, untied: bool) -> dict | None:
    """The folder's ``config.json`` with ``tie_word_embeddings`` false, when a weight was untied
    and it ties them; else None (copied as it is)."""
    path = folder / "config.json"
    if not untied or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not config.get("tie_word_embeddings", True):
        return None
    return {**config, "tie_word_embeddings": False}


def _missing_aliases(
    ckpt: ShardedCheckpoint, edit: ShardEdit, targets: Mapping[str, str], new: Mapping[str, str]
) -> dict[str, str]:
    """Names of a tied tensor the checkpoint does not store (nor the edit writes): name -> a stored one."""
    out = {}
    for name, others in edit.aliases.items():
        if ckpt.where(name) is not None or name in new or name in targets:
            continue
        source = next((o for o in others if ckpt.where(o) is not None and o not in edit.untied), None)
        if source is not None:
            out[name] = source
    return out
