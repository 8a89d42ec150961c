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
   data file the replaced model named only when normfold provably wrote it (named by its own
   content's hash) and nothing else uses it (:mod:`normfold.io.datafiles`); the weights, an
   unrelated file or a copy's data stay.
6. **No stray files**: staging folders (``.normfold-<host>-<pid>-<random>.tmp``) are removed when
   the run ends, however it ends (the CLI turns SIGTERM, SIGHUP and SIGINT into an ordinary exit
   so this cleanup runs, and its handler defers them while a commit is in progress:
   :func:`defer_signal`); one left by a killed run (SIGKILL) is removed by the next run that
   writes into that folder once it can take the lock its run held (:mod:`normfold.io.staging`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from normfold.errors import ExportError, UsageError
from normfold.io.datafiles import content_digest as content_digest  # re-exported: export.py names data
from normfold.io.datafiles import kept_because
from normfold.io.staging import _HOST as _HOST  # re-exported with the staging rule's names
from normfold.io.staging import LOCK_NAME as LOCK_NAME
from normfold.io.staging import UNLOCKED_GRACE_S as UNLOCKED_GRACE_S
from normfold.io.staging import clean_stale, make_stage

logger = logging.getLogger(__name__)

#: no space, no free inode, a quota exceeded: a full filesystem (exit 6), not a usage error
_FULL = {errno.ENOSPC, errno.EDQUOT}

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
    """The files one run writes, keyed by role (the parameter that names them, e.g. ``out``).

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
        #: every path this set's commits placed; an error leaving the set carries them as its
        #: ``normfold_written`` attribute (the CLI names them when a run stops after a commit)
        self.written: list[Path] = []
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
        if value is not None and self.written:
            with contextlib.suppress(AttributeError, TypeError):
                value.normfold_written = [*getattr(value, "normfold_written", []), *self.written]  # type: ignore[attr-defined]
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
        """Move every staged file into place: extra files, then the others, ``out``, and
        ``report`` last (a report in place means that everything it names is in place too).
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
        rank = {self.paths.get("out"): 1, self.paths.get("report"): 2}
        moves += sorted(((s, d) for s, d in mains.items() if s.exists()), key=lambda m: rank.get(m[1], 0))
        roles = {p: r for r, p in self.paths.items()}
        written: list[Path] = []
        with _signals_deferred():  # a SIGTERM now would leave half a set
            for _, dest in moves:
                _check_one(roles.get(dest, "out"), dest, self.force, None)  # it may have appeared
            _check_not_inputs([(roles.get(d, "out"), d) for _, d in moves], self.inputs)
            try:
                for staged, dest in moves:
                    _move(staged, dest, self.force)
                    written.append(dest)
            except BaseException as e:
                if not self.force:  # each was created by this commit (no-clobber): take it back
                    for placed in written:
                        placed.unlink(missing_ok=True)
                    written.clear()
                self.written.extend(written)  # with force, those replaced stay replaced
                if isinstance(e, OSError):  # no space, no free inode, a quota: writing failed
                    said = "nothing was written"
                    if written:
                        said = f"{', '.join(map(str, written))} had been written"
                    raise ExportError(f"placing {dest} failed: {e.strerror or e}; {said}") from e
                raise
            self.written.extend(written)
        return written

    def remove_replaced(self, role: str, used: Iterable[Path]) -> list[Path]:
        """After a commit replaced ``role``'s file: remove the files of ``used`` (those the
        replaced file referred to, e.g. an ``.onnx``'s external data) that normfold provably
        wrote and nothing else uses (rule 5 of the module docstring). Returns those removed."""
        out = self.paths[role]
        removed = []
        for path in used:
            why = kept_because(path, out, lambda p: any(_same_file(p, i) for i in self.inputs))
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
                self._stages[folder], lock = make_stage(folder)
                self._locks.append(lock)
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
            other = f"{seen[key]}={paths[seen[key]]}"
            raise UsageError(f"{role}={path} is the same file as {other}; choose another path")
        seen[key] = role
    return paths


def _check_not_inputs(paths: Iterable[tuple[str, Path]], inputs: Iterable[Path]) -> None:
    """Rule 2: no destination (role, path) is an input (the same path, or the same file by inode)."""
    existing = [p for p in inputs if _exists(p)]
    for role, path in paths:
        for other in existing:
            if _same_file(path, other):
                raise UsageError(f"{role}={path} is an input of this run ({other}); choose another path")


def _check_one(role: str, path: Path, force: bool, formats: Sequence[str] | None) -> None:
    try:
        _check_path(role, path, force, formats)
    except OSError as e:  # e.g. a name too long, a folder that cannot be searched
        raise UsageError(f"{role}={path}: {e.strerror or e}") from e


def _check_path(role: str, path: Path, force: bool, formats: Sequence[str] | None) -> None:
    if formats is not None and path.suffix not in formats:
        suffix = path.suffix or "(none)"
        raise UsageError(f"{role}={path}: unknown format {suffix}; use {' or '.join(formats)}")
    if path.is_symlink():
        raise UsageError(f"{role}={path} is a symbolic link; normfold never writes through a link")
    if not path.parent.is_dir():
        raise UsageError(f"{role}={path}: folder {path.parent} does not exist")
    if not path.exists():
        return
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise UsageError(f"{role}={path} is a directory")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{role}={path} is a special file (FIFO, device or socket); choose a regular file")
    if not force:
        raise UsageError(f"{path} already exists; pass force=True to replace it")


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


def _appeared(dest: Path) -> UsageError:
    return UsageError(f"{dest} appeared while normfold was running; not replaced (pass force=True)")
