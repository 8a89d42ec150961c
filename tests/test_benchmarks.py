"""The benchmark scripts refuse what they cannot finish before the long work, and never replace a
file they were not told to (issue 19, friction 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_small_batch_refuses_an_existing_plot_or_a_missing_matplotlib_before_training(tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"mine")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "small_batch.py"), "--plot", str(plot), "--steps", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pretrained" not in done.stdout  # refused before any training
    assert ("exists; pass --force" in done.stderr) or ("--plot needs matplotlib" in done.stderr)
    assert plot.read_bytes() == b"mine"
