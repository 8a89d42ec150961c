"""The one rule for every file normfold writes (normfold/io/files.py), in the library and the CLI,
and a kill loop: the CLI killed with SIGKILL and SIGTERM at random moments never leaves a partial
output, a stray temporary file or a changed input.

``NORMFOLD_KILL_RUNS`` (default 6) sets how many runs the kill loop makes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from normfold.cli.app import app
from normfold.models import resnet
from typer.testing import CliRunner

import normfold.io.files as files_mod
from normfold.errors import ExportError, UsageError
from normfold.io.files import OutputSet, clean_stale

RESNET = "normfold.models:resnet"
KILL_RUNS = int(os.environ.get("NORMFOLD_KILL_RUNS", "6"))


def _stages(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".normfold-"))


def _write(files: OutputSet, role: str, text: str) -> None:
    files.staged(role).write_text(text)


# ------------------------------------------------------------------------------------------------
# OutputSet


def test_a_set_is_committed_whole_and_leaves_no_staging(tmp_path: Path) -> None:
    out, report = tmp_path / "m.pt", tmp_path / "sub" / "r.json"
    report.parent.mkdir()
    with OutputSet({"out": out, "report": report}) as files:
        assert len(_stages(tmp_path)) == 1 and len(_stages(report.parent)) == 1  # created at once
        _write(files, "out", "model")
        _write(files, "report", "{}")
        files.extra("out", "m.pt.data").write_text("data")
        assert not out.exists() and not report.exists()  # nothing in place before the commit
        written = files.commit()
    assert written == [tmp_path / "m.pt.data", out, report]  # extras first, the report last
    assert out.read_text() == "model" and report.read_text() == "{}"
    assert _stages(tmp_path) == [] and _stages(report.parent) == []


def test_an_error_before_the_commit_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_text("old")
    with pytest.raises(RuntimeError), OutputSet({"out": tmp_path / "m.pt"}, force=True) as files:
        _write(files, "out", "new")
        raise RuntimeError("a check failed")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert (tmp_path / "m.pt").read_text() == "old"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "f.json")
    return d / "f.json"


def _device(d: Path) -> Path:
    """A character device like /dev/null: made in ``d`` when allowed (root), so that a broken
    version of normfold run as root replaces a test file, not the machine's /dev/null."""
    try:
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return d / "null"
    except PermissionError:  # not root: /dev/null cannot be replaced either
        return Path(os.devnull)


def _link(d: Path) -> Path:
    (d / "target.json").write_text("precious")
    (d / "l.json").symlink_to(d / "target.json")
    return d / "l.json"


def _dangling(d: Path) -> Path:
    (d / "l.json").symlink_to(d / "nowhere.json")
    return d / "l.json"


def _existing(d: Path) -> Path:
    (d / "r.json").write_text("precious")
    return d / "r.json"


@pytest.mark.parametrize(
    ("make", "force", "message"),
    [
        (_existing, False, "r.json already exists; pass force=True to replace it"),
        (_fifo, True, "f.json is a special file (FIFO, device or socket); choose a regular file"),
        (lambda d: _device(d), True, "is a special file (FIFO, device or socket)"),
        (_link, True, "l.json is a symbolic link; normfold never writes through a link"),
        (_dangling, True, "l.json is a symbolic link; normfold never writes through a link"),
        (lambda d: d, True, "is a directory"),
        (lambda d: d / "no" / "r.json", True, "r.json: folder "),
        (lambda d: d / ("a" * 300 + ".json"), True, ".json: File name too long"),
    ],
    ids=["existing", "fifo", "device", "symlink", "dangling-symlink", "directory", "no-folder", "long-name"],
)
def test_refused_destinations(
    tmp_path: Path, make: Callable[[Path], Path], force: bool, message: str
) -> None:
    path = make(tmp_path)
    before = {p.name: p.is_file() and p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UsageError) as e:
        OutputSet({"report": path}, force=force)
    assert message in str(e.value)
    # nothing written through a link, no staging folder left
    assert {p.name: p.is_file() and p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_destination_may_not_be_an_input_or_another_output(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_text("weights")
    (tmp_path / "alias.pt").hardlink_to(weights)
    for path in (weights, tmp_path / "alias.pt", tmp_path / "." / "w.pt"):
        with pytest.raises(UsageError, match=r"^report=.* is an input of this run \(.*w.pt\)"):
            OutputSet({"report": path}, inputs=[weights], force=True)
    same = r"^report=.*o.pt is the same file as out=.*o.pt; choose another path"
    with pytest.raises(UsageError, match=same):
        OutputSet({"out": tmp_path / "o.pt", "report": tmp_path / "o.pt"})
    assert weights.read_text() == "weights"


def test_no_clobber_at_the_final_rename(tmp_path: Path) -> None:
    """Two runs to one path: existence is checked again when committing; the first one wins."""
    out = tmp_path / "m.pt"
    with OutputSet({"out": out}) as first, OutputSet({"out": out}) as second:
        _write(first, "out", "first")
        _write(second, "out", "second")
        first.commit()
        with pytest.raises(UsageError, match=r"m.pt already exists; pass force=True"):
            second.commit()
    assert out.read_text() == "first"
    assert _stages(tmp_path) == []


def test_no_clobber_against_a_file_that_appears_between_check_and_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's link fails (a concurrent run won the name): the data and the report this
    commit had already placed are taken back, the other run's file is untouched."""
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    monkeypatch.setattr(files_mod, "_check_one", lambda *a: None)  # the race: the checks pass
    with OutputSet({"out": out, "report": report}) as files:
        _write(files, "out", "new")
        _write(files, "report", "{}")
        files.extra("out", "m.onnx.0123456789ab.data").write_text("data")
        out.write_text("appeared")
        with pytest.raises(UsageError, match="appeared while normfold was running; not replaced"):
            files.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert out.read_text() == "appeared"


def test_the_report_is_committed_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed (SIGKILL: no handler, no rollback) between two renames of its commit never
    leaves a report about a model that is not in place: data, saved inputs, model, report last."""
    out, report, saved = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "x.pt"
    roles = {"out": out, "report": report, "save_inputs": saved}
    moves: list[str] = []

    def killed_at_the_model(staged: Path, dest: Path, force: bool) -> None:
        moves.append(dest.name)
        if dest == out:
            raise SystemExit(-9)  # the process ends here: nothing after this rename happens
        os.replace(staged, dest)

    monkeypatch.setattr(files_mod, "_move", killed_at_the_model)
    with pytest.raises(SystemExit), OutputSet(roles, force=True) as files:
        for role in roles:
            _write(files, role, role)
        files.extra("out", "m.onnx.0123456789ab.data").write_text("data")
        files.commit()
    assert moves == ["m.onnx.0123456789ab.data", "x.pt", "m.onnx"]
    assert not report.exists() and not out.exists()


def _no_inode_for(target: str) -> Callable[[Path, Path, bool], None]:
    """A ``_move`` that fails like a filesystem without a free inode when it reaches ``target``."""
    real = files_mod._move

    def move(staged: Path, dest: Path, force: bool) -> None:
        if dest.name == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        real(staged, dest, force)

    return move


@pytest.mark.parametrize("force", [False, True])
def test_no_free_inode_at_the_commit_is_a_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """ENOSPC at a rename of the commit: ExportError (exit 6) saying what had been written; without
    force the files this commit placed are taken back, with force those replaced stay."""
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    monkeypatch.setattr(files_mod, "_move", _no_inode_for("m.onnx"))
    data = tmp_path / "m.onnx.0123456789ab.data"
    said = f"{data} had been written" if force else "nothing was written"
    roles = {"out": out, "report": report}
    with pytest.raises(ExportError) as exc, OutputSet(roles, force=force) as files:
        _write(files, "out", "model")
        _write(files, "report", "{}")
        files.extra("out", data.name).write_text("data")
        files.commit()
    assert str(exc.value) == f"placing {out} failed: No space left on device; {said}"
    assert exc.value.exit_code == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ([data.name] if force else [])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_free_inode_for_the_staging_folder_is_a_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def full(**kwargs: object) -> str:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(ExportError) as exc:
        OutputSet({"out": tmp_path / "m.pt"})
    assert str(exc.value) == f"cannot write into folder {tmp_path}: {os.strerror(code)}; nothing was written"
    assert exc.value.exit_code == 6


def test_cli_no_free_inode_at_the_commit_exits_6(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files_mod, "_move", _no_inode_for("o.onnx"))
    result = CliRunner().invoke(app, ["fold", "normfold.models:mlp", "--out", "o.onnx", "--report", "r.json"])
    assert result.exit_code == 6, result.output
    said = "error: placing o.onnx failed: No space left on device; nothing was written"
    assert result.stderr.strip() == said
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the failed run's report found room
    failure = json.loads((tmp_path / "r.json").read_text())["failure"]
    assert (failure["step"], failure["exit_code"]) == ("write", 6)


class Stopped(Exception):
    pass


def test_a_signal_during_the_commit_is_delivered_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM arriving between two moves of a set (with --force: no rollback) waits for the
    last move: the set is whole, then the handler stops the run."""

    def handler(signum: int, frame: object) -> None:
        if not files_mod.defer_signal(signum):
            raise Stopped(signum)

    moves = []

    def move_then_signal(staged: Path, dest: Path, force: bool) -> None:
        moves.append(dest.name)
        if len(moves) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this (main) thread
        os.replace(staged, dest)

    out, report = tmp_path / "m.pt", tmp_path / "r.json"
    out.write_text("old")
    report.write_text("old")
    monkeypatch.setattr(files_mod, "_move", move_then_signal)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        roles = {"out": out, "report": report}
        with pytest.raises(Stopped) as stopped, OutputSet(roles, force=True) as files:
            _write(files, "out", "new")
            _write(files, "report", "new")
            files.commit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert moves == ["m.pt", "r.json"]
    assert out.read_text() == report.read_text() == "new"
    assert stopped.value.normfold_written == [out, report]  # what the CLI names as written


def test_an_unwritable_folder_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(**kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # root ignores a read-only folder's mode
    with pytest.raises(UsageError, match=rf"^cannot write into folder {tmp_path}: Permission denied$"):
        OutputSet({"out": tmp_path / "m.pt"})


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def test_stale_staging_is_removed_when_its_lock_is_free(tmp_path: Path) -> None:
    """A staging folder is its run's while the run holds its lock (the kernel drops it when the
    process ends): one whose lock is free is removed; one whose lock is held stays, even when
    its pid says dead (a run in another PID namespace); another host's is left alone."""
    dead, host = _dead_pid(), files_mod._HOST
    free = tmp_path / f".normfold-{host}-{dead}-abc123.tmp"
    held = tmp_path / f".normfold-{host}-{dead}-def456.tmp"  # pid dead here, alive elsewhere
    alive_free = tmp_path / f".normfold-{host}-{os.getpid()}-jkl012.tmp"  # pid reused, run gone
    other_host = tmp_path / f".normfold-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-ghi789.tmp"
    for d in (free, held, alive_free, other_host):
        d.mkdir()
        (d / "partial.onnx").write_bytes(b"\0" * 100)
        (d / files_mod.LOCK_NAME).touch()
    (tmp_path / ".normfold-notes.tmp").mkdir()  # not ours: no pid in the name
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(held / files_mod.LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert sorted(clean_stale(tmp_path)) == sorted([free, alive_free])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [held.name, other_host.name, ".normfold-notes.tmp"]
        )
        with OutputSet({"out": tmp_path / "m.pt"}):  # a run writing into the folder keeps it too
            assert held.exists()
    finally:
        holder.kill()
        holder.wait()
    with OutputSet({"out": tmp_path / "m.pt"}):  # its run is gone: the next run removes it
        assert not held.exists()


def test_a_staging_folder_without_a_lock_file_goes_only_when_old_and_dead(tmp_path: Path) -> None:
    """No lock file: a run between creating its folder and locking it (kept), or a folder left by
    an older normfold (removed once its pid is dead and it is older than the grace period)."""
    dead, host = _dead_pid(), files_mod._HOST
    fresh = tmp_path / f".normfold-{host}-{dead}-abc123.tmp"
    old = tmp_path / f".normfold-{host}-{dead}-def456.tmp"
    old_alive = tmp_path / f".normfold-{host}-{os.getpid()}-ghi789.tmp"
    for d in (fresh, old, old_alive):
        d.mkdir()
    past = time.time() - files_mod.UNLOCKED_GRACE_S - 5
    for d in (old, old_alive):
        os.utime(d, (past, past))
    assert clean_stale(tmp_path) == [old]


def test_a_run_holds_the_lock_of_its_staging_folder(tmp_path: Path) -> None:
    """While a set is open another process cannot take its lock (so cannot remove its folder);
    the lock file is never committed."""
    with OutputSet({"out": tmp_path / "m.pt"}) as files:
        lock = files.staged("out").parent / files_mod.LOCK_NAME
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(lock)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr, probe.stderr
        assert clean_stale(tmp_path) == []
        _write(files, "out", "model")
        assert files.commit() == [tmp_path / "m.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ------------------------------------------------------------------------------------------------
# the CLI: --report and --out never destroy a file


def _weights(d: Path) -> Path:
    torch.save(resnet().state_dict(), d / "w.pt")
    return d / "w.pt"


REPORT_CASES = [
    # id, args (after `normfold`), the error line's message
    ("report-is-weights",
     ["fold", "w.pt", "--model", RESNET, "--out", "o.onnx", "--report", "w.pt", "--force"],
     "--report w.pt is an input of this run"),
    ("report-is-out",
     ["fold", "w.pt", "--model", RESNET, "--out", "o.onnx", "--report", "o.onnx"],
     "--report o.onnx is the same file as --out o.onnx"),
    ("report-is-inputs",
     ["fold", RESNET, "--inputs", "x.pt", "--out", "o.onnx", "--report", "x.pt", "--force"],
     "--report x.pt is an input of this run"),
    ("report-is-fifo",
     ["fold", RESNET, "--out", "o.onnx", "--report", "fifo", "--force"],
     "--report fifo is a special file"),
    ("report-is-a-device",
     ["fold", RESNET, "--out", "o.onnx", "--report", "DEVICE", "--force"],
     "--report DEVICE is a special file"),
    ("report-exists",
     ["fold", RESNET, "--out", "o.onnx", "--report", "old.json"],
     "old.json already exists; pass --force"),
    ("inspect-report-exists",
     ["inspect", RESNET, "--report", "old.json"],
     "old.json already exists; pass --force"),
    ("inspect-report-is-weights",
     ["inspect", "w.pt", "--model", RESNET, "--report", "w.pt", "--force"],
     "--report w.pt is an input of this run"),
    ("inspect-report-is-inputs",
     ["inspect", RESNET, "--inputs", "x.pt", "--report", "x.pt", "--force"],
     "--report x.pt is an input of this run"),
    ("report-is-symlink",
     ["fold", RESNET, "--out", "o.onnx", "--report", "link.json", "--force"],
     "--report link.json is a symbolic link"),
    ("out-is-symlink",
     ["fold", RESNET, "--out", "link.onnx", "--force"],
     "--out link.onnx is a symbolic link"),
    # the factory's own module is an input like the weights (each case its own module name: an
    # imported module stays in sys.modules, under the file of the folder it was first found in)
    ("report-is-the-factory-module",
     ["fold", "rfac_fold:build", "--out", "o.onnx", "--report", "rfac_fold.py", "--force"],
     "--report rfac_fold.py is an input of this run"),
    ("report-is-the-architecture-module",
     ["fold", "w.pt", "--model", "rfac_arch:build", "--out", "o.onnx", "--report", "rfac_arch.py", "--force"],
     "--report rfac_arch.py is an input of this run"),
    ("report-is-a-module-the-factory-imports",
     ["fold", "rfac_outer:build", "--out", "o.onnx", "--report", "rfac_inner.py", "--force"],
     "--report rfac_inner.py is an input of this run"),
    ("inspect-report-is-the-factory-module",
     ["inspect", "rfac_inspect:build", "--report", "rfac_inspect.py", "--force"],
     "--report rfac_inspect.py is an input of this run"),
    ("recalibrate-report-is-the-architecture-module",
     ["recalibrate", "w.pt", "--model", "rfac_recal:build", "--data", "x.pt", "--out", "n.pt", "--report",
      "rfac_recal.py", "--force"],
     "--report rfac_recal.py is an input of this run"),
    ("drop-bias-report-is-the-factory-module",
     ["drop-bias", "rfac_drop:build", "--input-shape", "2,3,32,32", "--out", "d.pt", "--report",
      "rfac_drop.py", "--force"],
     "--report rfac_drop.py is an input of this run"),
    ("recalibrate-report-is-data",
     ["recalibrate", "w.pt", "--model", RESNET, "--data", "x.pt", "--out", "n.pt", "--report", "x.pt",
      "--force"],
     "--report x.pt is an input of this run"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in REPORT_CASES], ids=[c[0] for c in REPORT_CASES])
def test_cli_never_overwrites_an_input_or_a_special_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _weights(tmp_path)
    torch.save(torch.randn(2, 3, 32, 32), tmp_path / "x.pt")
    (tmp_path / "old.json").write_text("precious")
    (tmp_path / "target").write_text("precious")
    (tmp_path / "link.json").symlink_to("target")
    (tmp_path / "link.onnx").symlink_to("target")
    os.mkfifo(tmp_path / "fifo")
    for name in ("fold", "arch", "inspect", "recal", "drop", "inner"):
        (tmp_path / f"rfac_{name}.py").write_text("from normfold.models import resnet as build\n")
    outer = "def build():\n    import rfac_inner\n    return rfac_inner.build()\n"
    (tmp_path / "rfac_outer.py").write_text(outer)
    device = str(_device(tmp_path))
    args, message = [device if a == "DEVICE" else a for a in args], message.replace("DEVICE", device)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "fifo"}
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "fifo"}
    assert after == before  # nothing written, nothing replaced, no staging folder
    assert _stages(tmp_path) == []


def test_cli_report_failure_writes_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is part of the set: if it cannot be written, the model is not written either."""
    import normfold.report as report_mod

    monkeypatch.chdir(tmp_path)

    def full(path: Path, data: object) -> Path:
        raise report_mod.ExportError(f"writing report {Path(path).name} failed: No space left on device")

    monkeypatch.setattr("normfold.session.write_json", full)
    result = CliRunner().invoke(app, ["fold", "normfold.models:mlp", "--out", "o.onnx", "--report", "r.json"])
    assert result.exit_code == 6, result.output
    assert result.stderr.strip() == "error: writing report r.json failed: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_cli_replaces_with_force_and_removes_the_old_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import normfold.io.export as export_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1)  # every export takes the external-data path
    args = ["fold", "normfold.models:resnet", "--out", "o.onnx", "--report", "r.json"]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = sorted(p.name for p in tmp_path.iterdir())
    assert len(first) == 3 and first[0] == "o.onnx" and first[1].endswith(".data"), first
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1 << 40)  # now small enough to be inline
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "r.json"]  # no stale .data
    onnx.checker.check_model("o.onnx", full_check=True)


def test_cli_force_removes_only_data_normfold_provably_wrote_and_nothing_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replaced .onnx names, as external data: the run's own weights, an unrelated file, a
    file in normfold's naming scheme whose content does not match its hash, and normfold's real
    data which a copy of the model (backup.onnx) still uses. --force removes none of them."""
    from onnx.external_data_helper import _get_all_tensors

    import normfold.io.export as export_mod

    monkeypatch.chdir(tmp_path)
    weights = _weights(tmp_path)
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1)  # the first export takes the external-data path
    args = ["fold", "w.pt", "--model", RESNET, "--out", "o.onnx"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (data,) = tmp_path.glob("o.onnx.*.data")
    (tmp_path / "backup.onnx").write_bytes((tmp_path / "o.onnx").read_bytes())  # a copy, same data
    (tmp_path / "notes.txt").write_text("precious")
    fake = tmp_path / "o.onnx.0123456789ab.data"  # normfold's scheme, but not its content's hash
    fake.write_text("precious")
    proto = onnx.load("o.onnx", load_external_data=False)
    tensors = [t for t in _get_all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor, name in zip(tensors, ["w.pt", "notes.txt", fake.name], strict=False):
        (entry,) = [e for e in tensor.external_data if e.key == "location"]
        entry.value = name
    onnx.save(proto, "o.onnx")
    before = {p.name: p.read_bytes() for p in (weights, tmp_path / "notes.txt", fake, data)}
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1 << 40)  # the new model is inline
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # every one still there
    onnx.checker.check_model("backup.onnx", full_check=True)  # the copy still finds its data
    # with the copy gone, normfold's own data, now unused, goes with the next replacement
    (tmp_path / "backup.onnx").unlink()
    (tmp_path / "o.onnx").write_bytes(proto.SerializeToString())
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.onnx", "w.pt", "notes.txt", fake.name])


# ------------------------------------------------------------------------------------------------
# the kill loop


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _consistent(folder: Path, strict: bool) -> str | None:
    """None if the outputs in ``folder`` are absent or complete: the model checks with its data,
    the report is valid. ``strict`` (no SIGKILL): the report lists exactly the files there."""
    out, report = folder / "o.onnx", folder / "r.json"
    if not out.exists():
        return "a report without its model" if report.exists() else None
    try:
        onnx.checker.check_model(str(out), full_check=True)  # loads the external data too
        listed = json.loads(report.read_text())["export"]["files"]
    except Exception as e:
        return f"outputs do not check: {e!r}"
    there = sorted(p.name for p in folder.iterdir() if p.name.startswith("o.onnx"))
    if strict and sorted(Path(f).name for f in listed) != there:
        return f"the report lists {listed}, the folder holds {there}"
    return None


def test_kill_loop_leaves_old_or_complete_outputs_and_no_stray_files(tmp_path: Path) -> None:
    """SIGTERM and SIGKILL, alternately, at random moments of a `fold --force` run that writes a
    model, its external data and a report over a previous run's."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    weights = _weights(work)
    digest = _sha(weights)
    env = {**os.environ, "TMPDIR": str(tmp)}
    # the 2 GB external-data threshold lowered to 1 byte, so the set has three files
    cli = [sys.executable, "-c", "import normfold.io.export as e; e._ONNX_MAX_PROTO = 1; "
           "from normfold.cli.app import main; main()"]  # fmt: skip
    args = ["fold", "w.pt", "--model", RESNET, "--out", "o.onnx", "--report", "r.json", "--force", "-q"]
    rng = random.Random(8)
    start = time.perf_counter()
    full = subprocess.run([*cli, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    duration = time.perf_counter() - start
    interrupted = {signal.SIGTERM: 0, signal.SIGKILL: 0}
    for run in range(KILL_RUNS):
        sig = (signal.SIGTERM, signal.SIGKILL)[run % 2]
        proc = subprocess.Popen([*cli, *args], cwd=work, env=env, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        interrupted[sig] += proc.returncode != 0
        if sig == signal.SIGTERM:
            # -SIGTERM: killed while Python was still importing, before main() took the signal
            assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), stderr
            if proc.returncode == 128 + signal.SIGTERM:
                last = stderr.strip().splitlines()[-1]
                said = re.fullmatch(r"error: stopped by SIGTERM; (nothing was|.* had been) written", last)
                assert said, last
            # its own staging folder removed on the way out (a SIGKILLed run's waits for the next)
            assert not any(f"-{proc.pid}-" in name for name in _stages(work))
        assert _consistent(work, strict=sig == signal.SIGTERM) is None, _consistent(work, strict=False)
        assert _sha(weights) == digest
    assert all(interrupted.values()), interrupted  # the loop really interrupted runs, by both signals
    final = subprocess.run([*cli, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert _stages(work) == [] and _consistent(work, strict=True) is None  # stale staging cleaned
    left = sorted(p.name for p in work.iterdir() if not p.name.endswith(".data"))
    assert left == ["o.onnx", "r.json", "w.pt"]
    # nothing left in the temporary folder either, but the libraries' own caches: onnxruntime's
    # session-id file and torch's compile cache folder
    caches = [p for p in tmp.iterdir() if p.name == ".ses" or p.name.startswith("torchinductor_")]
    assert sorted(tmp.iterdir()) == sorted(caches)
    print(f"kill loop: {KILL_RUNS} runs, interrupted {interrupted[signal.SIGTERM]} by SIGTERM and "
          f"{interrupted[signal.SIGKILL]} by SIGKILL; 0 partial outputs, 0 stray files, input unchanged")
    assert _sha(weights) == digest
