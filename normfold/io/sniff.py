"""What a file is and whether it may be read, told from its bytes alone: nothing is unpickled or run.

* :func:`check_regular_file`: a regular file only, from ``os.stat`` (opening a FIFO blocks, a
  device like /dev/zero never ends).
* :func:`sniff`: TorchScript and ``torch.export`` archives are zips told from plain ``torch.save``
  zips by their entries; an ONNX protobuf by its first fields (field 1, ``ir_version``, a varint,
  then a ModelProto field), unless the bytes are a safetensors header length.
* :func:`check_zip`: a decompression-bomb check. torch.save stores members uncompressed and
  torch's reader allocates each member's declared size before inflating it, so the members
  together may declare at most ``max(ZIP_MAX_RATIO x file size, ZIP_MIN_ALLOWANCE)`` bytes.
* :func:`pickled_top_level`: the class a ``torch.save`` file pickles at its top, read from the
  pickle's opcodes (``pickletools.genops``, which runs nothing).

No torch here: the CLI's pre-flight (:mod:`normfold.cli.preflight`) decides the same facts before
torch is imported.
"""

from __future__ import annotations

import io
import os
import pickletools
import stat
import zipfile
from pathlib import Path

from normfold.errors import LoadError, UsageError, first_line

__all__ = [
    "ZIP_MAX_RATIO",
    "ZIP_MIN_ALLOWANCE",
    "check_regular_file",
    "check_zip",
    "looks_like_torch_save",
    "pickled_top_level",
    "read_head",
    "refuse_compiled",
    "refuse_pickled_object_for_model",
    "sniff",
]

#: A zip checkpoint's members may declare at most this many times the file's size uncompressed
#: (at least :data:`ZIP_MIN_ALLOWANCE` bytes) in total.
ZIP_MAX_RATIO = 16
ZIP_MIN_ALLOWANCE = 64 * 2**20


_FILE_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def check_regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file, from ``os.stat`` alone: opening a FIFO blocks, and a
    device like /dev/zero never ends."""
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


def read_head(path: Path, n: int = 16) -> bytes:
    """The first ``n`` bytes of ``path``."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror})") from e


# field 1 (ir_version, a varint) first, then a length-delimited or varint ModelProto field
_ONNX_SECOND_FIELD = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}


def sniff(path: Path) -> str:
    """Tell TorchScript and torch.export archives from plain torch.save zips by their entries, and
    an ONNX protobuf by its first fields. A zip is checked for decompression bombs first."""
    head = read_head(path)
    onnx = len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_SECOND_FIELD
    if onnx and head[8:9] != b"{":  # a safetensors header length can start with the same bytes
        return "onnx"
    if not head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "other"
    names = check_zip(path)
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "exported program"
    return "other"


def check_zip(path: Path) -> list[str]:
    """The member names of a zip archive, once its declared sizes passed the bomb check.

    torch.save stores members uncompressed, and torch's reader allocates each member's declared
    uncompressed size before inflating it: a few MB of deflated zeros could claim gigabytes. The
    members together may declare ``max(ZIP_MAX_RATIO x file size, ZIP_MIN_ALLOWANCE)`` bytes.
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise LoadError(
            f"{path} is not a readable zip archive (truncated or corrupt?): {first_line(e)}"
        ) from e
    allowed = max(ZIP_MAX_RATIO * size, ZIP_MIN_ALLOWANCE)
    total = sum(i.file_size for i in infos)
    if total > allowed:
        big = max(infos, key=lambda i: i.file_size)
        raise LoadError(
            f"{path}: zip member {big.filename!r} declares {big.file_size:,} bytes uncompressed from "
            f"{big.compress_size:,} compressed; the members declare {total:,} bytes in total, over the "
            f"limit of {allowed:,} ({ZIP_MAX_RATIO}x the file's {size:,} bytes, at least "
            f"{ZIP_MIN_ALLOWANCE // 2**20} MiB): a decompression bomb? refused before reading it"
        )
    return [i.filename for i in infos]


def refuse_pickled_object_for_model(path: Path) -> None:
    """With ``model=``, a file is a weights file: a trusted load is only for a pickled mapping (a
    checkpoint dict with non-tensor extras). Anything else (a whole module) is a usage error, told
    from the pickle's first opcodes without running any of it."""
    top = pickled_top_level(path)
    if top in ("dict", "collections.OrderedDict"):
        return
    what = f"a pickled {top}" if top else "a pickled object that is not a dict"
    raise UsageError(
        f"{path} holds {what} (a whole module?), not a state_dict; model= is only for weights "
        "files: leave model= out to load a whole module with trust=True (it was not unpickled)"
    )


def pickled_top_level(path: Path) -> str | None:
    """The class of the object a torch.save file pickles (``"dict"``, ``"pkg.mod.Class"``), read
    from its opcodes without unpickling; None when it cannot be told."""
    try:
        if read_head(path, 4) == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:  # sizes already checked by sniff
                names = z.namelist()  # torch reads <the first member's folder>/data.pkl
                name = f"{names[0].split('/', 1)[0]}/data.pkl" if names else None
                if name not in names:
                    return None
                with z.open(name) as f:
                    stream = io.BytesIO(f.read(1 << 16))
            skip = 0
        else:  # legacy format: magic number, protocol version and sys info pickles come first
            with open(path, "rb") as f:
                stream = io.BytesIO(f.read(1 << 16))
            skip = 3
        for _ in range(skip):  # genops stops after one pickle's STOP
            for _op in pickletools.genops(stream):
                pass
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                continue
            if isinstance(arg, str) and op.name.endswith("UNICODE"):
                strings.append(arg)
                continue
            if op.name == "EMPTY_DICT":
                return "dict"
            if op.name == "GLOBAL" and isinstance(arg, str):
                return arg.replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return ".".join(strings[-2:])
            return None
    except Exception:  # a malformed pickle: unknown, and so refused for model=
        return None
    return None


def looks_like_torch_save(path: Path) -> bool:
    """A torch.save file is a zip archive (the default since torch 1.6) or a pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def refuse_compiled(path: Path, kind: str, *, onnx_fold: str, alternative: str) -> None:
    """Raise :class:`LoadError` for a file of a compiled or exported ``kind`` (TorchScript,
    ``torch.export``, ONNX: :func:`sniff`) where a PyTorch module is needed; nothing for others.
    The library and the CLI word the way out in their own terms: ``onnx_fold`` names what folds
    an ONNX file, ``alternative`` the safe way to pass a module."""
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive: it is compiled code (loading it runs that code) with no "
            f"module structure left to fold; {alternative}"
        )
    if kind == "exported program":
        raise LoadError(
            f"{path} is a torch.export program (.pt2): it is already lowered to aten operators with "
            f"no module structure left to fold; {alternative}"
        )
    if kind == "onnx":
        raise LoadError(
            f"{path} is an ONNX model, not a readable torch.save file: an exported graph has no "
            f"PyTorch module for this transform to change (BatchNorm in an ONNX file folds with "
            f"{onnx_fold}); {alternative}"
        )
