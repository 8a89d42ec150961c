"""Every file normfold writes (``out``, its ONNX external data, ``report``) follows one rule.

1. **Checked before any work**: a destination must have a known format, its folder must exist
   and be writable (a private staging folder is created there at once, which proves it), and it
   must not be a directory, a special file (FIFO, device, socket) or a symbolic link (normfold
   never writes through a link it did not create, even with ``force``).
2. **Never an input or another output**: a destination may not be the same file (path or inode)
   as any input of the run or any other destination.
3. **No overwrite without force**, checked at the start *and* at the final rename: without
   ``force`` a file is committed with ``os.link`` (which fails if the name appeared meanwhile, so
   two concurrent runs cannot both win), with ``force`` with ``os.replace``.
4. **Atomic as a set**: everything is written into the staging folder first, and committed only
   after every check of the run passed, extra files (external data) first, then the main output,
   the report last, so a reader never sees a model without its data, and a report (``status:
   ok``, naming the model) only once the model and its data are in place: a run killed between
   two renames (SIGKILL) leaves at worst a new model beside the previous run's report.
5. **Only its own files are removed**: replacing an ``.onnx`` (``force``) removes an external
   data file the replaced model named only when normfold provably wrote it and nothing else
   uses it (:meth:`OutputSet.remove_replaced`): named by normfold's scheme
   ``<model>.<hash>.data`` with ``hash`` the content's own (:func:`content_digest`), in the
   model's folder, not an input of the run, not named by any ``.onnx`` file in that folder
   (the new model, a copy of the old one). Any other name a replaced model points at (the
   weights, an unrelated file, data another tool wrote) stays.
6. **No stray files**: staging folders are named ``.normfold-<host>-<pid>-<random>.tmp``
   (``host`` a short hash of the host name); they are removed when the run ends, however it ends
   (the CLI turns SIGTERM, SIGHUP and SIGINT into an ordinary exit so this cleanup runs, and its
   handler defers them while a commit is in progress: :func:`defer_signal`). One left by a killed
   run (SIGKILL) is removed by the next run that writes into that folder, if that run can take
   its lock: every staging folder holds a lock file (:data:`LOCK_NAME`) that its run keeps
   ``fcntl.flock``-ed for its whole life, and the kernel releases that lock when the process
   ends, however it ends. A pid says nothing across PID namespaces (containers sharing a host
   name and a folder) and may be reused; a lock does not lie. Another host's folder is left
   alone (``flock`` over NFS may not see a remote holder), and a folder without a lock file (a
   run between creating the folder and locking it, or an older normfold's) is removed only when
   its pid is dead and it is older than :data:`UNLOCKED_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from normfold.errors import ExportError, UsageError

logger = logging.getLogger(__name__)

_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_STAGE = re.compile(r"^\.normfold-([0-9a-f]{8})-(\d+)-\w+\.tmp$")

#: no space, no free inode, a quota exceeded: a full filesystem (exit 6), not a usage error
_FULL = {errno.ENOSPC, errno.EDQUOT}

#: the lock file in a staging folder, flock-ed by its run for the run's whole life
LOCK_NAME = ".normfold.lock"
#: a staging folder without a lock file is some run's only for this long after its last change
UNLOCKED_GRACE_S = 60.0

#: ``<model>.<hash>.data``: external data named by :func:`content_digest` of its bytes
DATA_DIGEST_SIZE = 6
_DATA = re.compile(rf"^(?P<model>.+)\.(?P<digest>[0-9a-f]{{{2 * DATA_DIGEST_SIZE}}})\.data$")

#: every path a commit of this process placed (the CLI names them if a signal stops it later)
committed: list[Path] = []
_commit_state: dict[str, int | None] = {"depth": 0, "pending": None}


def defer_signal(signum: int) -> bool:
    """For a signal handler: True (and the signal is delivered again when the commit is done)
    if a commit is in progress, so that the set is never left half committed."""
    if not _commit_state["depth"]:
        return False
    _commit_state["pending"] = signum
    return True


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    _commit_state["depth"] = (_commit_state["depth"] or 0) + 1
    try:
        yield
    finally:
        _commit_state["depth"] = (_commit_state["depth"] or 1) - 1
        pending, _commit_state["pending"] = _commit_state["pending"], None
        if pending is not None and not _commit_state["depth"]:
            signal.raise_signal(pending)  # now the handler ends the run


class OutputSet:
    """The files one run writes, keyed by role (the option that names them, e.g. ``--out``).

    Use as a context manager: destinations are checked on construction, :meth:`staged` gives the
    path to write each one to, :meth:`commit` moves the set into place, and leaving the context
    removes the staging folders whatever happened.
    """

    def __init__(
        self,
        outputs: Mapping[str, str | Path | None],
        *,
        inputs: Iterable[str | Path | None] = (),
        force: bool = False,
        formats: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.force = force
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.paths = check_outputs(outputs, inputs=self.inputs, force=force, formats=formats)
        self._stages: dict[Path, Path] = {}
        self._locks: list[int] = []  # descriptors of the flock-ed lock files, held until close()
        try:
            for path in self.paths.values():
                self._stage_for(path)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add_inputs(self, inputs: Iterable[str | Path]) -> None:
        """Inputs known only once the run has started (e.g. the source file of the factory module
        a load imported): a destination that is one of them is refused now (UsageError), and
        :meth:`commit` refuses to place any file over any input of the run."""
        added = [Path(p) for p in inputs]
        self.inputs += added
        _check_not_inputs(self.paths.items(), added)

    def staged(self, role: str) -> Path:
        """Where to write ``role``'s file: a private staging folder beside its destination."""
        path = self.paths[role]
        return self._stage_for(path) / path.name

    def extra(self, role: str, name: str) -> Path:
        """Where to write a file that goes beside ``role``'s (e.g. its external data)."""
        return self._stage_for(self.paths[role]) / name

    def commit(self, roles: Iterable[str] | None = None) -> list[Path]:
        """Move every staged file into place: extra files, then the others, ``--out``, and
        ``--report`` last (a report in place means that everything it names is in place too).
        With ``roles``, only those roles' files (no extras: a failed run commits its report).

        Every destination is checked again first; if one appears between that check and its
        no-clobber link (a concurrent run), the files this commit already placed are removed."""
        chosen = self.paths if roles is None else {r: self.paths[r] for r in roles if r in self.paths}
        mains = {self._stage_for(p) / p.name: p for p in chosen.values()}
        every_main = {self._stage_for(p) / p.name for p in self.paths.values()}
        moves = [  # extras (files the writers put beside a main file), then mains, --report last
            (f, f.parent.parent / f.name)
            for stage in (dict.fromkeys(self._stages.values()) if roles is None else {})
            for f in sorted(stage.iterdir())
            if f not in every_main and f.name != LOCK_NAME
        ]
        rank = {self.paths.get("--out"): 1, self.paths.get("--report"): 2}
        moves += sorted(((s, d) for s, d in mains.items() if s.exists()), key=lambda m: rank.get(m[1], 0))
        roles = {p: r for r, p in self.paths.items()}
        written: list[Path] = []
        with _signals_deferred():  # a SIGTERM now would leave half a set
            for _, dest in moves:
                _check_one(roles.get(dest, "--out"), dest, self.force, None)  # it may have appeared
            _check_not_inputs([(roles.get(d, "--out"), d) for _, d in moves], self.inputs)
            try:
                for staged, dest in moves:
                    _move(staged, dest, self.force)
                    written.append(dest)
            except BaseException as e:
                if not self.force:  # each was created by this commit (no-clobber): take it back
                    for placed in written:
                        placed.unlink(missing_ok=True)
                    written.clear()
                committed.extend(written)  # with force, those replaced stay replaced
                if isinstance(e, OSError):  # no space, no free inode, a quota: writing failed
                    said = "nothing was written"
                    if written:
                        said = f"{', '.join(map(str, written))} had been written"
                    raise ExportError(f"placing {dest} failed: {e.strerror or e}; {said}") from e
                raise
            committed.extend(written)
        return written

    def remove_replaced(self, role: str, used: Iterable[Path]) -> list[Path]:
        """After a commit replaced ``role``'s file: remove the files of ``used`` (those the
        replaced file referred to, e.g. an ``.onnx``'s external data) that normfold provably
        wrote and nothing else uses (rule 5 of the module docstring). Returns those removed."""
        out = self.paths[role]
        removed = []
        for path in used:
            why = _kept_because(path, out, self.inputs)
            if why is None:
                try:
                    path.unlink()
                except OSError as e:  # the new set is in place; an old file left is no failure
                    why = f"cannot be removed ({e.strerror or e})"
            if why is not None:
                logger.info("kept %s, which the replaced %s named: %s", path, out, why)
                continue
            removed.append(path)
            logger.info("removed %s: the replaced %s used it, nothing else does", path, out)
        return removed

    def close(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()
        for fd in self._locks:  # after the folders are gone: no other run may take them before
            os.close(fd)
        self._locks.clear()

    def _stage_for(self, path: Path) -> Path:
        folder = path.parent
        if folder not in self._stages:
            clean_stale(folder)
            try:
                stage = Path(
                    tempfile.mkdtemp(prefix=f".normfold-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=folder)
                )
                self._stages[folder] = stage
                self._locks.append(_locked(stage / LOCK_NAME))
            except OSError as e:
                message = f"cannot write into folder {folder}: {e.strerror or e}"
                if e.errno in _FULL:  # the folder is fine, the filesystem is full: writing failed
                    raise ExportError(f"{message}; nothing was written") from e
                raise UsageError(message) from e
        return self._stages[folder]


#: What ``--out`` can be: a folded model (``fold``) or a state dict that loads into the
#: architecture (``recalibrate``; ``drop-bias`` and ``swap`` take either).
MODEL_FORMATS = (".onnx", ".pt2")
STATE_FORMATS = (".pt", ".pth", ".safetensors")
ANY_FORMATS = (*STATE_FORMATS, *MODEL_FORMATS)


def check_outputs(
    outputs: Mapping[str, str | Path | None],
    *,
    inputs: Iterable[str | Path | None] = (),
    force: bool = False,
    formats: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Path]:
    """Rules 1-3 for every destination (all but the writable folder, which staging proves), by
    role; nothing is created. The CLI runs this before it imports torch, then :class:`OutputSet`."""
    paths = {role: Path(p) for role, p in outputs.items() if p is not None}
    seen: dict[str, str] = {}
    for role, path in paths.items():
        _check_one(role, path, force, (formats or {}).get(role))
        _check_not_inputs([(role, path)], [Path(p) for p in inputs if p is not None])
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(f"{role} {path} is also the {seen[key]} of this run; choose another path")
        seen[key] = role
    return paths


def _check_not_inputs(paths: Iterable[tuple[str, Path]], inputs: Iterable[Path]) -> None:
    """Rule 2: no destination (role, path) is an input (the same path, or the same file by inode)."""
    existing = [p for p in inputs if _exists(p)]
    for role, path in paths:
        for other in existing:
            if _same_file(path, other):
                raise UsageError(f"{role} {path} is an input of this run ({other}); choose another path")


def _check_one(role: str, path: Path, force: bool, formats: Sequence[str] | None) -> None:
    try:
        _check_path(role, path, force, formats)
    except OSError as e:  # e.g. a name too long, a folder that cannot be searched
        raise UsageError(f"{role} {path}: {e.strerror or e}") from e


def _check_path(role: str, path: Path, force: bool, formats: Sequence[str] | None) -> None:
    if formats is not None and path.suffix not in formats:
        suffix = path.suffix or "(none)"
        raise UsageError(f"{role} {path}: unknown format {suffix}; use {' or '.join(formats)}")
    if path.is_symlink():
        raise UsageError(f"{role} {path} is a symbolic link; normfold never writes through a link")
    if not path.parent.is_dir():
        raise UsageError(f"{role} {path}: folder {path.parent} does not exist")
    if not path.exists():
        return
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise UsageError(f"{role} {path} is a directory")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{role} {path} is a special file (FIFO, device or socket); choose a regular file")
    if not force:
        raise UsageError(f"{path} already exists; pass --force to replace it")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # unreadable: the loader reports it
        return False


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return a.exists() and os.path.samefile(a, b)
    return False


def _move(staged: Path, dest: Path, force: bool) -> None:
    if force:
        os.replace(staged, dest)
        return
    try:
        os.link(staged, dest)  # fails if dest exists: no-clobber, even against a concurrent run
    except FileExistsError as e:
        raise _appeared(dest) from e
    except OSError:  # a filesystem without hard links: exclusive create, then replace
        try:
            with open(dest, "x"):
                pass
        except FileExistsError as e:
            raise _appeared(dest) from e
        try:
            os.replace(staged, dest)
        except BaseException:
            dest.unlink(missing_ok=True)  # the placeholder this call created
            raise
        return
    staged.unlink()


def content_digest(path: Path) -> str:
    """The hash external data is named by: ``<model>.<content_digest>.data``."""
    digest = hashlib.blake2b(digest_size=DATA_DIGEST_SIZE)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _kept_because(path: Path, model: Path, inputs: Iterable[Path]) -> str | None:
    """Why ``path``, a data file the replaced ``model`` named, is not provably normfold's and
    unused (so it stays); None if it may be removed."""
    match = _DATA.match(path.name)
    if path.parent != model.parent or match is None or match["model"] != model.name:
        return "not named by normfold's scheme <model>.<hash>.data beside the model"
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if any(_same_file(path, p) for p in inputs):
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


def _appeared(dest: Path) -> UsageError:
    return UsageError(f"{dest} appeared while normfold was running; not replaced (pass --force)")


def _locked(path: Path) -> int:
    """Create ``path`` and hold an exclusive flock on it; the open descriptor (not inherited by
    programs this process starts) keeps the lock until it is closed or the process ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale(folder: Path) -> list[Path]:
    """Remove staging folders left in ``folder`` by runs that no longer exist (killed runs):
    those of this host whose lock this process can take (rule 6 of the module docstring)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = _STAGE.match(entry.name)
            if not match or match.group(1) != _HOST:  # another host's lock may be invisible here
                continue
            if entry.is_dir() and not entry.is_symlink() and _remove_if_stale(entry, int(match.group(2))):
                removed.append(entry)
                logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _remove_if_stale(stage: Path, pid: int) -> bool:
    """Remove ``stage`` if no live run holds its lock; True if removed."""
    try:
        fd = os.open(stage / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # being created right now, or an older normfold's: pid and age
        try:
            age = time.time() - os.lstat(stage).st_mtime
        except OSError:  # removed meanwhile (another run cleaned it)
            return False
        if _alive(pid) or age < UNLOCKED_GRACE_S:
            return False
        shutil.rmtree(stage, ignore_errors=True)
        return True
    except OSError:  # a link or something unreadable in its place: not ours to judge
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its run is alive, whatever its pid says here
            return False
        shutil.rmtree(stage, ignore_errors=True)  # holding the lock: its run is gone
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
