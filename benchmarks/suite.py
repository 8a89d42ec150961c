"""The benchmark suite: latency against the BN-free limit and the peers, numerical quality, the
cost of the tool, and memory. One command runs it all and prints markdown tables:

    python benchmarks/suite.py --quick              # 2 CPU cores: under 15 minutes
    python benchmarks/suite.py                      # the full profile (deeper nets, more repeats)
    python benchmarks/suite.py --quick --only cost  # one section
    python benchmarks/suite.py --only cost --depths 3000,5000

Every timing is interleaved: each repeat times every variant once, in turn, so a slow moment of
the machine hits all of them alike; tables show the median over the repeats and the spread
(min-max) as a percentage of it. Ratios are of medians. The numbers are what this run gives on
this machine, whatever they show; nothing here is asserted.

Sections:

* **latency**: per zoo model, eager latency of the original, of
  ``torch.fx.experimental.optimization.fuse``'s result, of normfold's folded model and of the
  BN-free limit (the original without the BatchNorms normfold folded, each dropped as if never
  there; see :func:`bn_free`), and onnxruntime latency (default graph optimizations, which fuse
  Conv+BN themselves) of normfold's ONNX, of a plain ``torch.onnx.export`` of the original and
  of the limit's export. Batch 1 and 16, 1 and 2 threads (quick: batch 1 and 16, 1 thread).
* **numerics**: max abs output error against a float64 run of the original, relative to the
  output scale, in float32, float16 and bfloat16, normfold vs fx fuse; and the folded weights'
  error against the folded weights computed in float64.
* **cost**: fold time vs fx fuse vs a bare ``torch.export.export`` (dynamic batch, as normfold
  captures) on the zoo and on deep Conv-BN-ReLU nets (``--depths`` sets their block counts).
* **end_to_end**: ``normfold fold --out x.onnx`` (verification included) vs a bare
  ``torch.onnx.export`` of the same model, each a fresh process, with normfold's time by step
  (its ``--report`` step names). ``benchmarks/real_models.py --end-to-end`` gives the same rows
  for torchvision/timm models.
* **reparam**: eager and onnxruntime latency of the RepVGG-style zoo models (``repvgg``,
  ``mobileone``, ``acnet``): the original, folded without reparameterization, and reparameterized
  (one conv per block); onnxruntime's plain export of the original as the peer.
* **memory**: peak RSS growth while folding a model of at least 2 GB of float32 parameters,
  ``inplace=True`` and ``False``, against its parameter bytes (each in a fresh process).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from normfold.models import ZOO, example_inputs
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine.capture import CaptureOptions, dynamic_shapes, quiet_exporter

ROOT = Path(__file__).resolve().parents[1]


# --- timing -----------------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``repeats`` rounds, each timing every variant once
    (``inner`` calls, averaged) in turn."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm up: first calls allocate and pick kernels
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    m = med(values)
    return f"{100 * (max(values) - min(values)) / m:.0f}%" if m else "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- models -----------------------------------------------------------------------------------------


def bn_free(model: nn.Module, inputs: tuple[torch.Tensor, ...], norms: list[str]) -> nn.Module | None:
    """The limit: the model without the BatchNorms normfold folded (``norms``: the paths of
    everything it folded), each dropped as if it had never been there; outputs differ, speed only.

    A plain torch BatchNorm becomes ``nn.Identity``; a subclass with its own forward (timm's
    ``BatchNormAct2d``: norm, then activation) keeps its forward with ``F.batch_norm`` returning
    its input, so its activation stays. Norms normfold keeps stay: no fold removes them. Other ops
    normfold folds (a hand-written norm, a layer-scale multiply in forward code) stay too, so
    normfold can beat the limit there. None when a folded BatchNorm module is not called as one
    (a parent's forward passes its buffers to ``F.batch_norm``): nothing to drop it by."""
    limit = copy.deepcopy(model).eval()
    dropped = []
    for path in norms:
        module = limit.get_submodule(path) if ":" not in path else None
        if not isinstance(module, _BatchNorm):
            continue
        dropped.append(module.running_mean)
        if type(module).forward is _BatchNorm.forward:
            parent, _, name = path.rpartition(".")
            limit.get_submodule(parent)._modules[name] = nn.Identity()
        else:
            module.forward = _without_batch_norm(module.forward)
    try:
        calls = _batch_norm_calls(limit, inputs)
    except Exception:  # the parent's forward reads the dropped norm's buffers
        return None
    return None if any(any(t is m for m in dropped) for t in calls) else limit


def _without_batch_norm(forward: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        original = F.batch_norm
        F.batch_norm = lambda x, *a, **k: x
        try:
            return forward(*args, **kwargs)
        finally:
            F.batch_norm = original

    return wrapped


def _batch_norm_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
    """The ``running_mean`` of every ``F.batch_norm`` call one run of ``model`` makes."""
    original, seen = F.batch_norm, []

    def counting(x: torch.Tensor, running_mean: torch.Tensor | None, *a: Any, **k: Any) -> torch.Tensor:
        seen.append(running_mean)
        return original(x, running_mean, *a, **k)

    F.batch_norm = counting
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        F.batch_norm = original
    return seen


def fx_fuse(model: nn.Module) -> nn.Module | None:
    """``torch.fx.experimental.optimization.fuse``'s result, or None when it cannot trace."""
    from torch.fx.experimental.optimization import fuse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(copy.deepcopy(model).eval())
    except Exception:
        return None


def deep_net(blocks: int) -> nn.Module:
    """A stem conv then ``blocks`` x (Conv3x3 - BatchNorm2d - ReLU) at 8 channels, realistic stats."""
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    gen = torch.Generator().manual_seed(blocks)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return model


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """A plain ``torch.onnx.export`` (dynamo, default optimizations), the peer users compare with."""
    with quiet_exporter():  # the batch axis dynamic, as normfold writes it
        shapes = dynamic_shapes(inputs, CaptureOptions())
        torch.onnx.export(model, inputs, path, dynamo=True, verbose=False, dynamic_shapes=shapes)


# --- sections ---------------------------------------------------------------------------------------


def latency(quick: bool) -> str:
    batches, threads, repeats = ((1, 16), (1,), 7) if quick else ((1, 16), (1, 2), 15)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO:
            model, xs1 = ZOO[name].factory(), example_inputs(name)
            folded = normfold.fold(model, xs1)
            fused, limit = fx_fuse(model), bn_free(model, xs1, [f.norm for f in folded.folded])
            onnx = {k: Path(tmp) / f"{name}.{k}.onnx" for k in ("plain", "nf", "limit")}
            onnx_export(model, xs1, onnx["plain"])
            normfold.export_onnx(folded.model, xs1, onnx["nf"], program=folded.program)
            if limit is not None:
                onnx_export(limit, xs1, onnx["limit"])
            for batch in batches:
                xs = example_inputs(name, batch=batch)
                for n in threads:
                    torch.set_num_threads(n)
                    sessions = {f"ort {k}": ort_session(p, n) for k, p in onnx.items() if p.exists()}
                    eager = {"original": model, "normfold": folded.model, "limit": limit, "fx fuse": fused}
                    with torch.no_grad():
                        t = interleaved(_variants(eager, sessions, xs), repeats, inner=5)
                    rows.append([name, batch, n, *_latency_cells(t)])
    torch.set_num_threads(2)
    header = ["model", "batch", "threads", "original ms", "fx fuse ms", "normfold ms", "limit ms",
              "nf/limit", "nf/fx", "ort plain ms", "ort nf ms", "ort limit ms", "ort nf/limit",
              "ort nf/plain", "nf spread"]  # fmt: skip
    columns = {"normfold/limit": 7, "normfold/fx fuse": 8, "onnxruntime normfold/limit": 12,
               "onnxruntime normfold/plain export": 13}  # fmt: skip
    summary = "\n" + "; ".join(
        f"median {label} {statistics.median(v):.3f} (range {min(v):.2f}-{max(v):.2f}, {len(v)} rows)"
        for label, col in columns.items()
        if (v := [r[col] for r in rows if r[col] is not None])
    )
    return "### Latency vs the BN-free limit and the peers\n\n" + table(header, rows) + "\n" + summary


def _latency_cells(t: dict[str, list[float]]) -> list[Any]:
    """One latency row's cells after model, batch and threads: milliseconds, then ratios (None
    where a variant is missing: no limit, fx fuse could not trace)."""
    m = {k: med(v) for k, v in t.items()}

    def ms(k: str) -> float | None:
        return 1e3 * m[k] if k in m else None

    def ratio(a: str, b: str) -> float | None:
        return m[a] / m[b] if a in m and b in m else None

    return [ms("original"), ms("fx fuse"), ms("normfold"), ms("limit"), ratio("normfold", "limit"),
            ratio("normfold", "fx fuse"), ms("ort plain"), ms("ort nf"), ms("ort limit"),
            ratio("ort nf", "ort limit"), ratio("ort nf", "ort plain"), spread(t["normfold"])]  # fmt: skip


def _variants(
    eager: dict[str, nn.Module | None],
    sessions: dict[str, ort.InferenceSession],
    xs: tuple[torch.Tensor, ...],
) -> dict[str, Callable[[], Any]]:
    """One call of each eager model (None: left out) and each onnxruntime session on ``xs``."""
    out: dict[str, Callable[[], Any]] = {k: (lambda m=m: m(*xs)) for k, m in eager.items() if m is not None}
    for k, session in sessions.items():
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs, strict=True)}
        out[k] = lambda session=session, feed=feed: session.run(None, feed)
    return out


def numerics(quick: bool) -> str:
    names = ["resnet", "mobilenet", "mlp", "levit"] if quick else list(ZOO)
    rows = []
    for name in names:
        base = ZOO[name].factory()
        xs64 = tuple(x.double() for x in example_inputs(name))
        with torch.no_grad():
            exact = copy.deepcopy(base).double()(*xs64)
            weights64 = {k: v.double() for k, v in normfold.fold(copy.deepcopy(base).double(), xs64)
                         .model.state_dict().items()}  # fmt: skip
        scale = float(exact.abs().max())
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model = copy.deepcopy(base).to(dtype)
            xs = tuple(x.to(dtype) for x in xs64)
            candidates = {
                "original": model,
                "normfold": normfold.fold(model, xs).model,
                "fx fuse": fx_fuse(model),
            }
            errors = {}
            with torch.no_grad():
                for k, m in candidates.items():
                    errors[k] = None if m is None else float((m(*xs).double() - exact).abs().max()) / scale
            w_nf = _weight_error(candidates["normfold"], weights64)
            fx = candidates["fx fuse"]
            folded_all = fx is not None and not any(isinstance(m, _BatchNorm) for m in fx.modules())
            w_fx = _weight_error(fx, weights64) if folded_all else None  # "-": fx fuse left some BN
            rows.append([name, str(dtype).removeprefix("torch."), errors["original"], errors["normfold"],
                         errors["fx fuse"], w_nf, w_fx])  # fmt: skip
    header = ["model", "dtype", "original err", "normfold err", "fx fuse err", "normfold weight err",
              "fx fuse weight err"]  # fmt: skip
    return (
        "### Numerical quality (max abs error / max|output| vs a float64 run of the original; weight "
        "error: max abs vs the float64 fold)\n\n" + table(header, rows)
    )


def _weight_error(model: nn.Module, exact: dict[str, torch.Tensor]) -> float | None:
    """Largest abs difference of the folded conv/linear weights from the float64 fold's, by shape
    (fx fuse renames modules, so weights are matched in order among equal shapes)."""
    ours = [v for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() >= 2]
    ref = [v for k, v in exact.items() if k.endswith("weight") and v.dim() >= 2]
    if len(ours) != len(ref):
        return None
    return max(float((a.double() - b).abs().max()) for a, b in zip(ours, ref, strict=True))


DEPTHS = {"quick": (10, 100, 1000), "full": (10, 100, 1000, 3000, 5000)}


def cost(quick: bool) -> str:
    depths = DEPTHS["quick" if quick else "full"]
    repeats = 3 if quick else 5
    rows = []
    cases = [(name, ZOO[name].factory(), example_inputs(name)) for name in ZOO]
    cases += [(f"deep-{n}", deep_net(n), (torch.randn(2, 3, 8, 8),)) for n in depths]
    for name, model, xs in cases:

        def export(model: nn.Module = model, xs: tuple[torch.Tensor, ...] = xs) -> Any:
            with quiet_exporter(), torch.no_grad():
                return torch.export.export(
                    model, xs, dynamic_shapes=dynamic_shapes(xs, CaptureOptions()), strict=False
                )

        variants = {"export": export, "normfold": lambda m=model, x=xs: normfold.fold(m, x),
                    "fx fuse": lambda m=model: fx_fuse(m)}  # fmt: skip
        t = interleaved(variants, 1 if name.startswith("deep-") and int(name[5:]) > 1000 else repeats)
        m = {k: med(v) for k, v in t.items()}
        blocks = int(name[5:]) if name.startswith("deep-") else None
        rows.append([name, m["export"], m["normfold"], m["fx fuse"], m["normfold"] / m["export"],
                     1e3 * m["normfold"] / blocks if blocks else None, spread(t["normfold"])])  # fmt: skip
    header = [
        "model",
        "torch.export s",
        "normfold fold s",
        "fx fuse s",
        "fold/export",
        "fold ms/block",
        "spread",
    ]
    return "### Cost of the tool: fold\n\n" + table(header, rows)


END_TO_END_HEADER = [
    "model",
    "bare torch.onnx.export s",
    "normfold fold --out x.onnx s",
    "ratio",
    "normfold steps (s)",
]


def end_to_end(quick: bool) -> str:
    """``normfold fold --out x.onnx`` vs a bare ``torch.onnx.export`` of the same zoo model."""
    names = ["resnet", "mobilenet", "mlp", "levit", "two_tower"] if quick else list(ZOO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bare = (f"import torch; from normfold.models import ZOO, example_inputs; "
                    f"torch.onnx.export(ZOO[{name!r}].factory(), example_inputs({name!r}), OUT, "
                    f"dynamo=True, verbose=False)")  # fmt: skip
            rows.append(end_to_end_row(name, [f"normfold.models:{name}"], bare, Path(tmp), 3 if quick else 5))
    return (
        "### Cost of the tool: end to end (fresh processes, imports included)\n\n"
        + table(END_TO_END_HEADER, rows)
        + f"\n\nmedian ratio {statistics.median(r[3] for r in rows):.2f}"
    )


def end_to_end_row(
    label: str, source: list[str], bare: str, cwd: Path, repeats: int, env: dict[str, str] | None = None
) -> list[Any]:
    """One row of the end-to-end table: ``normfold fold SOURCE --out x.onnx`` (``source``: the
    model argument and its options) and ``python -c BARE`` (which writes the file ``OUT``), each
    a fresh process run in ``cwd`` (with ``env`` added to the environment), interleaved;
    normfold's step times from its ``--report``."""
    out, report = cwd / f"{label.replace('/', '_')}.onnx", cwd / "report.json"
    normfold_exe = str(Path(sys.executable).parent / "normfold")
    environ = {**os.environ, **(env or {})}
    run = functools.partial(subprocess.run, check=True, cwd=cwd, capture_output=True, env=environ)

    def nf() -> None:
        args = [*source, "--out", str(out), "--force", "--quiet", "--report", str(report)]
        run([normfold_exe, "fold", *args])

    def plain() -> None:
        code = f"OUT = {str(out) + '.bare'!r}\n{bare}"
        run([sys.executable, "-c", code])

    t = interleaved({"normfold fold": nf, "torch.onnx.export": plain}, repeats)
    steps = json.loads(report.read_text())["timings_s"]
    bare_s, nf_s = med(t["torch.onnx.export"]), med(t["normfold fold"])
    return [label, bare_s, nf_s, nf_s / bare_s, ", ".join(f"{k} {v:.2f}" for k, v in steps.items())]


def reparam(quick: bool) -> str:
    """Eager and onnxruntime latency of the RepVGG-style zoo models: the original, normfold's fold
    without reparameterization (identity-branch BNs stay) and with it (one conv per block)."""
    repeats = 7 if quick else 15
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("repvgg", "mobileone", "acnet"):
            model, xs = ZOO[name].factory(), example_inputs(name)
            fold, merged = normfold.fold(model, xs), normfold.reparameterize(model, xs)
            onnx = {k: Path(tmp) / f"{name}.{k}.onnx" for k in ("plain", "fold", "reparam")}
            onnx_export(model, xs, onnx["plain"])
            normfold.export_onnx(fold.model, xs, onnx["fold"], program=fold.program)
            normfold.export_onnx(merged.model, xs, onnx["reparam"], program=merged.program)
            for batch in (1, 16):
                x = example_inputs(name, batch=batch)
                torch.set_num_threads(1)
                sessions = {f"ort {k}": ort_session(p, 1) for k, p in onnx.items()}
                eager = {"original": model, "fold": fold.model, "reparam": merged.model}
                with torch.no_grad():
                    t = interleaved(_variants(eager, sessions, x), repeats, inner=5)
                m = {k: 1e3 * med(v) for k, v in t.items()}
                eager_ms = [m["original"], m["fold"], m["reparam"], m["reparam"] / m["original"]]
                ort_ms = [m["ort plain"], m["ort fold"], m["ort reparam"], m["ort reparam"] / m["ort plain"]]
                rows.append([name, batch, *eager_ms, *ort_ms, spread(t["reparam"])])
    torch.set_num_threads(2)
    header = ["model", "batch", "original ms", "fold ms", "reparam ms", "reparam/original", "ort plain ms",
              "ort fold ms", "ort reparam ms", "ort reparam/plain", "reparam spread"]  # fmt: skip
    return "### Reparameterization: latency (1 thread)\n\n" + table(header, rows)


_MEMORY_CHILD = """
import resource, sys, torch, normfold
from torch import nn
width, depth, inplace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
layers = []
for _ in range(depth):
    layers += [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
model = nn.Sequential(*layers).eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.5); m.running_var.uniform_(0.5, 2)
params = sum(p.numel() * p.element_size() for p in model.parameters())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = normfold.fold(model, (torch.randn(2, width),), inplace=inplace)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(params, before, peak, len(result.folded))
"""


def memory(quick: bool) -> str:
    width, depth = 8192, 8  # 8 x 8192^2 float32 = 2.1 GB of parameters
    rows = []
    for inplace in (True, False):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(width), str(depth), str(int(inplace))],
                             check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
        params, before, peak, folded = (int(v) for v in out)
        rows.append(
            [f"inplace={inplace}", params / 1e9, (peak - before) / 1e9, (peak - before) / params, folded]
        )
    header = ["fold", "parameters GB", "peak RSS growth GB", "growth / parameter bytes", "norms folded"]
    return "### Memory: folding a 2.1 GB model (peak RSS growth during fold)\n\n" + table(header, rows)


SECTIONS = {
    "latency": latency,
    "numerics": numerics,
    "cost": cost,
    "end_to_end": end_to_end,
    "memory": memory,
    "reparam": reparam,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-core profile (under 15 minutes)")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run these sections only")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--depths", help="cost: the deep nets' block counts (comma-separated: 3000,5000)")
    args = parser.parse_args(argv)
    if args.depths:
        DEPTHS["quick"] = DEPTHS["full"] = tuple(int(n) for n in args.depths.split(","))
    torch.set_num_threads(2)
    start = time.perf_counter()
    parts = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{'quick' if args.quick else 'full'} profile"
    ]
    for name in args.only or SECTIONS:
        t = time.perf_counter()
        parts.append(SECTIONS[name](args.quick))
        parts[-1] += f"\n\n({name}: {time.perf_counter() - t:.0f} s)"
        print(parts[-1] + "\n", flush=True)
    parts.append(f"(total {time.perf_counter() - start:.0f} s)")
    if args.markdown is not None:
        args.markdown.write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
