"""The tensor-by-tensor safetensors writer and reader (:mod:`normfold.io.safetensors_stream`):
what it writes, ``safetensors.safe_open`` reads back bit for bit, and it refuses a stream that does
not follow its header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from normfold.errors import ConsistencyError, LoadError
from normfold.io.safetensors_stream import StreamWriter, read_header, read_tensor

TENSORS = {
    "w": torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "half": torch.tensor([65504.0, -0.0, float("inf"), float("nan")], dtype=torch.float16),
    "f32": torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1)),
    "f64": torch.tensor([1 / 3, -2.5e-300], dtype=torch.float64),
    "ids": torch.arange(-3, 6, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(7, dtype=torch.int32),
    "empty": torch.zeros(0, 4),
    "bytes": torch.arange(0, 255, 17, dtype=torch.uint8),
}


def _bytes(t: torch.Tensor) -> list[int]:
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}


def test_streamed_file_reads_back_bit_exactly_with_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    writer = StreamWriter(path, _specs(TENSORS), {"format": "pt"})
    for name, t in TENSORS.items():
        writer.write(name, t)
    writer.close()
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert size % 8 == 0  # every tensor starts aligned, as safetensors writes it
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(TENSORS)
        for name, t in TENSORS.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert _bytes(got) == _bytes(t), name
    entries, meta = read_header(path)
    assert list(entries) == list(TENSORS) and meta == {"format": "pt"}
    for name, t in TENSORS.items():
        got = read_tensor(path, entries[name])
        assert _bytes(got) == _bytes(t)


def test_raw_copies_of_a_safetensors_file_are_bit_exact(tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    save_file({n: t.contiguous() for n, t in TENSORS.items()}, source)
    entries, _ = read_header(source)
    path = tmp_path / "out.safetensors"
    writer = StreamWriter(path, {n: (e.torch_dtype, e.shape) for n, e in entries.items()}, {})
    for name, entry in entries.items():
        writer.write_raw(name, source, entry)
    writer.close()
    with safe_open(source, "pt") as a, safe_open(path, "pt") as b:
        for name in entries:
            assert _bytes(a.get_tensor(name)) == _bytes(b.get_tensor(name))


def test_the_writer_refuses_a_stream_that_does_not_follow_its_header(tmp_path: Path) -> None:
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    writer = StreamWriter(tmp_path / "x.safetensors", specs, {})
    with pytest.raises(ConsistencyError, match=r"x\.safetensors: got b \(12 bytes\), expected \('a', 8\)$"):
        writer.write("b", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ConsistencyError, match=r"x\.safetensors: not written: b$"):
        writer.close()
    with pytest.raises(FileExistsError):  # never over an existing file
        StreamWriter(tmp_path / "x.safetensors", specs, {})


def test_a_file_that_is_no_safetensors_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(LoadError, match="is not a safetensors file"):
        read_header(bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)  # 8 of its 16 bytes
    with pytest.raises(LoadError, match=r"w's bytes \[\d+, \d+\) do not fit its shape or the file"):
        read_header(bad)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ([1, 2], r"is not a safetensors file \(its header is JSON list, not an object\)$"),
        ({"__metadata__": ["pt"]}, r": the header.s __metadata__ is list, not an object of strings$"),
        ({"w": "F32"}, r": the header entry of w is malformed \('F32'\)$"),
    ],
)
def test_a_header_that_is_no_object_is_a_load_error(tmp_path: Path, header: object, reason: str) -> None:
    bad = tmp_path / "bad.safetensors"
    text = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(LoadError, match=reason):
        read_header(bad)
