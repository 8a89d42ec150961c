"""ONNX in: reparameterizable timm models exported with BatchNormalization kept, folded by
``normfold.fold_onnx`` with and without ``reparameterize``; beside each, what ``normfold.fold``
leaves folding the same model from PyTorch.

Not part of CI (timm is no test dependency). From the real-model venv of ``real_models.py``::

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/rmvenv/bin/python benchmarks/onnx_reparam.py \\
        --json benchmarks/onnx_reparam_latest.json

Models as ``real_models.py`` builds them (random weights, seeded random BN statistics, 160 px,
batch 2), exported by the TorchScript exporter with constant folding off and training mode
preserved (BN nodes kept), opset 17, a dynamic batch axis.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm

import normfold

MODELS = ("timm/repvgg_a0", "timm/mobileone_s0", "timm/repghostnet_050", "timm/fastvit_t8")


def row(name: str, folder: Path) -> dict:
    g = rm.seed_everything(rm.SEED)
    model, shape = rm.build(name, rm.DEFAULT_SIZE)
    rm.randomize_batch_norms(model, g)
    model.eval()
    x = torch.randn(rm.BATCH, *shape, generator=g)
    path = folder / f"{name.replace('/', '_')}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})  # fmt: skip
    before = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    out = {"model": name, "before": {k: before[k] for k in ("BatchNormalization", "Conv", "Add")}}
    out["from_pytorch_bn_left"] = rm.count_bn(normfold.fold(model, (x,)).program)
    for reparam in (False, True):
        start = time.perf_counter()
        r = normfold.fold_onnx(path, reparameterize=reparam)
        after = collections.Counter(n.op_type for n in r.model.graph.node)
        out["reparam" if reparam else "plain"] = {
            **{k: after[k] for k in ("BatchNormalization", "Conv", "Add")},
            "merged": len(r.merged), "not_merged": [u.code for u in r.not_merged],
            "parity": r.parity.passed, "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(row(name, Path(tmp)))
            r = rows[-1]
            print(f"{name}: BN {r['before']['BatchNormalization']} -> {r['plain']['BatchNormalization']} "
                  f"(no merges) -> {r['reparam']['BatchNormalization']} ({r['reparam']['merged']} blocks), "
                  f"Conv {r['before']['Conv']} -> {r['reparam']['Conv']}, Add {r['before']['Add']} -> "
                  f"{r['reparam']['Add']}, parity {r['reparam']['parity']}; from PyTorch "
                  f"{r['from_pytorch_bn_left']} left", flush=True)  # fmt: skip
    if args.json:
        meta = {"normfold": rm.engine_version(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
