"""``normfold.fold_norm_affine_checkpoint`` on a generated multi-GB sharded checkpoint: peak memory.

Issue 22 asks that a sharded checkpoint of at least 4 GB fold with a peak RSS growth of at most
0.2x its parameter bytes. This script:

1. writes a Llama-like checkpoint (``tests/llama_like.py``: hand-written RMSNorm, q/k/v/o,
   gate/up/down, final norm, LM head; no transformers) in Hugging Face's sharded layout
   (``model-0000X-of-0000N.safetensors`` + ``model.safetensors.index.json``, shards of
   ``--shard-gb``), in bfloat16 by default, with realistic random weights (Linear entries
   ~ N(0, 1/fan_in), norm scales U(0.3, 2.0)), one tensor at a time;
2. folds it in a **fresh subprocess** (``--child``) from a ``torch.device("meta")`` instance of the
   same class: after the imports and the meta model, the process's peak-RSS mark is reset
   (``/proc/self/clear_refs`` ``5``) and read as the baseline (``VmHWM``); after the fold, the peak
   ``VmHWM`` minus that baseline is the growth;
3. spot-checks the output against the input (the first layer's ``q_proj`` and ``down_proj``, the
   head, a norm): every folded tensor equal to ``(W.double() * gamma).to(bfloat16)``, every other
   equal to its input, bit for bit;
4. writes ``benchmarks/norm_affine_shards_latest.json`` (or ``--json``) and prints the ratio;
   the generated folders are deleted unless ``--keep``.

``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/norm_affine_shards.py`` (about 4.4 GB on disk
twice, in ``--dir``, default the system's temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VOCAB, D, HEADS, FF = 32000, 2048, 16, 5632


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _names(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("embed_tokens.weight", (VOCAB, D))]
    for i in range(layers):
        p = f"layers.{i}."
        out += [(p + "input_layernorm.weight", (D,))]
        out += [(p + n + ".weight", (D, D)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(p + "post_attention_layernorm.weight", (D,))]
        out += [(p + n + ".weight", (FF, D)) for n in ("gate_proj", "up_proj")]
        out += [(p + "down_proj.weight", (D, FF))]
    return [*out, ("norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]


def generate(folder: Path, layers: int, shard_bytes: int, dtype_name: str) -> int:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    folder.mkdir(parents=True)
    names = _names(layers)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, group in zip(files, shards, strict=True):
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                t = torch.rand(shape, generator=gen) * 1.7 + 0.3
            else:
                t = torch.randn(shape, generator=gen).div_(math.sqrt(shape[-1]))
            tensors[name] = t.to(dtype)
            total += tensors[name].numel() * dtype.itemsize
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama-like", "num_hidden_layers": layers,
                                                    "tie_word_embeddings": False}))  # fmt: skip
    return total


def child(src: Path, out: Path, layers: int, report: Path) -> None:
    """The fold alone in this process (module docstring, step 2)."""
    import torch
    from llama_like import LlamaLike

    import normfold

    with torch.device("meta"):
        meta = LlamaLike(vocab=VOCAB, d=D, heads=HEADS, ff=FF, layers=layers)
    ids = torch.zeros(1, 8, dtype=torch.long)
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark := the current RSS
    base = _status("VmHWM")
    start = time.perf_counter()
    result = normfold.fold_norm_affine_checkpoint(meta, ids, src, out)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    worst = max((o.max_abs_error / o.noise if o.noise > 0 else 0.0)
                for p in result.proofs.values() for o in p.outputs)  # fmt: skip
    report.write_text(json.dumps({
        "baseline_rss_bytes": base, "peak_rss_bytes": peak, "growth_bytes": peak - base, "seconds": seconds,
        "folded": len(result.folded), "kept": [k.code for k in result.kept], "proofs_passed": result.passed,
        "worst_error_over_noise": worst, "files": len(result.files),
        "parameter_bytes": result.parameter_bytes,
    }))  # fmt: skip


def spot_check(src: Path, out: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    new_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    problems = [] if new_index == index else ["the output index differs from the input's"]

    def read(folder: Path, name: str) -> torch.Tensor:
        with safe_open(folder / index[name], "pt") as f:
            return f.get_tensor(name)

    checks = [("layers.0.q_proj.weight", "layers.0.input_layernorm.weight"),
              ("layers.0.gate_proj.weight", "layers.0.post_attention_layernorm.weight"),
              ("lm_head.weight", "norm.weight")]  # fmt: skip
    for weight, norm in checks:
        want = (read(src, weight).double() * read(src, norm).double()[None, :]).to(torch.bfloat16)
        if not torch.equal(read(out, weight), want):
            problems.append(f"{weight} is not W * gamma")
        if not torch.equal(read(out, norm), torch.ones_like(read(src, norm))):
            problems.append(f"{norm} is not 1")
    for same in ("layers.0.down_proj.weight", "layers.0.o_proj.weight", "embed_tokens.weight"):
        if not torch.equal(read(out, same), read(src, same)):
            problems.append(f"{same} changed")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=4.3, help="parameter bytes to generate, 1e9 bytes")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "norm_affine_shards_latest.json")
    parser.add_argument("--keep", action="store_true")
    names = ("SRC", "OUT", "LAYERS", "REPORT")
    parser.add_argument("--child", nargs=4, metavar=names, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        src, out, layers, report = args.child
        child(Path(src), Path(out), int(layers), Path(report))
        return
    import torch

    per_layer = (4 * D * D + 3 * D * FF + 2 * D) * getattr(torch, args.dtype).itemsize
    fixed = (2 * VOCAB * D + D) * getattr(torch, args.dtype).itemsize
    layers = max(1, math.ceil((args.gb * 1e9 - fixed) / per_layer))
    work = Path(tempfile.mkdtemp(prefix="normfold-shards-", dir=args.dir))
    try:
        start = time.perf_counter()
        total = generate(work / "in", layers, int(args.shard_gb * 1e9), args.dtype)
        generated = time.perf_counter() - start
        report = work / "child.json"
        cmd = [sys.executable, __file__, "--child", str(work / "in"), str(work / "out"), str(layers),
               str(report)]  # fmt: skip
        subprocess.run(cmd, check=True)
        measured = json.loads(report.read_text())
        problems = spot_check(work / "in", work / "out")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = measured["growth_bytes"] / total
    result = {
        "parameter_bytes": total, "layers": layers, "hidden": D, "intermediate": FF, "vocab": VOCAB,
        "dtype": args.dtype, "shards": measured["files"] - 2, "generate_seconds": generated,
        **measured, "growth_over_parameter_bytes": ratio, "limit": 0.2, "spot_check_problems": problems,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{total / 1e9:.2f} GB in {result['shards']} shards ({layers} layers, {args.dtype}): fold "
          f"{measured['seconds']:.0f} s, peak RSS growth {measured['growth_bytes'] / 1e6:.0f} MB = "
          f"{ratio:.3f}x the parameter bytes (limit 0.2); {measured['folded']} norms folded, proofs "
          f"{'passed' if measured['proofs_passed'] else 'FAILED'}; spot checks: "
          f"{problems or 'equal'}")  # fmt: skip


if __name__ == "__main__":
    main()
