"""ONNX in, ONNX out: normfold's ``fold_onnx`` side by side with the ONNX tools (issue 21).

Not part of CI: the peers are never the project's dependencies. They go in a separate
environment next to an editable normfold::

    python3 -m venv .benchvenv
    .benchvenv/bin/pip install torch==2.13.0
    .benchvenv/bin/pip install -e .
    .benchvenv/bin/pip install onnxsim onnxslim onnxoptimizer   # a peer that does not install is skipped

Two steps (``OMP_NUM_THREADS=1`` for both; about 5 minutes in all on 2 shared cores):

1. ``export``: real files, from a Python that has torchvision (``/work/rmvenv``) and this normfold
   (``PYTHONPATH=.``): torchvision classifiers and models of normfold's zoo, random weights with
   seeded random BatchNorm statistics and affine parameters (running_mean ~ N(0, 0.5),
   running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2)), exported in eval mode by
   the TorchScript-based exporter with BatchNormalization kept (``dynamo=False``,
   ``do_constant_folding=False``, ``training=TrainingMode.PRESERVE``, opset 17, a dynamic batch
   axis ``N``); beside each, the BatchNorm ops normfold leaves when it folds the same model from
   PyTorch (``normfold.fold(model, x).program``)::

       PYTHONPATH=. /work/rmvenv/bin/python benchmarks/onnx_peers.py export --dir /tmp/onnx_peers

2. ``run``: the 16 foldable and 3 non-foldable rows of the issue's table (built with
   ``onnx.helper`` at opset 17: ``tests/onnx_rows.py``) and the exported files, through each
   tool::

       .benchvenv/bin/python benchmarks/onnx_peers.py run --dir /tmp/onnx_peers \\
           --json benchmarks/onnx_peers_latest.json

Tools: ``normfold`` (``normfold.fold_onnx(src, dst)``: plan, apply, ``onnx.checker``, write, and
its own parity check in onnxruntime of the file written against a float64 run of the original,
all inside the timing); ``ort-basic``/``ort-all`` (an onnxruntime session of ``src`` at
``ORT_ENABLE_BASIC``/``ORT_ENABLE_ALL`` writing its optimized model to ``dst``,
``SessionOptions.optimized_model_filepath``); ``onnxoptimizer`` (``fuse_bn_into_conv``);
``onnxsim`` (``simplify``); ``onnxslim`` (``slim``); ``onnxscript``
(``onnxscript.optimizer.optimize``), each of the last four as ``onnx.load(src)``, the tool,
``onnx.save(dst)``.

Wall time, the same way for every tool: file to file (``src`` read, ``dst`` written), every tool
in this one process, each tool run once untimed before the table (imports and first-call setup
paid there, by none of the cells); with ``--repeat N`` a cell's time is the median of N runs.

Each cell: the norm ops left (BatchNormalization nodes, plus standalone per-channel affine ops:
Mul/Div by, or Add/Sub of, a constant of more than one element, an Add/Sub after a MatMul/Gemm
being a layer bias, not counted; plus the Conv-like nodes a tool added, as ``ORT_ENABLE_ALL`` does
when it turns a BatchNormalization it cannot fold into a 1x1 conv), and ``x`` when the tool's
model fails parity against the original. Parity is one judge for every tool: normfold's rule
(:mod:`normfold.check.parity`: per element against a float64 run of the original graph, allowing
the original's own float32 noise), on a standard-normal and a uniform[0, 255] input set, both
models run in onnxruntime with graph optimizations off. ``err`` is a tool that raised; a tool
that does not import is a ``-`` column.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TORCHVISION = (
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121"
)  # fmt: skip
ZOO = ("levit", "decoder", "mixed", "bn_head")
SIZE = 160  # torchvision input side
CONVLIKE = {"Conv", "FusedConv", "ConvTranspose", "NhwcConv", "NhwcFusedConv"}


# --- 1. export (a Python with torchvision) --------------------------------------------------------
def _randomize_norms(model: Any, seed: int) -> None:
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def export(folder: Path) -> None:
    import torch
    import torchvision
    from normfold.models import ZOO as zoo

    import normfold

    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    side = (1, 3, SIZE, SIZE)
    models = [(n, lambda n=n: getattr(torchvision.models, n)(weights=None), side) for n in TORCHVISION]
    models += [(f"zoo_{n}", zoo[n].factory, zoo[n].input_shape) for n in ZOO]
    for i, (name, build, shape) in enumerate(models):
        torch.manual_seed(i)
        model = build().eval()
        _randomize_norms(model, seed=100 + i)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        path = folder / f"{name}.onnx"
        for axes in ({"x": {0: "N"}, "y": {0: "N"}}, None):  # the exporter's BatchNorm1d needs a fixed batch
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    torch.onnx.export(
                        model, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                        training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                        dynamic_axes=axes,
                    )  # fmt: skip
                break
            except Exception as e:  # the exporter's limits are not normfold's: say so and go on
                print(f"{name}: not exported with axes {axes} ({type(e).__name__}: {str(e).splitlines()[0]})")
                path.unlink(missing_ok=True)
        if not path.exists():
            continue
        started = time.perf_counter()
        program = normfold.fold(model, (torch.cat([x, x]),)).program
        left = sum("batch_norm" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
        found[name] = {"pytorch_left": left, "pytorch_fold_s": round(time.perf_counter() - started, 2),
                       "shape": list(shape)}  # fmt: skip
        print(f"{name}: wrote {path.name}; normfold from PyTorch leaves {left} batch-norm op(s)", flush=True)
    (folder / "pytorch.json").write_text(json.dumps(found, indent=2) + "\n")


# --- 2. the tools -------------------------------------------------------------------------------
# Each tool runs file to file in this one process: it reads ``src`` and writes ``dst``; its
# imports were made before any timing (:func:`warm_up`), so every cell times the same thing.
def _ort(level: str) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(dst)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])

    return run


def _normfold(src: Path, dst: Path) -> None:
    import normfold

    normfold.fold_onnx(src, dst)  # plan, apply, onnx.checker, write, parity on the file written


def _python_tool(transform: Callable[[Any], Any]) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        import onnx

        onnx.save(transform(onnx.load(str(src))), str(dst))

    return run


def _onnxoptimizer(model: Any) -> Any:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _onnxsim(model: Any) -> Any:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simplified


def _onnxslim(model: Any) -> Any:
    import onnxslim

    return onnxslim.slim(model)


def _onnxscript(model: Any) -> Any:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


TOOLS: dict[str, tuple[str | None, Callable[[Path, Path], None]]] = {
    "normfold": ("normfold", _normfold),
    "ort-basic": ("onnxruntime", _ort("ORT_ENABLE_BASIC")),
    "ort-all": ("onnxruntime", _ort("ORT_ENABLE_ALL")),
    "onnxoptimizer": ("onnxoptimizer", _python_tool(_onnxoptimizer)),
    "onnxsim": ("onnxsim", _python_tool(_onnxsim)),
    "onnxslim": ("onnxslim", _python_tool(_onnxslim)),
    "onnxscript": ("onnxscript", _python_tool(_onnxscript)),
}


def warm_up(tools: dict[str, Any], model: Any) -> None:
    """Each tool once, untimed, so that no cell pays a tool's imports or first-call setup."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "warm.onnx"
        onnx.save(model, str(src))
        for tool, (_, run) in tools.items():
            with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):  # fmt: skip
                run(src, Path(tmp) / f"{tool}.onnx")


# --- 3. counting and judging --------------------------------------------------------------------
def counts(model: Any) -> dict[str, int]:
    """BatchNormalization nodes, standalone per-channel affine ops, Conv-like nodes."""
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    producer = {o: n.op_type for n in g.node for o in n.output}
    dynamic = {i.name for i in g.input if i.name not in consts}  # values computed from the inputs
    for n in g.node:  # graph order is topological
        if any(i in dynamic for i in n.input):
            dynamic.update(n.output)

    def size(name: str) -> int:
        return int(numpy_helper.to_array(consts[name]).size) if name in consts else 0

    affine = 0
    for n in g.node:
        if n.op_type not in ("Mul", "Div", "Add", "Sub") or len(n.input) != 2:
            continue
        const = [i for i in n.input if i in consts]
        if len(const) != 1 or size(const[0]) <= 1 or n.output[0] not in dynamic:
            continue  # not on the data path: a constant subgraph (weights computed at load)
        other = next(i for i in n.input if i not in consts)
        if n.op_type in ("Add", "Sub") and producer.get(other) in ("MatMul", "Gemm"):
            continue  # a layer's bias
        affine += 1
    return {
        "bn": sum(n.op_type == "BatchNormalization" for n in g.node),
        "affine": affine,
        "conv": sum(n.op_type in CONVLIKE and n.output[0] in dynamic for n in g.node),
        "nodes": len(g.node),
    }


class Judge:
    """normfold's parity rule for any candidate against one original: the original's float32 run,
    float64 run and perturbed runs made once per input set."""

    def __init__(self, original: Any) -> None:
        import torch

        from normfold.check.input_sets import parity_sets
        from normfold.check.onnx_exact import exact_run, perturbed_runs
        from normfold.check.parity_rule import ParityRule
        from normfold.onnx_inputs import example_feeds

        self.rule = ParityRule()
        feeds = example_feeds(original, None, None)
        names = list(feeds)
        ref = _session(original)
        self.out_names = [o.name for o in ref.get_outputs()]  # the same session runs every set
        self.sets = []
        for s in parity_sets([feeds[k] for k in names], self.rule, given=False):
            typed = {k: t.to(feeds[k].dtype) for k, t in zip(names, s.inputs, strict=True)}
            run = ref.run(self.out_names, {k: t.numpy() for k, t in typed.items()})
            r = {k: torch.from_numpy(a) for k, a in zip(self.out_names, run, strict=True)}
            exact, _ = exact_run(original, typed, self.rule.exact_limit_bytes)
            perturbed = [] if exact is None else perturbed_runs(original, typed, self.rule.perturbations)
            self.sets.append((s.name, typed, r, exact, perturbed))

    def __call__(self, candidate: Any) -> tuple[bool, float]:
        """Passed, and the largest |candidate - original| over max |original|."""
        import torch

        from normfold.check.parity import compare_outputs, report_of

        cand = _session(candidate)
        outputs, problems, worst = [], [], 0.0
        for name, typed, r, exact, perturbed in self.sets:
            run = cand.run(self.out_names, {k: t.numpy() for k, t in typed.items()})
            c = {k: torch.from_numpy(a) for k, a in zip(self.out_names, run, strict=True)}
            for k in r:
                scale = float(r[k].double().abs().max()) or 1.0
                worst = max(worst, float((c[k].double() - r[k].double()).abs().max()) / scale)
            compared, found = compare_outputs(r, c, exact, self.rule, name, perturbed)
            outputs += compared
            problems += found
        return report_of(outputs, problems, ()).passed, worst


def _session(model: Any) -> Any:
    from normfold.io.onnx_run import open_session  # normfold's one way to open a session (optimizations off)

    return open_session(model.SerializeToString()).session


# --- 4. the run ---------------------------------------------------------------------------------
def _installed(package: str | None) -> bool:
    try:
        __import__(package)
    except Exception:
        return False
    return True


def measure(name: str, kind: str, original: Any, tools: dict[str, Any], repeat: int = 1) -> dict[str, Any]:
    import onnx

    before = counts(original)
    judge = Judge(original)
    row: dict[str, Any] = {"name": name, "kind": kind, "before": before, "tools": {}}
    for tool, (_, run) in tools.items():
        cell: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(original, str(src))
            try:
                times = []
                for _ in range(repeat):
                    dst.unlink(missing_ok=True)
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        run(src, dst)
                    times.append(time.perf_counter() - started)
                cell["seconds"] = round(statistics.median(times), 3)
                result = onnx.load(str(dst))
                after = counts(result)
                added = max(after["conv"] - before["conv"], 0)  # a BN turned into a 1x1 conv
                cell.update(after, left=after["bn"] + after["affine"] + added)
                cell["parity"], cell["max_rel_err"] = judge(result)
                if tool == "normfold":  # where its time goes: the plan alone, without apply and parity
                    import normfold

                    started = time.perf_counter()
                    normfold.plan_onnx(src)
                    cell["plan_seconds"] = round(time.perf_counter() - started, 3)
            except Exception as e:  # a tool's failure is a cell, not the end of the table
                cell.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        row["tools"][tool] = cell
    return row


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    if "error" in c:
        return "err"
    return f"{c['left']}" + ("" if c["parity"] else " x")


def _timed(c: dict[str, Any] | None) -> str:
    return _cell(c) if c is None or "seconds" not in c else f"{_cell(c)} ({c['seconds']:.2f}s)"


def _join(cells: Any) -> str:
    return " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    tools, s = result["tools"], result["summary"]
    lines = ["| pattern | before | " + _join(tools), "|---" * (len(tools) + 2) + "|"]
    for row in result["rows"]:
        if row["kind"] != "real":
            before = row["before"]["bn"] + row["before"]["affine"]
            tag = "" if row["kind"] == "foldable" else " (must stay)"
            cells = (_cell(row["tools"].get(t)) for t in tools)
            lines.append(f"| {row['name']}{tag} | {before} | " + _join(cells))
    lines.append("| **foldable rows folded (of 16)** | | " + _join(str(s[t]["folded_rows"]) for t in tools))
    lines.append("| **must-stay rows kept (of 3)** | | " + _join(str(s[t]["refusals_kept"]) for t in tools))
    lines.append("| **wrong results** | | " + _join(str(s[t]["wrong"]) for t in tools))
    real = [r for r in result["rows"] if r["kind"] == "real"]
    if real:
        lines += ["", "| real file | BN before | normfold from PyTorch | " + _join(tools)]
        lines.append("|---" * (len(tools) + 3) + "|")
        for row in real:
            pt = row.get("pytorch_left", "-")
            cells = (_timed(row["tools"].get(t)) for t in tools)
            lines.append(f"| {row['name']} | {row['before']['bn']} | {pt} | " + _join(cells))
        medians = ("-" if s[t]["median_real_s"] is None else f"{s[t]['median_real_s']:.2f}" for t in tools)
        lines.append("| **median wall time (s)** | | | " + _join(medians))
        plans = [r["tools"]["normfold"].get("plan_seconds") for r in real if "normfold" in r["tools"]]
        plans = [p for p in plans if p is not None]
        if plans:
            median = statistics.median(plans)
            lines += ["", f"normfold's plan alone (no apply, no parity): median {median:.2f}s"]
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    out = {}
    for t in tools:
        cells = [(r["kind"], r["tools"].get(t, {})) for r in rows]
        real_s = [c["seconds"] for kind, c in cells if kind == "real" and "parity" in c]
        out[t] = {
            "folded_rows": sum(k == "foldable" and c.get("left") == 0 and c.get("parity") is True
                               for k, c in cells),
            "refusals_kept": sum(k == "refusal" and c.get("left", 0) >= 1 and c.get("parity") is True
                                 for k, c in cells),
            "wrong": sum("parity" in c and not c["parity"] for _, c in cells),
            "errors": sum("error" in c for _, c in cells),
            "median_real_s": statistics.median(real_s) if real_s else None,
        }
    return out


def run(folder: Path | None, out: Path | None, repeat: int = 1) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    import onnx
    import onnx_rows

    tools = {t: spec for t, spec in TOOLS.items() if _installed(spec[0])}
    cases = [(n, "foldable", f()) for n, f in onnx_rows.ROWS.items()]
    cases += [(n, "refusal", f()) for n, (f, _) in onnx_rows.REFUSALS.items()]
    pytorch = {}
    if folder is not None:
        sidecar = folder / "pytorch.json"
        pytorch = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        cases += [(p.stem, "real", onnx.load(str(p))) for p in sorted(folder.glob("*.onnx"))]
    warm_up(tools, onnx_rows.conv_bn_relu())
    rows = []
    for name, kind, model in cases:
        started = time.perf_counter()
        row = measure(name, kind, model, tools, repeat)
        if name in pytorch:
            row["pytorch_left"] = pytorch[name]["pytorch_left"]
        rows.append(row)
        print(f"{name}: {json.dumps({t: _cell(c) for t, c in row['tools'].items()})} "
              f"({time.perf_counter() - started:.1f}s)", flush=True)  # fmt: skip
    versions = {}
    for package in (
        "normfold",
        "onnx",
        "onnxruntime",
        "onnxoptimizer",
        "onnxsim",
        "onnxslim",
        "onnxscript",
        "torch",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    result = {"tools": list(tools), "skipped_tools": sorted(set(TOOLS) - set(tools)), "versions": versions,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeat": repeat,
              "timing": "file to file, every tool in this one process, imports warmed up first; median of "
                        "`repeat` runs per cell", "rows": rows,
              "summary": summarize(rows, list(tools))}  # fmt: skip
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="export the real files (needs torchvision)")
    e.add_argument("--dir", type=Path, required=True)
    r = sub.add_parser("run", help="the table")
    r.add_argument("--dir", type=Path, default=None, help="the exported files (none: the 19 rows only)")
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--force", action="store_true", help="replace an existing --json file")
    r.add_argument("--repeat", type=int, default=1, help="runs per cell; its time is their median")
    args = parser.parse_args()
    if args.step == "export":
        export(args.dir)
        return
    if args.json is not None and args.json.exists() and not args.force:
        parser.error(f"{args.json} exists; pass --force to replace it")
    run(args.dir, args.json, args.repeat)


if __name__ == "__main__":
    main()
