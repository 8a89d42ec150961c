"""Peak memory of ``normfold fold model.onnx --out folded.onnx`` on an ONNX file of several GB (issue 21).

Not part of CI (it writes two files of several GB). Run with the project's venv::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_memory.py --dir /tmp/onnx_memory \\
        --json benchmarks/onnx_memory_latest.json

1. **Build** (``build``): a chain of ``layers`` blocks ``Conv 1x1 (C -> C, bias) -> BatchNormalization
   -> Relu`` on an input ``[N, C, 1, 1]``, float32, every weight drawn from a seeded normal
   (BatchNorm statistics and affine parameters realistic: mean ~ N(0, 0.5), var ~ U(0.5, 2), scale
   ~ U(0.5, 1.5), bias ~ N(0, 0.2)), written by ``onnx_ir`` with its initializers in one external
   data file (a model over protobuf's 2 GB cannot be one file). Each weight is made when it is
   written (``onnx_ir.LazyTensor``), so building takes little memory itself.
2. **Fold** in a fresh Python process (``normfold.fold_onnx_file(src, out)``: load, plan, fold,
   write, parity in onnxruntime), which reports its resident set size just before the call (the
   baseline: Python, torch, onnxruntime imported) and its peak (``VmHWM`` of ``/proc/self/status``,
   reset to the current size at the baseline through ``/proc/self/clear_refs``). Memory-mapped
   file pages the process touches count, as they do in any RSS.
3. **Report** as JSON: file size (model and data), peak RSS growth over the baseline, their ratio
   (the issue's goal: at most 2), the fold's wall time, the BatchNormalization nodes before and
   after, and the parity notes. Both multi-GB files are deleted at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, os, sys, time
from pathlib import Path

import normfold
import normfold.check.onnx_parity, normfold.onnx_fold, normfold.onnx_pipeline  # imported before the baseline
import onnx, onnx_ir, onnxruntime, torch  # noqa: F401


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


try:  # the peak so far becomes the current size (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
started = time.perf_counter()
run = normfold.fold_onnx_file(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - started
print(json.dumps({
    "baseline_rss": base, "peak_rss": status("VmHWM"), "hwm_reset": reset, "seconds": seconds,
    "folded": len(run.result.folded), "kept": len(run.result.skipped),
    "bn_after": run.result.ops_after.get("BatchNormalization", 0),
    "parity": run.parity.passed, "notes": list(run.parity.notes),
    "files": [str(f) for f in run.export.files],
}))
"""


def build(path: Path, layers: int, channels: int, seed: int = 0) -> int:
    """Write the model (module docstring, step 1) to ``path`` and ``<name>.data``; returns the
    BatchNormalization count."""
    import numpy as np
    import onnx_ir as ir

    def draw(shape: tuple[int, ...], k: int, kind: str) -> ir.LazyTensor:
        def make() -> ir.Tensor:
            gen = np.random.default_rng([seed, k])
            if kind == "weight":
                a = gen.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            elif kind == "mean":
                a = (gen.standard_normal(shape) * 0.5).astype(np.float32)
            elif kind == "var":
                a = (gen.random(shape) * 1.5 + 0.5).astype(np.float32)
            elif kind == "scale":
                a = (gen.random(shape) + 0.5).astype(np.float32)
            else:
                a = (gen.standard_normal(shape) * 0.2).astype(np.float32)
            return ir.tensor(a)

        return ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["N", channels, 1, 1]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="memory")
    value, k = x, 0
    for i in range(layers):
        params = {}
        for role, shape, kind in (("w", (channels, channels, 1, 1), "weight"), ("b", (channels,), "bias"),
                                  ("s", (channels,), "scale"), ("t", (channels,), "bias"),
                                  ("m", (channels,), "mean"), ("v", (channels,), "var")):  # fmt: skip
            k += 1
            init = ir.Value(name=f"l{i}.{role}", const_value=draw(shape, k, kind), shape=ir.Shape(shape),
                            type=ir.TensorType(ir.DataType.FLOAT))  # fmt: skip
            graph.register_initializer(init)
            params[role] = init
        conv = ir.node("Conv", [value, params["w"], params["b"]], num_outputs=1, name=f"conv{i}")
        stats = [params[r] for r in "stmv"]
        bn = ir.node("BatchNormalization", [conv.outputs[0], *stats], attributes={"epsilon": 1e-5},
                     num_outputs=1, name=f"bn{i}")  # fmt: skip
        relu = ir.node("Relu", [bn.outputs[0]], num_outputs=1, name=f"relu{i}")
        graph.extend([conv, bn, relu])
        value = relu.outputs[0]
    value.name = "y"
    value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", channels, 1, 1])
    graph.outputs.append(value)
    model = ir.Model(graph, ir_version=8, producer_name="onnx_memory")
    ir.save(model, path, external_data=f"{path.name}.data")
    return layers


def measure(folder: Path, layers: int, channels: int, keep: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    src, out = folder / "big.onnx", folder / "big.folded.onnx"
    started = time.perf_counter()
    build(src, layers, channels)
    built_s = time.perf_counter() - started
    size = src.stat().st_size + (folder / f"{src.name}.data").stat().st_size
    try:
        command = [sys.executable, "-c", _CHILD, str(src), str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if child.returncode != 0:
            raise SystemExit(f"the fold failed:\n{child.stderr[-4000:]}")
        got = json.loads(child.stdout.strip().splitlines()[-1])
        written = sum(Path(f).stat().st_size for f in got["files"])
    finally:
        if not keep:
            for f in folder.iterdir():
                if f.name.startswith("big."):
                    f.unlink()
    growth = got["peak_rss"] - got["baseline_rss"]
    return {
        "layers": layers, "channels": channels, "file_bytes": size, "written_bytes": written,
        "build_seconds": round(built_s, 1), "fold_seconds": round(got["seconds"], 1),
        "baseline_rss_bytes": got["baseline_rss"], "peak_rss_bytes": got["peak_rss"],
        "peak_rss_growth_bytes": growth, "growth_over_file_size": round(growth / size, 3),
        "hwm_reset": got["hwm_reset"], "folded": got["folded"], "kept": got["kept"],
        "bn_after": got["bn_after"], "parity": got["parity"], "notes": got["notes"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the files are built (removed after)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--channels", type=int, default=8192, help="12 x 8192^2 float32 weights: 3.2 GB")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the built and folded files")
    args = parser.parse_args()
    need = 2.2 * 4 * args.layers * args.channels**2
    free = shutil.disk_usage(args.dir if args.dir.exists() else args.dir.parent).free
    if free < need + 8 * 2**30:
        parser.error(f"{args.dir}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed and 8 GiB left")
    result = measure(args.dir, args.layers, args.channels, args.keep)
    text = json.dumps(result, indent=2) + "\n"
    if args.json is not None:
        args.json.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
