"""The write plan of a sharded norm-affine fold (:mod:`normfold.norm_affine_checkpoint`): which
tensor the output stores under which name, from where, in which shard, and what ``config.json``
says: pure data (:class:`~normfold.io.fold_shards.ShardPlan`), applied as it is by
:func:`normfold.io.fold_shards.write_folded`.

A tensor of the model may sit under several names (a tied head and its embedding, BERT's shared
decoder bias); ``untie`` makes some of them (the ``untied`` names) tensors of their own. So each
name ``n`` of the model reads a *group*: ``{n}`` for an untied name, else ``n`` and its other
names less the untied ones. The output:

* every stored name, in its shard's order: the fold's value of a folded tensor of its group, else
  its own bytes (``RawCopy``);
* a folded tensor with no stored name in its group: new, last in the shard of its layer;
* a name the checkpoint does not store: written when nothing would tie it back on load: always
  where it was tied to an untied name (the untied name now holds the folded value; it keeps the
  **original** bytes of any stored name of its former group), and every such name once
  ``config.json``'s ``tie_word_embeddings`` is set to false (an untied config ties nothing back);
* ``config.json`` with ``tie_word_embeddings`` false whenever anything was untied (a Hugging Face
  load would tie the head back to the unscaled embedding); without such a config, the in-memory
  fold's note (code that ties weights on load would tie it back);
* other weight files of the folder (``pytorch_model*.bin``, ``consolidated.safetensors``, a
  ``model.safetensors`` beside the index, shards the index does not name) are **skipped**, with a
  note: copied, they would hold the unfolded weights, and a loader that prefers them (transformers
  takes ``model.safetensors`` before the index, safetensors before ``.bin``) would load those.
  Skipped rather than refused, since Hub folders often ship one model in two formats.

Before anything is written, every parameter name of the model must resolve in the output
(stored, or tied back by the config), and every folded value must have the digest of the value
its proof ran on (:class:`~normfold.errors.ConsistencyError` otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from normfold.errors import ConsistencyError
from normfold.io.fold_shards import FoldedValue, OutTensor, RawCopy, ShardPlan
from normfold.io.sharded import INDEX_NAME, ShardedCheckpoint

__all__ = ["WEIGHT_SUFFIXES", "make_shard_plan", "output_files"]

#: files that hold weights (any framework): never copied unfolded into the output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")


def output_files(ckpt: ShardedCheckpoint) -> tuple[list[Path], list[Path]]:
    """The folder's other files: (copied, skipped weight files) (module docstring)."""
    copied, skipped = [], []
    for p in sorted(ckpt.folder.iterdir()):
        if not p.is_file() or p.name in ckpt.shards or p.name == INDEX_NAME or p.name.startswith("."):
            continue
        weights = p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")
        (skipped if weights else copied).append(p)
    return copied, skipped


def make_shard_plan(
    ckpt: ShardedCheckpoint,
    names: Iterable[str],
    aliases: Mapping[str, tuple[str, ...]],
    untied: set[str],
    folded: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    digests: Mapping[str, str],
) -> ShardPlan:
    """The plan (module docstring). ``names``: every parameter name of the model; ``folded``: the
    changed tensors (name -> stored dtype and shape); ``digests``: name -> the proved value's digest."""

    def group(n: str) -> set[str]:
        return {n} if n in untied else {n, *aliases.get(n, ())} - untied

    def changed(n: str) -> FoldedValue | None:
        fqns = sorted(f for f in folded if f in group(n))
        return FoldedValue(fqns[0]) if fqns else None

    def source_of(n: str) -> RawCopy | FoldedValue | None:
        if changed(n) is not None:
            return changed(n)
        stored = [o for o in (n, *aliases.get(n, ())) if ckpt.where(o) is not None]  # original bytes
        return RawCopy(stored[0]) if stored else None

    shards: dict[str, list[OutTensor]] = {s: [] for s in ckpt.shards}
    home: dict[str, str] = {}
    for shard, entries in ckpt.shards.items():
        for n, e in entries.items():
            shards[shard].append(OutTensor(n, e.torch_dtype, e.shape, changed(n) or RawCopy(n)))
            home[n] = shard
    for fqn, (dtype, shape) in folded.items():
        if not any(n in home for n in group(fqn)):
            shard = _home(ckpt, aliases, fqn)
            shards[shard].append(OutTensor(fqn, dtype, shape, FoldedValue(fqn)))
            home[fqn] = shard
    config = _config(ckpt.folder, bool(untied))
    notes = []
    if untied and config is not None:
        notes.append(f"untied {', '.join(sorted(untied))}: config.json tie_word_embeddings set to false")
    elif untied:
        notes.append(f"untied {', '.join(sorted(untied))}: each is now a parameter of its own; code that "
                     "ties weights on load would tie it back to the unscaled original")  # fmt: skip
    formerly = {o for u in untied for o in aliases.get(u, ())} - untied
    copies = []
    for n in names:
        if n in home or not (n in formerly or config is not None):
            continue
        src = source_of(n)
        if src is None:
            continue
        spec = folded[src.fqn] if isinstance(src, FoldedValue) else _entry_spec(ckpt, src.name)
        if isinstance(src, FoldedValue):  # beside the folded tensor, under whichever name it is written
            shard = next(home[o] for o in sorted(group(src.fqn)) if o in home)
        else:
            shard = ckpt.where(src.name) or ""
        shards[shard].append(OutTensor(n, *spec, src))
        home[n] = shard
        copies.append(n)
    if copies:
        notes.append(f"{', '.join(sorted(copies))}: each written as a copy of its own (an untied config or "
                     "an untied head no longer ties them on load)")  # fmt: skip
    copied, skipped = output_files(ckpt)
    if skipped:
        notes.append(f"not copied (weight files the fold did not read, which a loader could prefer to the "
                     f"folded ones): {', '.join(p.name for p in skipped)}")  # fmt: skip
    the_plan = ShardPlan({s: tuple(t) for s, t in shards.items()}, tuple(copied), config, dict(digests),
                         tuple(notes))  # fmt: skip
    _check(the_plan, names, aliases, untied)
    return the_plan


def _check(the_plan: ShardPlan, names: Iterable[str], aliases: Mapping[str, tuple[str, ...]],
           untied: set[str]) -> None:  # fmt: skip
    """Every name of the model resolves in the output; every folded value was proved."""
    out = {t.name for tensors in the_plan.shards.values() for t in tensors}
    ties = the_plan.config is None  # a config untied by the fold ties nothing back
    involved = untied | {o for u in untied for o in aliases.get(u, ())}
    for n in names:
        tied_back = ties and n not in involved and any(o in out for o in aliases.get(n, ()))
        if n not in out and not tied_back:
            raise ConsistencyError(f"the folded checkpoint would not hold the model's parameter {n} under "
                                   "any name a load resolves; nothing was written")  # fmt: skip
    for tensors in the_plan.shards.values():
        for t in tensors:
            if isinstance(t.source, FoldedValue) and t.source.fqn not in the_plan.digests:
                raise ConsistencyError(f"{t.name}: the folded value of {t.source.fqn} was not proved; "
                                       "nothing was written")  # fmt: skip


def _entry_spec(ckpt: ShardedCheckpoint, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    shard = ckpt.where(name) or ""
    entry = ckpt.shards[shard][name]
    return entry.torch_dtype, entry.shape


def _home(ckpt: ShardedCheckpoint, aliases: Mapping[str, tuple[str, ...]], fqn: str) -> str:
    """The shard a new tensor goes to: that of a stored name of it, or of its layer's weight."""
    for n in (fqn, *aliases.get(fqn, ())):
        where = ckpt.where(n)
        if where is not None:
            return where
    layer, _, attr = fqn.rpartition(".")
    if attr != "weight" and layer:
        return _home(ckpt, aliases, f"{layer}.weight")
    return list(ckpt.shards)[-1]


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
