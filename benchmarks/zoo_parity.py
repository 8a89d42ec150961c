"""Fold and export every zoo model; print BN counts, parity (PyTorch and onnxruntime) and step times.

    python benchmarks/zoo_parity.py

Numbers are measured on this machine in one run; parity errors are relative to max|reference|.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from normfold.models import ZOO

from normfold.pipeline import fold_and_export


def main() -> None:
    header = f"{'model':<10} {'BN':>3} {'fold':>4} {'keep':>4} {'pytorch rel':>12} {'ort-cpu rel':>12}"
    header += "  steps (s)"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO:
            start = time.perf_counter()
            run = fold_and_export(f"normfold.models:{name}", Path(tmp) / f"{name}.onnx")
            total = time.perf_counter() - start
            f = run.fold
            ort = run.export.parity["onnxruntime-cpu"].max_rel_error
            steps = ", ".join(f"{k} {v:.2f}" for k, v in run.timings.items())
            print(
                f"{name:<10} {len(f.folded) + len(f.skipped):>3} {len(f.folded):>4} {len(f.skipped):>4} "
                f"{run.parity.max_rel_error:>12.2e} {ort:>12.2e}  {steps}; total {total:.2f}"
            )


if __name__ == "__main__":
    main()
