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


def test_onnx_peers_refuses_an_existing_json_and_counts_only_data_path_norms(tmp_path: Path) -> None:
    import importlib.util

    import onnx_rows as rows
    from onnx import helper as h

    table = tmp_path / "peers.json"
    table.write_text("mine")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "onnx_peers.py"), "run", "--json", str(table)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "exists; pass --force" in done.stderr, done.stderr
    assert table.read_text() == "mine"
    spec = importlib.util.spec_from_file_location("onnx_peers", ROOT / "benchmarks" / "onnx_peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    assert peers.counts(rows.conv_mul_add())["affine"] == 2  # Mul by and Add of per-channel constants
    assert peers.counts(rows.conv_bn_relu())["bn"] == 1
    model = rows.conv_bn_relu()
    model.graph.node.insert(0, h.make_node("Sqrt", ["bn.running_var"], ["s"]))  # a weight computed at load:
    model.graph.node.insert(1, h.make_node("Mul", ["s", "bn.weight"], ["w2"]))  # off the data path
    assert peers.counts(model)["affine"] == 0


def test_norm_affine_refuses_an_existing_json_before_importing_transformers(tmp_path: Path) -> None:
    import importlib.util

    table = tmp_path / "norm_affine.json"
    table.write_text("mine")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "norm_affine.py"), "--json", str(table)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "exists; pass --force" in done.stderr, done.stderr
    assert table.read_text() == "mine"
    spec = importlib.util.spec_from_file_location("norm_affine_bench", ROOT / "benchmarks" / "norm_affine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # imports neither transformers nor torch at module level
    assert len({model_type for model_type, _, _ in bench.ARCHS.values()}) >= 35  # the goal
