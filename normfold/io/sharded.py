"""A Hugging Face safetensors checkpoint folder: one ``model.safetensors``, or shards
``model-0000X-of-0000N.safetensors`` named by ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``).

:class:`ShardedCheckpoint` reads only the headers when opened; a tensor is read when asked for
(:mod:`normfold.io.safetensors_stream`), so the folder may be far larger than memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normfold.errors import LoadError
from normfold.io.safetensors_stream import Entry, read_header, read_tensor

__all__ = ["INDEX_NAME", "SINGLE_NAME", "ShardedCheckpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class ShardedCheckpoint:
    """The shards of a checkpoint folder, in index order, each with its tensors (file order)."""

    folder: Path
    shards: dict[str, dict[str, Entry]]  # shard file name -> tensor name -> entry
    metadata: dict[str, dict[str, str]]  # shard file name -> its ``__metadata__``
    index: dict[str, Any] | None  # the index file's JSON (None for a single file)

    @classmethod
    def open(cls, folder: str | Path) -> ShardedCheckpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise LoadError(f"{folder} is not a folder (a Hugging Face checkpoint folder with "
                            f"{INDEX_NAME} or {SINGLE_NAME} is expected)")  # fmt: skip
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                names = list(dict.fromkeys(str(v) for v in weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise LoadError(f"{index_path} is not a safetensors index (a 'weight_map' of tensor "
                                f"name -> shard file): {e}") from e  # fmt: skip
            bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
            if bad:
                raise LoadError(f"{index_path} names shards outside its folder or not safetensors: {bad}")
        elif (folder / SINGLE_NAME).is_file():
            index, weight_map, names = None, None, [SINGLE_NAME]
        else:
            raise LoadError(f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}")
        shards, metadata = {}, {}
        for name in names:
            if not (folder / name).is_file():
                raise LoadError(f"{index_path} names {name}, which is not in {folder}")
            shards[name], metadata[name] = read_header(folder / name)
        found = cls(folder, shards, metadata, index)
        if weight_map is not None:
            found._check_index(weight_map)
        return found

    def _check_index(self, weight_map: dict[str, str]) -> None:
        """Every tensor is in exactly the shard the index names, and nothing else is anywhere."""
        held = {t: s for s, entries in self.shards.items() for t in entries}
        for tensor, shard in weight_map.items():
            if held.get(tensor) != shard:
                where = f"in {held[tensor]}" if tensor in held else "in no shard"
                raise LoadError(f"{self.folder / INDEX_NAME} puts {tensor} in {shard}, but it is {where}")
        extra = sorted(set(held) - set(weight_map))
        if extra:
            raise LoadError(f"{self.folder}: tensors in the shards the index does not name: {extra[:5]}")

    def where(self, name: str) -> str | None:
        """The shard file holding tensor ``name``, or None."""
        for shard, entries in self.shards.items():
            if name in entries:
                return shard
        return None

    def entry(self, name: str) -> Entry:
        """The entry of tensor ``name`` (:class:`~normfold.errors.LoadError` when no shard holds it)."""
        shard = self.where(name)
        if shard is None:
            raise LoadError(f"no shard of the checkpoint {self.folder} holds the tensor {name}")
        return self.shards[shard][name]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its shard (:class:`~normfold.errors.LoadError` when none holds it)."""
        entry = self.entry(name)
        return read_tensor(self.folder / (self.where(name) or ""), entry)

    def files(self) -> list[Path]:
        """Every file of the checkpoint: the shards and the index."""
        out = [self.folder / s for s in self.shards]
        return [*out, self.folder / INDEX_NAME] if self.index is not None else out

    def parameter_bytes(self) -> int:
        return sum(e.nbytes for entries in self.shards.values() for e in entries.values())
