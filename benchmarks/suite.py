"""The benchmark suite: latency against the BN-free limit and the peers, numerical quality, the
cost of the tool, and memory. One command runs it all and prints markdown tables:

    python benchmarks/suite.py --quick              # 2 CPU cores: under 15 minutes
    python benchmarks/suite.py                      # the full profile (deeper nets, more repeats)
    python benchmarks/suite.py --quick --only cost  # one section

Every timing is interleaved: each repeat times every variant once, in turn, so a slow moment of
the machine hits all of them alike; tables show the median over the repeats and the spread
(min-max) as a percentage of it. Ratios are of medians. The numbers are what this run gives on
this machine, whatever they show; nothing here is asserted.

Sections:

* **latency**: per zoo model, eager latency of the original, of
  ``torch.fx.experimental.optimization.fuse``'s result, of normfold's folded model and of the
  BN-free limit (every ``_BatchNorm`` replaced by ``nn.Identity``: no fold can beat it), and
  onnxruntime latency (default graph optimizations, which fuse Conv+BN themselves) of normfold's
  ONNX vs a plain ``torch.onnx.export`` of the original. Batch 1 and 16, 1 and 2 threads (quick:
  batch 1 and 16, 1 thread).
* **numerics**: max abs output error against a float64 run of the original, relative to the
  output scale, in float32, float16 and bfloat16, normfold vs fx fuse; and the folded weights'
  error against the folded weights computed in float64.
* **cost**: fold time vs fx fuse vs a bare ``torch.export.export`` (dynamic batch, as normfold
  captures) on the zoo and on deep Conv-BN-ReLU nets; and ``normfold fold --out x.onnx`` end to
  end (verification included) vs a bare ``torch.onnx.export`` of the same model, by step (the
  ``--report`` step names).
* **memory**: peak RSS growth while folding a model of at least 2 GB of float32 parameters,
  ``inplace=True`` and ``False``, against its parameter bytes (each in a fresh process).
"""

from __future__ import annotations

import argparse
import copy
import json
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
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.graph import CaptureOptions, dynamic_shapes, quiet_exporter

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


def bn_free(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module | None:
    """The limit: the model with every BatchNorm replaced by Identity (outputs differ; speed only);
    None when the model cannot run so (it reads its norms' buffers in its own forward)."""
    limit = copy.deepcopy(model)
    for parent in list(limit.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _BatchNorm):
                parent._modules[name] = nn.Identity()
    try:
        with torch.no_grad():
            limit.eval()(*inputs)
    except Exception:
        return None
    return limit


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
            model = ZOO[name].factory()
            folded = normfold.fold(model, example_inputs(name))
            fused, limit = fx_fuse(model), bn_free(model, example_inputs(name))
            plain, nf = Path(tmp) / f"{name}.plain.onnx", Path(tmp) / f"{name}.nf.onnx"
            onnx_export(model, example_inputs(name), plain)
            normfold.export_onnx(folded.model, example_inputs(name), nf, program=folded.program)
            for batch in batches:
                xs = example_inputs(name, batch=batch)
                for n in threads:
                    torch.set_num_threads(n)
                    sessions = {"ort plain": ort_session(plain, n), "ort nf": ort_session(nf, n)}
                    eager = {"original": model, "normfold": folded.model, "limit": limit, "fx fuse": fused}
                    variants = _variants(eager, sessions, xs)
                    with torch.no_grad():
                        t = interleaved(variants, repeats, inner=5)
                    m = {k: med(v) for k, v in t.items()}
                    nan = float("nan")
                    rows.append([
                        name, batch, n, 1e3 * m["original"], 1e3 * m.get("fx fuse", nan),
                        1e3 * m["normfold"], 1e3 * m.get("limit", nan), m["normfold"] / m.get("limit", nan),
                        m["normfold"] / m["fx fuse"] if "fx fuse" in m else None,
                        1e3 * m["ort plain"], 1e3 * m["ort nf"], m["ort nf"] / m["ort plain"],
                        spread(t["normfold"]),
                    ])  # fmt: skip
    torch.set_num_threads(2)
    ratios = sorted(r[7] for r in rows if r[7] == r[7])  # no limit (nan) left out
    ort_ratios = sorted(r[11] for r in rows)
    header = ["model", "batch", "threads", "original ms", "fx fuse ms", "normfold ms", "limit ms",
              "nf/limit", "nf/fx", "ort plain ms", "ort nf ms", "ort nf/plain", "nf spread"]  # fmt: skip
    summary = (
        f"\nmedian normfold/limit {statistics.median(ratios):.3f} (range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
        f"median onnxruntime normfold/plain export {statistics.median(ort_ratios):.3f}"
    )
    return "### Latency vs the BN-free limit and the peers\n\n" + table(header, rows) + "\n" + summary


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


def cost(quick: bool) -> str:
    depths = (10, 100, 1000) if quick else (10, 100, 1000, 3000, 5000)
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
    return "### Cost of the tool: fold\n\n" + table(header, rows) + "\n\n" + end_to_end(quick)


def end_to_end(quick: bool) -> str:
    """``normfold fold --out x.onnx`` (a fresh process, its --report's step times) vs a bare
    ``torch.onnx.export`` of the same model (a fresh process too), interleaved."""
    names = ["resnet", "mobilenet", "mlp", "levit", "two_tower"] if quick else list(ZOO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            report = Path(tmp) / f"{name}.json"

            def nf(name: str = name, report: Path = report) -> None:
                args = ["fold", f"normfold.models:{name}", "--out", str(Path(tmp) / f"{name}.onnx"),
                        "--force", "--quiet", "--report", str(report)]  # fmt: skip
                subprocess.run([str(Path(sys.executable).parent / "normfold"), *args], check=True, cwd=tmp)

            def bare(name: str = name) -> None:
                out = str(Path(tmp) / f"{name}.bare.onnx")
                code = (f"import torch; from normfold.models import ZOO, example_inputs; "
                        f"torch.onnx.export(ZOO[{name!r}].factory(), example_inputs({name!r}), "
                        f"{out!r}, dynamo=True, verbose=False)")  # fmt: skip
                subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp, capture_output=True)

            t = interleaved({"normfold fold": nf, "torch.onnx.export": bare}, 3 if quick else 5)
            steps = json.loads(report.read_text())["timings_s"]
            m = {k: med(v) for k, v in t.items()}
            bare_s, nf_s = m["torch.onnx.export"], m["normfold fold"]
            steps_text = ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
            rows.append([name, bare_s, nf_s, nf_s / bare_s, steps_text])
    ratios = sorted(r[3] for r in rows)
    header = [
        "model",
        "bare torch.onnx.export s",
        "normfold fold --out x.onnx s",
        "ratio",
        "normfold steps (s)",
    ]
    return (
        "### Cost of the tool: end to end (fresh processes, imports included)\n\n"
        + table(header, rows)
        + f"\n\nmedian ratio {statistics.median(ratios):.2f}"
    )


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


SECTIONS = {"latency": latency, "numerics": numerics, "cost": cost, "memory": memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2-core profile (under 15 minutes)")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run these sections only")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
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
