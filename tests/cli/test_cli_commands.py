"""The commands as issue 19 shapes them: one library call each with the options grouped into the
library's option objects, a progress display on every command, examples in every help, the
export options on drop-bias and swap, shapes from --calibrate batches, and fold's summary."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import invoke, ok
from normfold.models import mlp, resnet
from rich.console import Console

import normfold
from normfold.errors import UsageError
from normfold.options import ExportOptions, FoldOptions, InputSpec, LoadOptions, WriteOptions

RESNET, MLP = "normfold.models:resnet", "normfold.models:mlp"
COMMANDS = ("fold", "inspect", "recalibrate", "drop-bias", "swap", "fold-norms")


def run_ort(path: Path, *xs: torch.Tensor) -> list[Any]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """normfold's fp32 criterion: max|got - ref| <= 1e-6 + 1e-5 * max|ref|."""
    assert got.shape == ref.shape
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= 1e-6 + 1e-5 * ref.double().abs().max().item(), err


# ------------------------------------------------------------------------------------------------
# one library call per command, the options grouped into the library's objects


class _Called(UsageError):
    pass


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[Any, ...], dict[str, Any]]]]:
    """Every pipeline entry point replaced by a recorder that stops the command (exit 2)."""
    from normfold import pipeline

    seen: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    entry_points = ("fold_and_export", "inspect", "recalibrate_and_write", "drop_bias_and_write")
    for name in (*entry_points, "swap_and_write", "fold_norms_and_write"):

        def record(*args: Any, _name: str = name, **kwargs: Any) -> None:
            seen.append((_name, args, kwargs))
            raise _Called("recorded")

        monkeypatch.setattr(pipeline, name, record)
    yield seen


def test_fold_groups_its_options_into_the_library_objects(
    tmp_path: Path, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> None:
    batches = tmp_path / "b.pt"
    torch.save([torch.randn(4, 64)], batches)
    result = invoke(
        "fold", MLP, "--out", tmp_path / "m.onnx", "--model-args", '{"seed": 3}', "--input-shape", "x:2,64",
        "--input-dtype", "float32", "--static-batch", "--dynamic", "0:1=features", "--opset", "18",
        "--input-names", "features", "--output-names", "logits,extra", "--providers", "CPUExecutionProvider",
        "--rtol", "1e-4", "--atol", "1e-5", "--noise-factor", "8", "--value-range", "-1,1",
        "--calibrate", batches, "--require-all", "--no-reparam", "--report", tmp_path / "r.json",
        "--save-inputs", tmp_path / "i.pt", "--force", "-q",
    )  # fmt: skip
    assert (result.exit_code, result.stderr) == (2, "error: recorded\n")
    ((name, args, kw),) = calls  # exactly one library call
    assert name == "fold_and_export" and args == (MLP, tmp_path / "m.onnx")
    assert kw["load"] == LoadOptions(model=None, model_args={"seed": 3}, trust=False)
    assert kw["inputs"] == InputSpec(shapes={"x": (2, 64)}, dtype=torch.float32)
    assert kw["folding"] == FoldOptions(reparameterize=False, calibrate=batches, require_all=True)
    assert kw["export"] == ExportOptions(
        opset=18, static_batch=True, dynamic_axes={0: {1: "features"}}, input_names=("features",),
        output_names=("logits", "extra"), providers=("CPUExecutionProvider",),
    )  # fmt: skip
    assert kw["write"] == WriteOptions(report=tmp_path / "r.json", save_inputs=tmp_path / "i.pt", force=True)
    rule = kw["rule"]
    assert (rule.rtol, rule.atol, rule.noise_factor, rule.value_range) == (1e-4, 1e-5, 8.0, (-1.0, 1.0))
    assert kw["on_step"] is None  # -q: no progress


@pytest.mark.parametrize(
    ("args", "call", "export"),
    [
        (["inspect", MLP, "--static-batch", "--dynamic", "1=f"], "inspect",
         ExportOptions(static_batch=True, dynamic_axes={0: {1: "f"}})),
        (["recalibrate", MLP, "--data", "b.pt", "--out", "o.pt"], "recalibrate_and_write", None),
        (["drop-bias", MLP, "--out", "o.onnx", "--static-batch", "--opset", "18", "--output-names", "y"],
         "drop_bias_and_write", ExportOptions(opset=18, static_batch=True, output_names=("y",))),
        (["swap", MLP, "--to", "group", "--out", "o.onnx", "--dynamic", "1=f", "--input-names", "x",
          "--providers", "CPUExecutionProvider"], "swap_and_write",
         ExportOptions(dynamic_axes={0: {1: "f"}}, input_names=("x",), providers=("CPUExecutionProvider",))),
        (["fold-norms", MLP, "--out", "o.onnx", "--untie", "--opset", "18"], "fold_norms_and_write",
         ExportOptions(opset=18)),
    ],
)  # fmt: skip
def test_every_command_makes_one_library_call(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
    args: list[str],
    call: str,
    export: ExportOptions | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save([torch.randn(4, 64)], tmp_path / "b.pt")
    assert invoke(*args).exit_code == 2
    ((name, _, kw),) = calls
    assert name == call
    assert kw.get("export") == export
    assert isinstance(kw["load"], LoadOptions) and isinstance(kw["write"], WriteOptions)


_LOAD_AND_WRITE = ["--model-args", '{"seed": 3}', "--report", "r.json", "--force", "-q"]
_INPUTS = ["--input-shape", "x:2,64", "--input-dtype", "float64"]
_EXPORT = ["--opset", "18", "--input-names", "x", "--output-names", "y",
           "--providers", "CPUExecutionProvider"]  # fmt: skip
_AXES = ["--static-batch", "--dynamic", "1=f"]


@pytest.mark.parametrize(
    ("args", "takes"),
    [
        (["fold", MLP, "--out", "o.onnx", *_INPUTS, *_AXES, *_EXPORT], {"inputs", "export"}),
        (["inspect", MLP, *_INPUTS, *_AXES], {"inputs", "axes"}),
        (["recalibrate", MLP, "--data", "b.pt", "--out", "o.pt"], set()),
        (["drop-bias", MLP, "--out", "o.onnx", *_INPUTS, *_AXES, *_EXPORT], {"inputs", "export"}),
        (["swap", MLP, "--to", "group", "--out", "o.onnx", *_INPUTS, *_AXES, *_EXPORT], {"inputs", "export"}),
        (["fold-norms", MLP, "--out", "o.onnx", *_INPUTS, *_AXES, *_EXPORT], {"inputs", "export"}),
    ],
)  # fmt: skip
def test_every_command_groups_the_options_it_shares_the_same_way(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
    args: list[str],
    takes: set[str],
) -> None:
    """The same flags become the same option objects in every command that takes them."""
    monkeypatch.chdir(tmp_path)
    torch.save([torch.randn(4, 64)], tmp_path / "b.pt")
    result = invoke(*args, *_LOAD_AND_WRITE)
    assert (result.exit_code, result.stderr) == (2, "error: recorded\n")
    ((_, _, kw),) = calls
    assert kw["load"] == LoadOptions(model_args={"seed": 3})
    assert kw["write"] == WriteOptions(report=Path("r.json"), force=True)
    assert kw.get("inputs") == (InputSpec(shapes={"x": (2, 64)}, dtype=torch.float64) if takes else None)
    axes = {"static_batch": True, "dynamic_axes": {0: {1: "f"}}}
    named = {"opset": 18, "input_names": ("x",), "output_names": ("y",)}
    named["providers"] = ("CPUExecutionProvider",)
    export = {"export": ExportOptions(**axes, **named), "axes": ExportOptions(**axes)}
    assert kw.get("export") == next((export[k] for k in takes if k in export), None)


# ------------------------------------------------------------------------------------------------
# progress


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        (["fold", MLP, "--out", "m.pt2"], ["load", "capture and fold", "verify (pytorch)"]),
        (["inspect", MLP], ["load", "capture and fold"]),
        (["recalibrate", RESNET, "--data", "b.pt", "--out", "r.pt"], ["load", "recalibrate", "write"]),
        (["drop-bias", MLP, "--out", "d.pt"], ["load", "transform", "write"]),
        (["swap", RESNET, "--to", "frozen", "--out", "s.pt"], ["load", "transform", "write"]),
    ],
)  # fmt: skip
def test_every_command_shows_its_phases_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], steps: list[str]
) -> None:
    """With stderr a terminal, each phase's name appears on it while the command runs (the
    display is transient: stdout has only the results); with -q nothing does."""
    monkeypatch.chdir(tmp_path)
    torch.save([torch.randn(4, 3, 32, 32)], tmp_path / "b.pt")
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr("normfold.cli.progress.err_console", terminal)
    result = ok(*args)
    drawn = screen.getvalue()
    command = args[0]
    assert f"{command}: starting (importing torch)" in drawn
    for step in steps:
        assert f"{command}: {step}" in drawn, (step, drawn)
    assert "\x1b[" not in result.stdout
    for f in tmp_path.iterdir():
        if f.name != "b.pt":
            f.unlink()
    screen.truncate(0)
    assert ok(*args, "-q").stdout == ""
    assert screen.getvalue() == ""


def test_progress_on_a_real_terminal_and_none_when_piped(tmp_path: Path) -> None:
    """The console script with stderr on a pseudo-terminal draws the phases there; piped (and
    with -q on the terminal) its stderr stays empty."""
    import pty

    script = str(Path(sys.executable).with_name("normfold"))

    def run(out: str, *extra: str) -> tuple[int, str, str]:
        master, slave = pty.openpty()
        chunks: list[bytes] = []

        def read() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the slave side closed
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
        command = [script, "fold", MLP, "--out", out, *extra]
        proc = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=slave, env=env,
                              timeout=300)  # fmt: skip
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
        return proc.returncode, proc.stdout.decode(), b"".join(chunks).decode(errors="replace")

    code, stdout, stderr = run("a.onnx")
    assert code == 0 and stdout.splitlines()[-1].startswith("normfold: ok folded=2/2")
    steps = ("starting (importing torch)", "load", "capture and fold", "verify (pytorch)", "export (onnx)")
    for step in steps:
        assert f"fold: {step}" in stderr, (step, stderr)
    code, stdout, stderr = run("b.onnx", "-q")
    assert (code, stdout, stderr) == (0, "", "")
    piped = subprocess.run([script, "fold", MLP, "--out", "c.onnx"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert (piped.returncode, piped.stderr) == (0, "")


# ------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples_that_use_its_own_options(command: str) -> None:
    text = ok(command, "--help").stdout
    assert "Examples:" in text
    examples = [ln.strip() for ln in text.split("Examples:", 1)[1].splitlines() if ln.strip()]
    assert len([e for e in examples if e.startswith(f"normfold {command} ")]) >= 2, examples
    options = text.split("Examples:", 1)[0]
    for flag in {f for e in examples for f in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", e)}:
        assert re.search(rf"(?<![\w-]){flag}\b", options), (command, flag)  # every flag it shows exists


# ------------------------------------------------------------------------------------------------
# export options on drop-bias and swap, names and providers


def test_drop_bias_exports_a_dynamic_batch_and_takes_static_batch_and_opset(tmp_path: Path) -> None:
    dynamic, static = tmp_path / "d.onnx", tmp_path / "s.onnx"
    ok("drop-bias", MLP, "--out", dynamic)
    batch = onnx.load(str(dynamic)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    x3 = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        close(torch.from_numpy(run_ort(dynamic, x3)[0]), mlp().eval()(x3))
    ok("drop-bias", MLP, "--out", static, "--static-batch", "--opset", "18", "--input-shape", "1,64")
    proto = onnx.load(str(static))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_swap_exports_named_dynamic_axes(tmp_path: Path) -> None:
    out, report = tmp_path / "g.onnx", tmp_path / "r.json"
    result = ok("swap", RESNET, "--to", "group", "--num-groups", "4", "--out", out,
                "--dynamic", "2=height,3=width", "--report", report)  # fmt: skip
    assert "inputs: x float [batch, 3, height, width]" in result.stdout
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    swapped = normfold.swap_norms(resnet(), "group", num_groups=4).model.eval()
    x = torch.randn(3, 3, 40, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        close(torch.from_numpy(run_ort(out, x)[0]), swapped(x))
    assert json.loads(report.read_text())["export"]["dynamic_batch"] is True


def test_input_and_output_names_and_providers_reach_the_onnx_file(tmp_path: Path) -> None:
    out, report = tmp_path / "n.onnx", tmp_path / "r.json"
    result = ok("fold", MLP, "--out", out, "--input-names", "features", "--output-names", "logits",
                "--providers", "CPUExecutionProvider", "--report", report)  # fmt: skip
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["features"] and [o.name for o in graph.output] == ["logits"]
    assert "inputs: features float [batch, 64]" in result.stdout
    assert "outputs: logits float [batch, 10]" in result.stdout
    data = json.loads(report.read_text())
    assert data["options"]["export"]["input_names"] == ["features"]
    assert data["options"]["export"]["providers"] == ["CPUExecutionProvider"]
    assert set(data["parity"]) == {"pytorch", "onnxruntime-cpu"}


# ------------------------------------------------------------------------------------------------
# shapes from --calibrate batches


def test_fold_with_calibrate_takes_the_shapes_from_the_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A factory that declares no input shape: --calibrate's first batch gives it, no
    --input-shape needed; the written model is the recalibrated one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"nf_noshapes_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 5, 3)\n"
        "        self.bn = nn.BatchNorm2d(5)\n\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.bn(self.conv(x)))\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Net().eval()\n"
    )
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(4, 3, 12, 10, generator=g) * 2 + 0.5 for _ in range(3)]
    torch.save(batches, tmp_path / "b.pt")
    try:
        without = invoke("fold", f"{name}:build", "--out", "x.onnx")
        assert without.exit_code == 2 and "no input shape known" in without.stderr
        ok("fold", f"{name}:build", "--calibrate", "b.pt", "--out", "m.onnx", "--report", "r.json")
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["input_shapes"] == [[4, 3, 12, 10]]
        model = sys.modules[name].build()
        recalibrated = normfold.recalibrate(model, batches).model.eval()
        x = torch.randn(2, 3, 12, 10, generator=g)
        with torch.no_grad():
            close(torch.from_numpy(run_ort(tmp_path / "m.onnx", x)[0]), recalibrated(x))
            assert not torch.allclose(recalibrated(x), sys.modules[name].build()(x), atol=1e-3)
    finally:
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------
# fold's summary


def test_fold_summary_shows_size_opset_io_error_statistics_and_elapsed_time(tmp_path: Path) -> None:
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    lines = ok("fold", RESNET, "--out", out, "--report", report).stdout.splitlines()
    data = json.loads(report.read_text())
    e = data["export"]
    size = f"{e['size_bytes'] / 1000:.1f} kB"
    assert f"wrote {out} (onnx, {size}, opset {e['opset']}, IR version {e['ir_version']})" in lines
    assert e["size_bytes"] == sum(f.stat().st_size for f in tmp_path.glob("r.onnx*"))
    s = data["summary"]
    params = f"parameters {s['params_before']:,} -> {s['params_after']:,}"
    assert f"{params} (written file: {e['parameters']:,} initializer elements)" in lines
    header = (
        "runtime | output | inputs | vs | mean abs | median abs | p99 abs | max abs | p99 rel | max rel | "
        "min noise factor | min atol"
    )
    assert header in lines
    rows = {tuple(ln.split(" | ")[:2]): ln.split(" | ") for ln in lines[lines.index(header) + 1:]
            if ln.split(" | ")[0] in data["parity"]}  # fmt: skip
    assert set(rows) == {(rt, o) for rt, rep in data["parity"].items() for o in rep["error_stats"]}
    for (runtime, output), row in rows.items():
        stats = data["parity"][runtime]["error_stats"][output]
        assert row[2:4] == [stats["inputs"], stats["against"]]
        keys = ("mean_abs", "median_abs", "p99_abs", "max_abs", "p99_rel", "max_rel")
        assert row[4:10] == [f"{stats[k]:.2e}" for k in keys]
        assert float(row[6]) <= float(row[7])  # p99 <= max
    timing = next(ln for ln in lines if ln.startswith("timings: "))
    elapsed = float(re.search(r"; elapsed ([0-9.]+)s in all", timing).group(1))
    assert elapsed >= sum(data["timings_s"].values()) - 0.05  # the steps happen within it
