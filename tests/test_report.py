"""Report helpers: versions, step timing, atomic JSON."""

from __future__ import annotations

import contextlib
import json
import stat

import pytest

from normfold.errors import UsageError
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


def test_write_json_is_atomic_and_readable(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": [1, 2.5, "x"]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5, "x"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_failure_leaves_no_file(tmp_path):
    (tmp_path / "r.json").write_text("old")
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"bad": float("nan")})  # not valid JSON
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old"


def test_write_json_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        write_json(tmp_path / "nope" / "r.json", {})
