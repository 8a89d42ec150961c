"""Report helpers: versions, step timing, JSON writing."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import pytest

from normfold.errors import ExportError
from normfold.report import StepTimer, versions, write_json


def test_versions_name_the_runtime_stack():
    v = versions()
    assert set(v) >= {"python", "normfold", "torch", "onnx", "onnxruntime"}
    assert v["torch"].startswith("2.")


def test_step_timer_wraps_each_step_in_the_hook():
    seen = []

    @contextlib.contextmanager
    def hook(name):
        seen.append(("start", name))
        yield
        seen.append(("end", name))

    steps = StepTimer(hook)
    with steps("a"):
        pass
    with steps("b"):
        pass
    assert seen == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    assert list(steps.timings) == ["a", "b"] and all(t >= 0 for t in steps.timings.values())


def test_write_json_is_readable(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": [1, 2.5, "x"]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5, "x"]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_invalid_data_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"bad": float("nan")})  # not valid JSON
    assert list(tmp_path.iterdir()) == []


def test_write_json_disk_error_is_an_export_error(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ExportError, match=r"^writing report r.json failed: No space left on device$"):
        write_json(tmp_path / "r.json", {})
