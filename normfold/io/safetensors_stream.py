"""Safetensors files read and written one tensor at a time, for checkpoints larger than memory.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes, a little-endian
``u64`` ``N``; ``N`` bytes of JSON, ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` (offsets relative to the end of the header); then the data, every
tensor's bytes contiguous, little-endian, row-major, with no gap. The installed ``safetensors``
(0.8) writes a file from a whole ``dict`` of tensors only (``save_file``), so a shard of several
GB would sit in memory; :class:`StreamWriter` writes the header first (every name, dtype and shape
is known up front), then each tensor as it comes, so at most one tensor is held. Its output is
read back bit-exactly by ``safetensors.safe_open`` (``tests/io/test_safetensors_stream.py``).
The header is padded with spaces to a multiple of 8 bytes, as ``safetensors`` itself does, so
every tensor starts aligned.

Reads (:func:`read_tensor`, :func:`copy_bytes`) use plain ``pread`` into a buffer of the tensor's
size, never ``mmap``: pages of a mapped file count in the process's resident set while mapped,
which would make a streamed fold look (and be, for the OOM killer) as large as the checkpoint.
A tensor copied unchanged is moved as raw bytes in chunks, never decoded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from normfold.errors import ConsistencyError, LoadError

__all__ = ["DTYPES", "Entry", "StreamWriter", "copy_bytes", "read_header", "read_tensor"]

#: safetensors dtype names -> torch dtypes (those torch has)
DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
_NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 16 * 1024 * 1024  # raw copies move at most this much at a time
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header's size


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype name, shape, and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors of a safetensors file (name -> :class:`Entry`, in file order) and its
    ``__metadata__``. Raises :class:`~normfold.errors.LoadError` on a file that is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= _MAX_HEADER:
                raise LoadError(f"{path} is not a safetensors file (header size {size})")
            raw = json.loads(f.read(size))
            total = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the safetensors header of {path}: {e}") from e
    if not isinstance(raw, dict):
        raise LoadError(f"{path} is not a safetensors file (its header is JSON {type(raw).__name__}, not an "
                        "object)")  # fmt: skip
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        kind = type(meta).__name__
        raise LoadError(f"{path}: the header's __metadata__ is {kind}, not an object of strings")
    entries = {}
    for name, info in raw.items():
        try:
            begin, end = (int(v) + 8 + size for v in info["data_offsets"])
            entry = Entry(str(info["dtype"]), tuple(int(n) for n in info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{path}: the header entry of {name} is malformed ({info!r})") from e
        if entry.dtype not in DTYPES:
            raise LoadError(f"{path}: {name} has dtype {entry.dtype}, which torch cannot hold")
        count = 1
        for n in entry.shape:
            count *= n
        if end > total or end - begin != count * DTYPES[entry.dtype].itemsize:
            raise LoadError(f"{path}: {name}'s bytes [{begin}, {end}) do not fit its shape or the file")
        entries[name] = entry
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[1].begin))
    return ordered, {str(k): str(v) for k, v in meta.items()}


def read_tensor(path: Path, entry: Entry) -> torch.Tensor:
    """The tensor at ``entry`` of ``path``, read into memory of its own (no mapping kept)."""
    buf = bytearray(entry.nbytes)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buf), 0
        while done < entry.nbytes:
            got = os.preadv(f.fileno(), [view[done:]], entry.begin + done)
            if got <= 0:
                raise LoadError(f"{path} ended inside a tensor (at byte {entry.begin + done})")
            done += got
    if not buf:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(entry.torch_dtype).reshape(entry.shape)


def copy_bytes(path: Path, entry: Entry, out: BinaryIO) -> None:
    """Append the raw bytes of ``entry`` to ``out``, a chunk at a time (bit-exact by construction)."""
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < entry.nbytes:
            chunk = os.pread(f.fileno(), min(_CHUNK, entry.nbytes - done), entry.begin + done)
            if not chunk:
                raise LoadError(f"{path} ended inside a tensor (at byte {entry.begin + done})")
            out.write(chunk)
            done += len(chunk)


class StreamWriter:
    """A safetensors file written tensor by tensor: ``specs`` (name -> ``(dtype, shape)``, in the
    order the tensors will come) fixes the header, then :meth:`write` or :meth:`write_raw` each
    tensor in that order, then :meth:`close` (which checks that every one came)."""

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str],
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, (dtype, shape) in specs.items():
            count = 1
            for n in shape:
                count *= n
            size = count * dtype.itemsize
            span = [offset, offset + size]
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": span}
            self._order.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(path, "xb")  # closed by close() or abort(); "x": a new staged file
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0
        self.path = path

    def _expect(self, name: str, size: int) -> None:
        if self._next >= len(self._order) or self._order[self._next] != (name, size):
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ConsistencyError(f"{self.path}: got {name} ({size} bytes), expected {want}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._expect(name, data.numel())
        self._file.write(memoryview(data.numpy()))

    def write_raw(self, name: str, source: Path, entry: Entry) -> None:
        self._expect(name, entry.nbytes)
        copy_bytes(source, entry, self._file)

    def abort(self) -> None:
        """Close without the checks (an error is being raised; the staged file is discarded)."""
        self._file.close()

    def close(self) -> None:
        try:
            if self._next != len(self._order):
                missing = ", ".join(n for n, _ in self._order[self._next :])
                raise ConsistencyError(f"{self.path}: not written: {missing}")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
