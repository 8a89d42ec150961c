"""Which external data files normfold may remove when it replaces an ``.onnx`` (rule 5 of
:mod:`normfold.io.files`): only those it can prove it wrote and that nothing else uses.

normfold names the external data of ``<model>.onnx`` by its content,
``<model>.onnx.<content_digest>.data`` (a 48-bit BLAKE2b of the bytes). A file the replaced
model named may go only if all of these hold:

* it sits beside the model and its name is ``<model>.<12 hex digits>.data`` (normfold's scheme);
* it is a regular file and not an input of the run;
* its content's digest is the one in its name (proof that normfold wrote it: a file of the user's
  that happens to be named like ours fails this, with probability 1 - 2**-48);
* no ``.onnx`` file in the folder (the new model, a copy of the old one) contains its name.

Anything else a replaced model points at (the weights, an unrelated file, another tool's data)
stays.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

#: bytes of the BLAKE2b digest in a data file's name
DATA_DIGEST_SIZE = 6
_DATA = re.compile(rf"^(?P<model>.+)\.(?P<digest>[0-9a-f]{{{2 * DATA_DIGEST_SIZE}}})\.data$")


def content_digest(path: Path) -> str:
    """The hash external data is named by: ``<model>.<content_digest>.data``."""
    digest = hashlib.blake2b(digest_size=DATA_DIGEST_SIZE)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def kept_because(path: Path, model: Path, is_input: Callable[[Path], bool]) -> str | None:
    """Why ``path``, a data file the replaced ``model`` named, is not provably normfold's and
    unused (so it stays); None if it may be removed."""
    match = _DATA.match(path.name)
    if path.parent != model.parent or match is None or match["model"] != model.name:
        return "not named by normfold's scheme <model>.<hash>.data beside the model"
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "not a regular file"
        if is_input(path):
            return "an input of this run"
        if content_digest(path) != match["digest"]:
            return "its content does not match the hash in its name: normfold did not write it"
        user = _onnx_naming(path)
    except OSError as e:
        return f"cannot be checked ({e.strerror or e})"
    return f"{user} names it" if user is not None else None


def _onnx_naming(data: Path) -> Path | None:
    """An ``.onnx`` file in ``data``'s folder whose bytes contain its name (conservative: a
    model that names it as external data always does; a chance match only keeps a file)."""
    needle = data.name.encode()
    for entry in sorted(data.parent.iterdir()):
        if entry.suffix != ".onnx" or entry.name.startswith(".normfold-"):
            continue
        try:
            st = os.stat(entry)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                continue  # a FIFO would block, an empty file names nothing
            with open(entry, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return entry
        except OSError:  # unreadable: it may name the file, so the file stays
            return entry
    return None
