"""Staging folders: where a run writes its files before it commits them, and how a later run
tells a killed run's leftover from a live run's folder (rule 6 of :mod:`normfold.io.files`).

A staging folder is named ``.normfold-<host>-<pid>-<random>.tmp`` (``host`` a short hash of the
host name) and holds a lock file (:data:`LOCK_NAME`) that its run keeps ``fcntl.flock``-ed for its
whole life. The kernel releases the lock when the process ends, however it ends (SIGKILL too), so

    folder is stale  <=>  its lock can be taken (non-blocking)

whatever its pid says: a pid means nothing across PID namespaces (containers sharing a host name
and a folder) and may be reused. Another host's folder is left alone (``flock`` over NFS may not
see a remote holder). A folder without a lock file (a run between creating the folder and locking
it, or one left by an older normfold) is stale only when its pid is dead here *and* it has not
changed for :data:`UNLOCKED_GRACE_S` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_STAGE = re.compile(r"^\.normfold-([0-9a-f]{8})-(\d+)-\w+\.tmp$")

#: the lock file in a staging folder, flock-ed by its run for the run's whole life
LOCK_NAME = ".normfold.lock"
#: a staging folder without a lock file is some run's only for this long after its last change
UNLOCKED_GRACE_S = 60.0


def make_stage(folder: Path) -> tuple[Path, int]:
    """A new staging folder in ``folder`` and the descriptor that holds its lock (close it only
    after the folder is removed). Raises OSError."""
    stage = Path(tempfile.mkdtemp(prefix=f".normfold-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=folder))
    try:
        return stage, _locked(stage / LOCK_NAME)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
    those of this host whose lock this process can take."""
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
