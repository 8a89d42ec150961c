"""End to end: ``normfold fold ... --out x.onnx`` against a bare ``torch.onnx.export`` and against
export + onnxsim, on real torchvision/timm models, each run a fresh process timed from outside.

Not part of CI. Run it in the real-model environment of ``benchmarks/real_models.py`` (its
docstring says how to make it), with ``onnxsim`` added (or ``onnxslim`` where onnxsim will not
install: ``--simplifier onnxslim``), on a machine nothing else is using::

    /work/rmvenv/bin/python benchmarks/e2e.py --load quiet --json benchmarks/e2e_latest.json
    /work/rmvenv/bin/python benchmarks/e2e.py --load busy --json benchmarks/e2e_latest.json
    /work/rmvenv/bin/python benchmarks/e2e.py --table benchmarks/e2e_latest.json   # print it again
    /work/rmvenv/bin/python benchmarks/e2e.py --models resnet18 --rounds 1 --size 64   # smoke test

A full run is 8 models x 3 rounds x 3 tools = 72 fresh processes (plus 3 untimed), each a few
seconds to tens of seconds on 2 quiet cores; on a machine shared with other work they took 35-55 s
each at ``--size 64``, which is why the numbers only mean something on a quiet machine.

What is timed, for each model (random init, then seeded random BatchNorm statistics as
``real_models.random_model`` makes them; input ``1,3,SIZE,SIZE``, SIZE 224 by default):

* ``normfold``: ``normfold fold MODEL.pt --model FACTORY --input-shape 1,3,SIZE,SIZE --out x.onnx
  --report r.json`` on the model's state dict, as README recommends (``--source spec`` gives the
  model as the factory ``real_models:random_model`` instead); verification included.
* ``bare``: ``python -c`` building the same architecture, loading the same state dict and running
  ``torch.onnx.export(model, (x,), OUT, dynamo=True, dynamic_shapes=...)`` with the batch axis
  dynamic as normfold writes it (``Dim("batch", min=1, max=2**20)``, captured at batch 2 because
  torch.export specializes a batch of 1): like for like.
* ``bare+sim``: the same, then ``onnxsim.simplify`` of the written file, saved over it.

Each run is a fresh process: its wall time is ``time.perf_counter`` around ``subprocess.run``, so
interpreter start and imports are in it (the user's wall time). Rounds are interleaved: each round
runs every model and, per model, the three tools back to back in an order rotated by one each round,
so a slow moment of the machine hits every tool alike. One untimed run of each tool on the first
model fills the page cache first. The children get no ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
(torch's default threads, as a user has them) unless ``--inherit-threads``.

``--load busy`` starts a process spinning on one core (``python -c "while True: pass"``) before the
first run and kills it after the last: every tool is measured beside it. ``--load quiet,busy`` runs
both conditions one after the other.

Statistics: per model, the ratios of paired runs (the same round) normfold/bare and
normfold/(bare+sim), their median over the rounds; over the models, the median and the p90
(linear interpolation between order statistics, ``statistics.quantiles(method="inclusive")``) of
the per-model medians. Verification's share is ``verify (pytorch)`` + ``check (onnxruntime)`` from
normfold's ``--report`` ``timings_s``, over normfold's wall time (median over rounds). A run that
fails is recorded with its exit code and the tail of its stderr and left out of the statistics;
the benchmark goes on. ``--json`` is rewritten after every run (a stopped run leaves its results);
a file this script wrote keeps the results of the loads this run does not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MARKER = "normfold benchmarks/e2e.py"
TOOLS = ("normfold", "bare", "bare+sim")
VERIFY_STEPS = ("verify (pytorch)", "check (onnxruntime)")
DEFAULT_MODELS = ["resnet50", "mobilenetv3_large_100", "efficientnet_b0", "regnety_008", "densenet121",
                  "convnext_tiny", "resnet18", "mobilenet_v2"]  # fmt: skip
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

EXPORT = """
batch = torch.export.Dim("batch", min=1, max=2**20)
torch.onnx.export(model, (torch.randn({shape}),), OUT, dynamo=True, dynamic_shapes=({{0: batch}},))
"""
SIMPLIFY = {
    "onnxsim": "import onnx, onnxsim\nsimplified, ok = onnxsim.simplify(onnx.load(OUT))\nassert ok\n"
    "onnx.save(simplified, OUT)\n",
    "onnxslim": "import onnxslim\nonnxslim.slim(OUT, OUT)\n",
}


# --- the commands -------------------------------------------------------------------------------------


def commands(name: str, size: int, source: str, simplifier: str, tmp: Path) -> dict[str, Any]:
    """The model's input shape and, per tool, a function of the output path giving its argv."""
    from real_models import TORCHVISION, build, random_model, resolve

    full = resolve(name)
    kind, _, arch = full.partition("/")
    shape = (2, *build(full, size)[1])  # normfold's capture batch (a batch of 1 is specialized)
    input_shape = ",".join(map(str, (1, *shape[1:])))
    if source == "spec":
        args = {"name": name, "size": size}
        model = ["real_models:random_model", "--model-args", json.dumps(args)]
        build_code = f"import torch, real_models\nmodel = real_models.random_model(**{args!r})\n"
    else:
        weights = tmp / f"{arch}.pt"
        import torch

        torch.save(random_model(name, size).state_dict(), weights)
        if kind == "tv":
            kwargs = TORCHVISION.get(arch, {})
            factory = ["--model", f"torchvision.models:{arch}"]
            factory += ["--model-args", json.dumps(kwargs)] if kwargs else []
            build_code = f"import torch, torchvision\nmodel = torchvision.models.{arch}(**{kwargs!r})\n"
        else:
            factory = ["--model", "timm:create_model", "--model-args", json.dumps({"model_name": arch})]
            build_code = f"import torch, timm\nmodel = timm.create_model({arch!r})\n"
        model = [str(weights), *factory]
        build_code += f"model.load_state_dict(torch.load({str(weights)!r}, weights_only=True))\n"
    build_code += "model.eval()\n"
    bare = build_code + EXPORT.format(shape=", ".join(map(str, shape)))
    exe = str(Path(sys.executable).parent / "normfold")
    return {
        "input_shape": input_shape,
        "normfold": lambda out: [exe, "fold", *model, "--input-shape", input_shape, "--out", str(out),
                                 "--report", str(out.with_suffix(".report.json"))],
        "bare": lambda out: [sys.executable, "-c", f"OUT = {str(out)!r}\n{bare}"],
        "bare+sim": lambda out: [sys.executable, "-c", f"OUT = {str(out)!r}\n{bare}{SIMPLIFY[simplifier]}"],
    }


def child_env(inherit_threads: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    if not inherit_threads:
        for variable in THREAD_VARIABLES:
            env.pop(variable, None)
    return env


def run_once(argv: list[str], out: Path, env: dict[str, str], cwd: Path, timeout: float) -> dict[str, Any]:
    """One fresh process: its wall time, and what it wrote (normfold's step times, the ONNX inputs)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stderr or ""
        rc, stderr = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    record: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 3), "ok": rc == 0 and out.exists()}
    if not record["ok"]:
        record.update(rc=rc, stderr_tail=stderr[-2000:])
    report = out.with_suffix(".report.json")
    if report.exists():
        with contextlib.suppress(ValueError):
            record["timings_s"] = json.loads(report.read_text()).get("timings_s")
        report.unlink()
    if out.exists():
        record["onnx"] = describe_onnx(out)
        out.unlink()
        for extra in written(out):  # external data, if any: ours, in our temp dir
            extra.unlink()
    return record


def written(path: Path) -> list[Path]:
    """``path`` and the files beside it whose names start with its name (external data)."""
    return [p for p in path.parent.glob(glob.escape(path.name) + "*") if p.is_file()]


def describe_onnx(path: Path) -> dict[str, Any]:
    """The written graph's inputs (dims, a dynamic one by name), node and BatchNormalization counts,
    and its bytes with any external data file beside it (a bare export writes ``x.onnx.data``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    ops = [n.op_type for n in proto.graph.node]
    return {"inputs": dims, "nodes": len(ops), "BatchNormalization": ops.count("BatchNormalization"),
            "bytes": sum(p.stat().st_size for p in written(path))}  # fmt: skip


@contextlib.contextmanager
def load(condition: str) -> Iterator[None]:
    """``busy``: a process spinning on one core for as long as the block runs."""
    if condition == "quiet":
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1)
        yield
    finally:
        spinner.kill()
        spinner.wait()


# --- statistics and the table ---------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p90(values: list[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per model: median wall time per tool, median paired ratios, verification's share."""
    models: dict[str, Any] = {}
    for name, tools in runs.items():
        rounds = min(len(v) for v in tools.values())
        ok = [r for r in range(rounds) if all(tools[t][r]["ok"] for t in TOOLS)]
        wall = {t: [tools[t][r]["wall_s"] for r in ok] for t in TOOLS}
        # verification's seconds per run, from the steps of normfold's report (None: not reported)
        steps = [tools["normfold"][r].get("timings_s") or {} for r in ok]
        verify = [sum(t[s] for s in VERIFY_STEPS if s in t) if set(VERIFY_STEPS) & set(t) else None
                  for t in steps]  # fmt: skip
        models[name] = {
            "rounds_ok": len(ok),
            "failed": {t: sum(not run["ok"] for run in tools[t]) for t in TOOLS},
            "median_s": {t: median(wall[t]) for t in TOOLS},
            "ratio_bare": median([a / b for a, b in zip(wall["normfold"], wall["bare"], strict=True)]),
            "ratio_sim": median([a / b for a, b in zip(wall["normfold"], wall["bare+sim"], strict=True)]),
            "verify_s": median([v for v in verify if v is not None]),
            "verify_share": median(
                [v / w for v, w in zip(verify, wall["normfold"], strict=True) if v is not None]
            ),
        }
    ratios = [m["ratio_bare"] for m in models.values() if m["ratio_bare"] is not None]
    sims = [m["ratio_sim"] for m in models.values() if m["ratio_sim"] is not None]
    shares = [m["verify_share"] for m in models.values() if m["verify_share"] is not None]
    overall = {"models": len(ratios), "median_ratio_bare": median(ratios), "p90_ratio_bare": p90(ratios),
               "median_ratio_sim": median(sims), "median_verify_share": median(shares),
               "verify_share_range": [min(shares), max(shares)] if shares else None}  # fmt: skip
    return {"models": models, "overall": overall}


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def table(condition: str, result: dict[str, Any]) -> str:
    meta, summary = result["meta"], result["summary"]
    sim = meta["simplifier"]
    label = {"quiet": "quiet machine", "busy": "another process spinning on one core"}[condition]
    header = ["model", "bare export s", f"export + {sim} s", "normfold fold s", "normfold / bare",
              f"normfold / (export + {sim})", "verification s (share)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in summary["models"].items():
        s = m["median_s"]
        failed = ", ".join(f"{t} failed {n}x" for t, n in m["failed"].items() if n)
        cells = [name + (f" ({failed})" if failed else ""), fmt(s["bare"], ".1f"), fmt(s["bare+sim"], ".1f"),
                 fmt(s["normfold"], ".1f"), fmt(m["ratio_bare"]), fmt(m["ratio_sim"]),
                 f"{fmt(m['verify_s'], '.1f')} ({percent(m['verify_share'])})"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    o = summary["overall"]
    low, high = o["verify_share_range"] or (None, None)
    return (
        f"#### End to end, {label} ({meta['cpus']} cores, {meta['rounds']} interleaved rounds, "
        f"input 1x3x{meta['size']}x{meta['size']}, medians over rounds)\n\n" + "\n".join(lines) + "\n\n"
        f"normfold / bare export over {o['models']} models: median **{fmt(o['median_ratio_bare'])}**, "
        f"p90 **{fmt(o['p90_ratio_bare'])}**; normfold / (export + {sim}): median "
        f"{fmt(o['median_ratio_sim'])}. Verification (`verify (pytorch)` + `check (onnxruntime)`) takes "
        f"{percent(o['median_verify_share'])} of normfold's run (median; {percent(low)}-{percent(high)}). "
        f"normfold {meta['normfold']}, torch {meta['torch']}, {meta['machine']}."
    )


# --- main -------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, condition: str, names: list[str], save: Any) -> dict[str, Any]:
    import torch
    from real_models import engine_version

    meta = {"normfold": engine_version(), "torch": torch.__version__, "simplifier": args.simplifier,
            "simplifier_version": _version(args.simplifier), "source": args.source, "size": args.size,
            "rounds": args.rounds, "cpus": os.cpu_count(), "load": condition,
            "machine": platform.processor() or platform.machine(),
            "child_threads_env": {v: child_env(args.inherit_threads).get(v) for v in THREAD_VARIABLES},
            "started": now()}  # fmt: skip
    result: dict[str, Any] = {"meta": meta, "runs": {n: {t: [] for t in TOOLS} for n in names}}
    env = child_env(args.inherit_threads)
    with tempfile.TemporaryDirectory(prefix="normfold-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        cmds = {n: commands(n, args.size, args.source, args.simplifier, tmp) for n in names}
        meta["input_shapes"] = {n: c["input_shape"] for n, c in cmds.items()}
        with load(condition):
            for tool in TOOLS if args.warmup else ():  # untimed: fills the page cache
                out = tmp / f"warmup.{tool}.onnx"
                warm = run_once(cmds[names[0]][tool](out), out, env, tmp, args.timeout)
                print(f"[{condition}] warm-up {tool}: {warm['wall_s']:.1f}s", file=sys.stderr, flush=True)
            for r in range(args.rounds):
                for i, name in enumerate(names):
                    shift = (r + i) % len(TOOLS)
                    for tool in TOOLS[shift:] + TOOLS[:shift]:
                        out = tmp / f"{name.replace('/', '_')}.{tool}.r{r}.onnx"
                        record = run_once(cmds[name][tool](out), out, env, tmp, args.timeout)
                        result["runs"][name][tool].append(record)
                        status = "ok" if record["ok"] else f"FAILED (exit {record['rc']})"
                        print(f"[{condition} round {r + 1}/{args.rounds}] {name} {tool}: "
                              f"{record['wall_s']:.1f}s {status}", file=sys.stderr, flush=True)  # fmt: skip
                        result["summary"] = summarize(result["runs"])
                        save(condition, result)
    meta["finished"] = now()
    return result


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def default_simplifier() -> str:
    return "onnxsim" if _version("onnxsim") else "onnxslim"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated (tv/NAME, timm/NAME, NAME; default "
                        f"{','.join(DEFAULT_MODELS)})")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--load", default="quiet", help="quiet, busy or quiet,busy (default quiet)")
    parser.add_argument("--json", type=Path, help="write every run and the statistics here")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--source", choices=("state-dict", "spec"), default="state-dict",
                        help="give normfold the model's state dict + --model (default) or the factory "
                        "spec real_models:random_model")  # fmt: skip
    parser.add_argument("--simplifier", choices=sorted(SIMPLIFY), default=default_simplifier())
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process (default 1800)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed runs")
    parser.add_argument("--inherit-threads", action="store_true",
                        help="pass OMP_NUM_THREADS/MKL_NUM_THREADS on to the children")  # fmt: skip
    parser.add_argument("--table", type=Path, metavar="JSON", help="only print the tables of a saved run")
    args = parser.parse_args(argv)
    if args.table:
        saved = json.loads(args.table.read_text())
        print("\n\n".join(table(c, r) for c, r in saved["loads"].items()))
        return
    conditions = [c.strip() for c in args.load.split(",")]
    if not set(conditions) <= {"quiet", "busy"} or args.rounds < 1:
        parser.error("--load takes quiet, busy or quiet,busy; --rounds at least 1")
    names = [n.strip() for n in args.models.split(",")] if args.models else DEFAULT_MODELS
    document: dict[str, Any] = {"benchmark": MARKER, "loads": {}}
    if args.json and args.json.exists():  # keep another load's results, in a file this script wrote
        previous = json.loads(args.json.read_text())
        if previous.get("benchmark") != MARKER:
            parser.error(f"{args.json} exists and was not written by this script: choose another --json")
        document["loads"] = previous["loads"]

    def save(condition: str, result: dict[str, Any]) -> None:
        document["loads"][condition] = result
        if args.json:
            args.json.write_text(json.dumps(document, indent=1) + "\n")

    for condition in conditions:
        result = measure(args, condition, names, save)
        save(condition, result)
        print(table(condition, result) + "\n", flush=True)


if __name__ == "__main__":
    main()
