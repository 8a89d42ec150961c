"""Tests for the normfold command line (normfold.cli.app): every zoo model end to end, every input
format, every error exit code, and that nothing (not even a temporary file) is left behind on failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import HEAVY, ZOO_EXPORT_ONLY, ZOO_KEPT_REPARAM, ZOO_SHOWS, invoke, invoke_fresh, ok
from normfold.models import ZOO, example_inputs, mlp, resnet
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import Result

import normfold

NAMES = sorted(ZOO)
RESNET = "normfold.models:resnet"


# ------------------------------------------------------------------------------------------------
# helpers


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def reference(model: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*xs)


def assert_fp32_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """normfold's fp32 criterion: max|got - ref| <= 1e-6 + 1e-5 * max|ref|."""
    assert got.shape == ref.shape
    err = (got.double() - ref.double()).abs().max().item()
    allowed = 1e-6 + 1e-5 * ref.double().abs().max().item()
    assert err <= allowed, f"max abs error {err:.3e} > allowed {allowed:.3e}"


def run_ort(path: Path, *xs: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no refolding in ORT
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: x.numpy() for name, x in zip(names, xs, strict=True)})
    return torch.from_numpy(out)


def batch_dim(path: Path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def bn_nodes(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def error_line(result: Result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------------------------------
# version, help and import cost


def test_version() -> None:
    result = ok("--version")
    assert result.stdout == f"normfold {normfold.__version__}\n"
    assert normfold.__version__ == version("normfold")


def test_help_lists_commands_and_exit_codes() -> None:
    result = ok("--help")
    assert "fold" in result.stdout and "inspect" in result.stdout
    assert "5 parity failure" in result.stdout


def test_cli_import_and_help_do_not_import_torch() -> None:
    commands = (["--help"], ["--version"], ["fold", "--help"], ["inspect", "--help"])
    on_import, runs = invoke_fresh(commands, timeout=120)
    assert on_import == []
    for args, run in zip(commands, runs, strict=True):
        assert (run.exit_code, run.heavy) == (0, []), (args, run.stdout, run.stderr)


def test_entry_point_help_importtime_has_no_heavy_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from normfold.cli.app import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    imported = {
        line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    }
    assert "typer" in imported  # the importtime listing was parsed
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == []


def _console_script() -> str:
    script = Path(sys.executable).parent / "normfold"
    found = str(script) if script.exists() else shutil.which("normfold")
    assert found, "the normfold console script is not installed"
    return found


def test_console_script_version_and_exit_code(tmp_path: Path) -> None:
    script = _console_script()
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"normfold {normfold.__version__}"

    proc = subprocess.run(
        [script, "fold", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "no such file" in proc.stderr
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# every zoo model, end to end


@pytest.mark.parametrize("name", NAMES)
def test_fold_zoo_model_to_onnx(tmp_path: Path, name: str) -> None:
    out, report = tmp_path / f"{name}.onnx", tmp_path / "report.json"
    result = ok("fold", f"normfold.models:{name}", "--out", out, "--report", report)
    assert listing(tmp_path) == sorted([out.name, report.name])  # no temporary leftovers
    assert f"wrote {out}" in result.stdout

    original = ZOO[name].factory()
    kept = ZOO_KEPT_REPARAM.get(name, {})  # the CLI reparameterizes by default
    onnx_bn = bn_nodes(out)
    assert onnx_bn <= len(kept)  # never more than normfold keeps (the exporter may fold a kept one)
    assert batch_dim(out).dim_param and not batch_dim(out).HasField("dim_value")  # dynamic batch

    for batch in (None, 3):  # the zoo's batch, and another one through the dynamic batch dim
        xs = example_inputs(name, batch=batch)
        assert_fp32_close(run_ort(out, *xs), reference(original, *xs))

    data = json.loads(report.read_text())
    assert data["source"] == f"factory normfold.models:{name}"
    assert data["input_shapes"] == [list(shape) for shape in ZOO[name].input_shapes]
    assert {s["norm"]: s["code"] for s in data["skipped"]} == kept
    assert all(s["reason"] for s in data["skipped"])
    assert {f["norm"] for f in data["folded"] if f["where"] == "export"} == ZOO_EXPORT_ONLY.get(name, set())
    assert (data["schema_version"], data["command"], data["status"]) == (2, "fold", "ok")
    summary = data["summary"]
    assert summary["norms"] == len(data["folded"]) + len(data["skipped"]) >= count_bn(original)
    assert (summary["folded"], summary["kept"]) == (len(data["folded"]), len(kept))
    assert summary["ops_written"].get("BatchNormalization", 0) == onnx_bn
    left = summary["ops_folded"].get("BatchNormalization", 0)  # what normfold left to the exporter
    assert summary["exporter_removed_batchnorms"] == left - onnx_bn
    assert "parity" not in data["export"]  # once, under "parity"
    assert {i["shape"][0] for i in data["export"]["inputs"]} == {"batch"}  # the named dynamic axis
    assert set(data["parity"]) >= {"pytorch", "onnxruntime-cpu"}
    for runtime, rep in data["parity"].items():
        assert rep["passed"] is True, runtime
        assert {o["inputs"] for o in rep["outputs"]} == {"normal", "uniform[0,255]"}
        for o in rep["outputs"]:  # judged against the float64 run, within the model's own noise
            assert 0 <= o["exact_error"] <= o["allowed_error"], (runtime, o)
            assert o["allowed_error"] <= 1e-6 + 1e-5 * o["max_abs_reference"] + 4 * o["noise"] + 1e-9
    assert data["export"]["batchnorm_nodes"] == onnx_bn
    assert data["export"]["dynamic_batch"] is True
    assert data["export"]["path"] == str(out)
    timings = data["timings_s"]
    assert {"load", "capture and fold", "export (onnx)", "check (onnxruntime)"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    for package in ("torch", "onnx", "onnxruntime"):
        assert data["versions"][package] == version(package)


@pytest.mark.parametrize("name", NAMES)
def test_fold_zoo_model_to_pt2(tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.pt2"
    ok("fold", f"normfold.models:{name}", "--out", out)
    assert listing(tmp_path) == [out.name]
    program = torch.export.load(out).module()
    original = ZOO[name].factory()
    for batch in (None, 3):
        xs = example_inputs(name, batch=batch)
        with torch.no_grad():
            got = program(*xs)
        assert_fp32_close(got, reference(original, *xs))


def test_static_batch(tmp_path: Path) -> None:
    out, report = tmp_path / "static.onnx", tmp_path / "r.json"
    ok("fold", RESNET, "--out", out, "--static-batch", "--report", report)
    dim = batch_dim(out)
    assert dim.HasField("dim_value") and dim.dim_value == ZOO["resnet"].input_shape[0]
    assert not dim.dim_param
    assert json.loads(report.read_text())["export"]["dynamic_batch"] is False
    (x,) = example_inputs("resnet")
    assert_fp32_close(run_ort(out, x), reference(resnet(), x))
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run_ort(out, example_inputs("resnet", batch=3)[0])


# ------------------------------------------------------------------------------------------------
# input formats


def test_state_dict_with_model(tmp_path: Path) -> None:
    trained = resnet(seed=1)
    weights = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), weights)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    ok("fold", weights, "--model", RESNET, "--out", out, "--report", report)
    assert json.loads(report.read_text())["source"] == f"state_dict {weights} into {RESNET}"
    (x,) = example_inputs("resnet")
    got = run_ort(out, x)
    assert_fp32_close(got, reference(trained, x))
    assert not torch.allclose(got, reference(resnet(seed=0), x), atol=1e-3)  # not the factory's weights


def test_safetensors_with_model_and_model_args(tmp_path: Path) -> None:
    trained = resnet(seed=2, num_classes=4)
    weights = tmp_path / "weights.safetensors"
    save_file(trained.state_dict(), str(weights))
    out = tmp_path / "o.pt2"
    ok("fold", weights, "--model", RESNET, "--model-args", '{"num_classes": 4}', "--out", out)
    (x,) = example_inputs("resnet")
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
    assert got.shape == (2, 4)
    assert_fp32_close(got, reference(trained, x))


def test_checkpoint_dict_with_model(tmp_path: Path) -> None:
    trained = mlp(seed=3)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "model": trained.state_dict()}, ckpt)
    out = tmp_path / "o.pt2"
    ok("fold", ckpt, "--model", "normfold.models:mlp", "--out", out)
    (x,) = example_inputs("mlp")
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
    assert_fp32_close(got, reference(trained, x))


def test_pickled_module_with_trust(tmp_path: Path) -> None:
    trained = mlp(seed=4)
    whole = tmp_path / "whole.pt"
    torch.save(trained, whole)
    out = tmp_path / "o.pt2"
    ok("fold", whole, "--trust", "--input-shape", "4,64", "--out", out)
    (x,) = example_inputs("mlp")
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
    assert_fp32_close(got, reference(trained, x))


def test_inputs_file(tmp_path: Path) -> None:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    inputs, out, report = tmp_path / "x.pt", tmp_path / "o.onnx", tmp_path / "r.json"
    torch.save(x, inputs)
    ok("fold", RESNET, "--inputs", inputs, "--out", out, "--report", report)
    data = json.loads(report.read_text())
    assert data["input_shapes"] == [[3, 3, 32, 32]]
    assert data["parity"]["pytorch"]["outputs"][0]["shape"] == [3, 10]
    assert_fp32_close(run_ort(out, x), reference(resnet(), x))


def test_input_shape_and_dtype(tmp_path: Path) -> None:
    out, report = tmp_path / "o.pt2", tmp_path / "r.json"
    ok(
        "fold", "normfold.models:mlp", "--input-shape", "1x64", "--input-dtype", "float32",
        "--out", out, "--report", report,
    )  # fmt: skip
    data = json.loads(report.read_text())
    assert data["input_shapes"] == [[1, 64]]
    assert data["parity"]["pytorch"]["outputs"][0]["shape"] == [2, 10]  # batch 1 widened to 2 for parity
    assert data["parity"]["pytorch"]["outputs"][0]["dtype"] == "float32"
    # generated inputs follow the weights: another float dtype is a usage error, not torch's
    result = invoke("fold", "normfold.models:mlp", "--input-shape", "1,64", "--input-dtype", "float64",
                    "--out", tmp_path / "f64.pt2")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: --input-dtype float64 differs from the weights' float32: inputs follow the weights "
        "(omit --input-dtype)"
    )
    assert not (tmp_path / "f64.pt2").exists()
    # integer dtypes are not listed: their values must be real (token ids), so they come from --inputs
    result = invoke("fold", "normfold.models:mlp", "--input-shape", "1,64", "--input-dtype", "int64",
                    "--out", tmp_path / "i.pt2")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --input-dtype 'int64': choose one of float32, float16, bfloat16, float64 (integer inputs "
        "need real values, e.g. token ids: pass them with --inputs FILE)"
    )


@pytest.fixture
def local_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A factory spec for a module in tmp_path, importable because tmp_path is the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"nf_cli_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(channels=4):\n"
        "    model = nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), nn.ReLU())\n"
        "    with torch.no_grad():\n"
        "        model[1].running_mean.uniform_(-1, 1)\n"
        "        model[1].running_var.uniform_(0.5, 2)\n"
        "    return model.eval()\n"
    )
    yield f"{name}:build"
    sys.modules.pop(name, None)


def test_local_factory_needs_an_input_shape(tmp_path: Path, local_factory: str) -> None:
    before = listing(tmp_path)
    result = invoke("fold", local_factory, "--out", "o.pt2")
    assert result.exit_code == 2
    assert "no input shape known" in error_line(result)
    assert listing(tmp_path) == before

    ok("fold", local_factory, "--model-args", '{"channels": 6}', "--input-shape", "2,3,8,8", "--out", "o.pt2")
    with torch.no_grad():
        assert torch.export.load(tmp_path / "o.pt2").module()(torch.randn(2, 3, 8, 8)).shape == (2, 6, 6, 6)


# ------------------------------------------------------------------------------------------------
# errors: exit code, one-line message, nothing written


def _tiny_onnx(path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))


def _truncated(path: Path) -> None:
    full = path.with_name("full.pt")
    torch.save(resnet().state_dict(), full)
    path.write_bytes(full.read_bytes()[:300])


def _weights(path: Path) -> None:
    torch.save(resnet().state_dict(), path)


ErrorCase = tuple[str, Callable[[Path], None] | None, list[str], int, str]

ERROR_CASES: list[ErrorCase] = [
    # id, setup(tmp_path), args, exit code, text in the error line
    ("pickled-no-trust", lambda d: torch.save(resnet(), d / "whole.pt"),
     ["fold", "whole.pt", "--out", "o.onnx"], 3, "refused without --trust"),
    ("missing-file", None,
     ["fold", "absent.pt", "--model", RESNET, "--out", "o.onnx"], 3, "absent.pt: no such file"),
    ("truncated", lambda d: _truncated(d / "w.pt"),
     ["fold", "w.pt", "--model", RESNET, "--out", "o.onnx"], 3, "truncated or corrupt"),
    ("onnx-with-model", lambda d: _tiny_onnx(d / "model.onnx"),
     ["fold", "model.onnx", "--model", RESNET, "--out", "o.onnx"], 2, "--model does not apply to it"),
    ("text-as-input", lambda d: (d / "notes.pt").write_text("hello\n"),
     ["fold", "notes.pt", "--model", RESNET, "--out", "o.onnx"], 3, "not a readable torch.save file"),
    ("torchscript", lambda d: torch.jit.save(torch.jit.script(mlp()), str(d / "ts.pt")),
     ["fold", "ts.pt", "--out", "o.onnx"], 3, "TorchScript archive"),
    ("wrong-architecture", lambda d: torch.save(mlp().state_dict(), d / "mlp.pt"),
     ["fold", "mlp.pt", "--model", RESNET, "--out", "o.onnx"], 3, "keys are missing from the file"),
    ("unknown-factory", None,
     ["fold", "normfold.models:nope", "--out", "o.onnx"], 3, "has no attribute 'nope'"),
    ("malformed-shape", None,
     ["fold", RESNET, "--input-shape", "a,b", "--out", "o.onnx"], 2, "--input-shape 'a,b'"),
    ("bad-dtype", None,
     ["fold", RESNET, "--input-dtype", "float8", "--out", "o.onnx"], 2, "--input-dtype 'float8'"),
    ("inputs-and-shape", lambda d: torch.save(torch.ones(2, 3, 32, 32), d / "x.pt"),
     ["fold", RESNET, "--inputs", "x.pt", "--input-shape", "2,3,32,32", "--out", "o.onnx"], 2,
     "either --inputs or --input-shape"),
    ("bad-model-args", None,
     ["fold", RESNET, "--model-args", "{seed: 1}", "--out", "o.onnx"], 2, "--model-args is not valid JSON"),
    ("existing-out", lambda d: (d / "o.onnx").write_bytes(b"precious"),
     ["fold", RESNET, "--out", "o.onnx"], 2, "already exists; pass --force"),
    ("out-is-input", lambda d: _weights(d / "w.pt2"),
     ["fold", "w.pt2", "--model", RESNET, "--out", "w.pt2", "--force"], 2, "is an input of this run"),
    ("out-is-input-no-force", lambda d: _weights(d / "w.pt2"),
     ["fold", "w.pt2", "--model", RESNET, "--out", "w.pt2"], 2, "already exists"),
    ("unknown-extension", None,
     ["fold", RESNET, "--out", "o.txt"], 2, "unknown format .txt"),
    ("out-folder-missing", None,
     ["fold", RESNET, "--out", "nowhere/o.onnx"], 2, "does not exist"),
    ("weights-without-model", lambda d: _weights(d / "w.pt"),
     ["fold", "w.pt", "--out", "o.onnx"], 2, "pass the architecture with --model"),
    ("safetensors-without-model", lambda d: save_file(resnet().state_dict(), str(d / "w.safetensors")),
     ["fold", "w.safetensors", "--out", "o.onnx"], 2, "pass the architecture with --model"),
    ("report-folder-missing", None,
     ["fold", "normfold.models:mlp", "--out", "o.pt2", "--report", "nowhere/r.json"], 2,
     "--report nowhere/r.json: folder nowhere does not exist"),
    ("report-is-directory", lambda d: (d / "reports").mkdir(),
     ["fold", "normfold.models:mlp", "--out", "o.pt2", "--report", "reports"], 2, "is a directory"),
    ("inspect-report-folder-missing", None,
     ["inspect", "normfold.models:mlp", "--report", "nowhere/r.json"], 2, "folder nowhere does not exist"),
    ("parity-failure", None,
     ["fold", RESNET, "--rtol", "0", "--atol", "0", "--noise-factor", "0", "--out", "o.onnx"], 5,
     "folded model differs from the original"),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize(("setup", "args", "code", "text"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])  # fmt: skip
def test_error_exit_codes_and_nothing_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Callable[[Path], None] | None,
    args: list[str],
    code: int,
    text: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert text in error_line(result)
    assert result.stderr.strip() == error_line(result)  # the whole message is that one line
    assert result.stdout == ""
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no new file, no temporary file, nothing overwritten
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_parity_failure_premise() -> None:
    """``--rtol 0 --atol 0`` fails only because folding really changes float rounding in resnet."""
    model = resnet()
    folded = normfold.fold(model, example_inputs("resnet")).model
    (x,) = example_inputs("resnet")
    err = (reference(folded, x) - reference(model, x)).abs().max().item()
    assert 0 < err < 1e-5


def test_wrong_input_shape_is_a_trace_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("fold", RESNET, "--input-shape", "1,5,32,32", "--out", "o.onnx")
    assert result.exit_code == 4, result.output
    # captured at the parity batch (a batch of 1 is widened to 2)
    assert "could not capture ResNet on example inputs [(2, 5, 32, 32) float32]" in error_line(result)
    assert result.stdout == ""
    assert listing(tmp_path) == []


def test_wrong_input_shape_message_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("fold", RESNET, "--input-shape", "1,5,32,32", "--out", "o.onnx")
    assert result.exit_code == 4
    assert result.stderr.strip() == error_line(result)
    assert "3 channels" in error_line(result)  # the actual cause: the model wants 3 channels, got 5


def test_force_replaces_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old contents")
    ok("fold", "normfold.models:mlp", "--out", out, "--force")
    assert listing(tmp_path) == ["o.onnx"]
    assert out.read_bytes() != b"old contents"
    (x,) = example_inputs("mlp")
    assert_fp32_close(run_ort(out, x), reference(mlp(), x))


# ------------------------------------------------------------------------------------------------
# inspect and --quiet

MIXED_REASONS = {
    "bn_a": "conv_a (conv-bn)",
    "bn_shared": "shared_producer: shared (conv2d) weight shared.weight is used by 2 ops",
    "bn_nostats": "batch_statistics: bn_nostats runs without running statistics",
    "bn_after_relu": "zero_padding_forward: input of bn_after_relu comes from relu",
    "bn_two_users": "multiple_users: conv_two_users (conv2d) output has 2 users",
    "bn_seq": "wrong_axis: bn_seq normalizes axis 1",
}


def test_inspect_mixed_lists_every_norm_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = ok("inspect", "normfold.models:mixed")
    rows = {  # piped (not a terminal): one plain "norm | type | action | into / reason" line each
        norm: next((ln for ln in result.stdout.splitlines() if ln.startswith(f"{norm} | ")), "")
        for norm in MIXED_REASONS
    }
    for norm, reason in MIXED_REASONS.items():
        assert reason in rows[norm], (norm, rows[norm])
    assert " | fold | " in rows["bn_a"]
    assert all(" | keep | " in rows[n] for n in MIXED_REASONS if n != "bn_a")
    assert "1 of 6 norm ops would fold" in result.stdout
    assert listing(tmp_path) == []


def test_inspect_report(tmp_path: Path) -> None:
    report = tmp_path / "inspect.json"
    ok("inspect", "normfold.models:mixed", "--report", report, "--quiet")
    assert listing(tmp_path) == ["inspect.json"]
    data = json.loads(report.read_text())
    assert [f["norm"] for f in data["folded"]] == ["bn_a"]
    assert {s["norm"] for s in data["skipped"]} == set(MIXED_REASONS) - {"bn_a"}
    assert (data["command"], data["status"], data["summary"]["folded"], data["summary"]["kept"]) == (
        "inspect",
        "ok",
        1,
        5,
    )
    assert data["parity"] == {"pytorch": None}
    assert data["export"] is None
    assert data["input_shapes"] == [list(ZOO["mixed"].input_shape)]


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.pt2"
    result = ok("fold", "normfold.models:mlp", "--out", out, "--quiet")
    assert result.output == ""
    assert out.is_file()


def test_not_quiet_prints_layers_parity_and_summary(tmp_path: Path) -> None:
    result = ok("fold", "normfold.models:mlp", "--out", tmp_path / "o.pt2")
    assert "Norm layers of factory normfold.models:mlp" in result.stdout
    assert "folded 2 of 2 norm ops" in result.stdout
    assert "torch.export" in result.stdout and "pass" in result.stdout


@pytest.mark.parametrize("name", sorted(ZOO_SHOWS))
def test_inspect_shows_each_zoo_pattern(name: str) -> None:
    result = ok("inspect", f"normfold.models:{name}")
    for norm, pattern, _ in ZOO_SHOWS[name]:
        row = next(ln for ln in result.stdout.splitlines() if ln.startswith(f"{norm} | "))
        assert f"({pattern})" in row, row


# ------------------------------------------------------------------------------------------------
# recalibrate


def _calibration_batches(path: Path, n: int = 3) -> Path:
    g = torch.Generator().manual_seed(11)
    torch.save([torch.randn(4, 3, 32, 32, generator=g) * 1.5 + 0.2 for _ in range(n)], path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_recalibrate_writes_a_state_dict_that_loads_into_the_architecture(
    tmp_path: Path, suffix: str
) -> None:
    data, out, report = (
        _calibration_batches(tmp_path / "batches.pt"),
        tmp_path / f"r{suffix}",
        tmp_path / "r.json",
    )
    result = ok("recalibrate", RESNET, "--data", data, "--out", out, "--report", report)
    assert "recalibrated 8 norms in" in result.stdout
    assert listing(tmp_path) == sorted(["batches.pt", out.name, "r.json"])
    expected = normfold.recalibrate(resnet(), torch.load(data)).model.state_dict()
    fresh = resnet(seed=5)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        fresh.load_state_dict(load_file(str(out)))
    else:
        fresh.load_state_dict(torch.load(out, weights_only=True))
    for key, value in expected.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    data_json = json.loads(report.read_text())
    assert (
        data_json["passes"] == len({n["level"] for n in data_json["norms"]}) and len(data_json["norms"]) == 8
    )


def test_recalibrate_refuses_an_unknown_format_and_a_bad_data_file(tmp_path: Path) -> None:
    bad = invoke("recalibrate", RESNET, "--data", tmp_path / "none.pt", "--out", tmp_path / "o.onnx")
    assert bad.exit_code == 2 and "use .pt or .pth or .safetensors" in bad.output
    (tmp_path / "dict.pt").write_bytes(b"")
    torch.save({"x": torch.zeros(1)}, tmp_path / "dict.pt")
    bad = invoke("recalibrate", RESNET, "--data", tmp_path / "dict.pt", "--out", tmp_path / "o.pt")
    assert bad.exit_code == 3 and "expected a list of batches" in bad.output
    assert not (tmp_path / "o.pt").exists()


def test_fold_with_calibrate_recalibrates_then_folds(tmp_path: Path) -> None:
    data, out, report = _calibration_batches(tmp_path / "b.pt"), tmp_path / "o.onnx", tmp_path / "r.json"
    ok("fold", RESNET, "--calibrate", data, "--out", out, "--report", report)
    recalibrated = normfold.recalibrate(resnet(), torch.load(data)).model
    (x,) = example_inputs("resnet")
    assert_fp32_close(run_ort(out, x), reference(recalibrated, x))
    assert not torch.allclose(run_ort(out, x), reference(resnet(), x), atol=1e-3)  # statistics changed
    data_json = json.loads(report.read_text())
    assert len(data_json["recalibration"]["norms"]) == 8 and "recalibrate" in data_json["timings_s"]


# ------------------------------------------------------------------------------------------------
# drop-bias


@pytest.mark.parametrize("suffix", [".safetensors", ".pt2"])
def test_drop_bias_writes_a_model_without_redundant_biases(tmp_path: Path, suffix: str) -> None:
    out, report = tmp_path / f"o{suffix}", tmp_path / "r.json"
    result = ok("drop-bias", "normfold.models:mlp", "--out", out, "--report", report)
    assert "dropped 1 biases, 64 parameters" in result.stdout  # fc2 (64 outputs) -> bn2; fc1 has none
    data = json.loads(report.read_text())
    assert [(d["layer"], d["norm"]) for d in data["dropped"]] == [("fc2", "bn2")]
    assert [(k["layer"], k["code"]) for k in data["kept"]] == [("fc1", "no_bias")]
    (x,) = example_inputs("mlp")
    if suffix == ".pt2":
        with torch.no_grad():
            got = torch.export.load(out).module()(x)
    else:
        from safetensors.torch import load_file

        state = load_file(str(out))
        assert "fc2.bias" not in state and "fc2.weight" in state
        rebuilt = normfold.drop_redundant_biases(mlp(), (x,)).model
        rebuilt.load_state_dict(state)
        got = reference(rebuilt, x)
    assert_fp32_close(got, reference(mlp(), x))


# ------------------------------------------------------------------------------------------------
# swap


@pytest.mark.parametrize("to", ["group", "layer", "frozen"])
def test_swap_writes_a_state_dict_that_loads_into_the_swapped_architecture(tmp_path: Path, to: str) -> None:
    out, report = tmp_path / "o.pt", tmp_path / "r.json"
    result = ok("swap", RESNET, "--to", to, "--out", out, "--report", report)
    assert f"swapped 8 norms to {to}" in result.stdout
    data = json.loads(report.read_text())
    assert data["to"] == to and len(data["swapped"]) == 8
    (x,) = example_inputs("resnet")
    expected = normfold.swap_norms(resnet(), to, example_inputs=(x,)).model
    rebuilt = normfold.swap_norms(resnet(seed=7), to).model
    rebuilt.load_state_dict(torch.load(out, weights_only=True))
    assert torch.equal(reference(rebuilt, x), reference(expected, x))


def test_swap_with_an_impossible_group_count_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("swap", RESNET, "--to", "group", "--num-groups", "5", "--out", tmp_path / "o.pt")
    assert result.exit_code == 2, result.output
    assert "bn1" in error_line(result) and "16" in error_line(result)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (RuntimeError("boom\nsecond line"), 1,
         "error: internal error: RuntimeError: boom (a bug: please report it with the output of --debug)"),
        (MemoryError(), 1, "error: out of memory; nothing was written (try smaller --input-shape)"),
        (KeyboardInterrupt(), 130, "error: interrupted; nothing was written"),
    ],
    ids=["internal", "memory", "interrupt"],
)  # fmt: skip
def test_unexpected_errors_are_one_line_without_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int, line: str
) -> None:
    from normfold import pipeline

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "fold_and_export", fail)
    result = invoke("fold", RESNET, "--out", "o.onnx")
    assert (result.exit_code, result.stderr.strip()) == (code, line)
    if code == 1:
        debug = invoke("--debug", "fold", RESNET, "--out", "o.onnx")
        assert debug.exception is error  # --debug lets the traceback through
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fold", "drop-bias"])
def test_how_the_model_was_taken_is_shown_and_reported(tmp_path: Path, command: str) -> None:
    """An fp16 state dict keeps its dtype (fp16 ONNX), and the CLI and the report say so."""
    weights, out, report = tmp_path / "w16.pt", tmp_path / "o.onnx", tmp_path / "r.json"
    state = resnet().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, weights)
    result = ok(command, weights, "--model", RESNET, "--input-shape", "2,3,32,32", "--out", out,
                "--report", report)  # fmt: skip
    note = f"the weights in {weights} are float16: {RESNET} (float32) was cast to float16 to keep them"
    assert f"note: {note}" in result.stdout
    assert note in json.loads(report.read_text())["notes"]
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


# ------------------------------------------------------------------------------------------------
# what a run says: exit codes, the before/after summary, --require-all, reports on failure


_WARNING_MODEL = """
import logging, warnings
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.upsample(self.bn(self.conv(x)), scale_factor=2)  # torch: a deprecation UserWarning


def build():
    warnings.warn("factory: a UserWarning", UserWarning)
    warnings.warn("factory: a DeprecationWarning", DeprecationWarning)
    logging.getLogger("torch.fx").warning("torch logger: a warning")  # torch's own stderr handler
    net = Net()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    return net
"""


def test_third_party_warnings_never_reach_stderr(tmp_path: Path) -> None:
    """Warnings and log records from torch and the model's code: nothing on stderr after a run
    that succeeds, exactly the one error line after one that fails; --debug shows them."""
    (tmp_path / "warny.py").write_text(_WARNING_MODEL)
    normfold_cli = str(Path(sys.executable).with_name("normfold"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [normfold_cli, *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    done = run("fold", "warny:build", "--input-shape", "2,3,8,8", "--out", "w.onnx")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines()[-1].startswith("normfold: ok folded=1/1")
    failed = run("fold", "warny:build", "--input-shape", "2,5,8,8", "--out", "x.onnx")
    assert failed.returncode == 4, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert line.startswith("error: ")
    debug = run("--debug", "inspect", "warny:build", "--input-shape", "2,3,8,8")
    assert debug.returncode == 0
    for said in ("factory: a UserWarning", "torch logger: a warning"):
        assert said in debug.stderr, debug.stderr


def test_exit_codes_are_one_table_in_help_docstring_and_readme() -> None:
    from normfold.cli import app as cli

    from normfold import errors

    table = cli.exit_codes_markdown()
    assert table in (Path(__file__).parents[2] / "README.md").read_text()
    help_text = " ".join(ok("--help").stdout.split())  # rich wraps the paragraph
    for code, what, _ in cli.EXIT_CODES:
        assert f"{code} {what}" in help_text
        assert f"* {code}: {what}" in cli.__doc__
    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)
             and hasattr(c, "exit_code")}  # fmt: skip
    assert {str(c) for c in codes} <= {code for code, _, _ in cli.EXIT_CODES}
    assert errors.NotFoldedError.exit_code == 7


def test_fold_prints_before_after_summary_and_a_result_line(tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    lines = ok("fold", RESNET, "--out", out).stdout.splitlines()
    assert "op | original | folded | written (onnx)" in lines
    assert "BatchNormalization | 8 | 0 | 0" in lines and "Conv | 8 | 8 | 8" in lines
    assert "inputs: x float [batch, 3, 32, 32]" in lines
    assert "outputs: output float [batch, 10]" in lines  # the default output name
    wrote = [ln for ln in lines if ln.startswith(f"wrote {out} (onnx, ")]
    assert len(wrote) == 1 and re.search(r", opset 20, IR version \d+\)$", wrote[0])
    assert (
        "normfold folded 8 of 8 norm ops; none kept; the ONNX exporter removed no BatchNormalization "
        "on its own" in lines
    )
    assert lines[-1] == (
        f"normfold: ok folded=8/8 kept=0 exporter_removed_bn=0 parity=pass(pytorch,onnxruntime-cpu) out={out}"
    )


FORGED = "\nnormfold: ok folded=8/8 kept=0 parity=pass(pytorch,onnxruntime-cpu) out=x.onnx\x1b[1A\r"


def test_a_name_from_a_file_cannot_forge_an_output_line(tmp_path: Path) -> None:
    """Log injection: a state-dict key holding a newline, a carriage return and a terminal escape
    is shown escaped in the one error line; no line of the run says ``normfold: ok``."""
    weights = tmp_path / "w.pt"
    torch.save(mlp().state_dict() | {f"x{FORGED}": torch.ones(1)}, weights)
    result = invoke("fold", weights, "--model", "normfold.models:mlp", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "\\nnormfold: ok folded=8/8" in line and "\\x1b[1A\\r" in line
    assert line.isprintable()
    assert not any(ln.startswith("normfold: ok") for ln in result.output.splitlines())


def test_file_names_are_printed_escaped(tmp_path: Path) -> None:
    """A file name with a newline (legal on Linux) is written, and every line naming it is one
    line: the last line is the real result line, with the name escaped."""
    out = tmp_path / "m\nnormfold: ok folded=8 kept=0 out=x.onnx\x1b[1A\r.onnx"  # no "/" in a name
    lines = ok("fold", "normfold.models:mlp", "--out", out).stdout.splitlines()
    assert out.exists()
    assert all(ln.isprintable() for ln in lines)
    assert [ln for ln in lines if ln.startswith("normfold: ok")] == [lines[-1]]
    assert lines[-1].endswith("m\\nnormfold: ok folded=8 kept=0 out=x.onnx\\x1b[1A\\r.onnx")


def test_require_all_exits_7_listing_every_kept_norm_and_writes_only_the_report(tmp_path: Path) -> None:
    out, report, saved = tmp_path / "m.onnx", tmp_path / "m.json", tmp_path / "in.pt"
    args = ("fold", "normfold.models:mixed", "--out", out, "--report", report, "--save-inputs", saved)
    result = invoke(*args, "--require-all")
    assert result.exit_code == 7
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 5 of 6 norm ops stay, and every one was required to fold:"
    kept = {ln.split(":")[0].strip(): ln for ln in lines[1:]}
    assert set(kept) == set(MIXED_REASONS) - {"bn_a"}
    for norm, reason in MIXED_REASONS.items():
        if norm != "bn_a":
            assert reason in kept[norm], kept[norm]
    assert listing(tmp_path) == ["in.pt", "m.json"]  # no model; the report and inputs to reproduce it
    data = json.loads(report.read_text())
    assert (data["status"], data["command"], data["schema_version"]) == ("failed", "fold", 2)
    assert data["failure"]["step"] == "require all"
    assert (data["failure"]["error"], data["failure"]["exit_code"]) == ("NotFoldedError", 7)
    assert data["failure"]["message"] == "\n".join(line.removeprefix("error: ") for line in lines)
    assert data["options"]["folding"]["require_all"] is True and data["seed"] == 0
    assert {s["norm"] for s in data["skipped"]} == set(kept)
    sets = torch.load(saved, weights_only=True)
    assert list(sets) == ["normal", "uniform[0,255]"] and sets["normal"][0].shape == (2, 8, 8, 8)
    # without the flag the same model folds what it can and exits 0
    result = ok(*args[:2], "--out", out)
    assert result.stdout.splitlines()[-1].startswith("normfold: ok folded=1/6 kept=5 ")


def test_inspect_require_all() -> None:
    assert invoke("inspect", "normfold.models:mixed", "--require-all").exit_code == 7
    assert ok("inspect", RESNET, "--require-all").stdout.splitlines()[-1] == (
        "normfold: ok folded=8/8 kept=0 out=none"
    )


def test_a_parity_failure_writes_its_report_with_error_statistics(tmp_path: Path) -> None:
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    args = ("--rtol", "0", "--atol", "0", "--noise-factor", "0")  # nothing but exact equality passes
    result = invoke("fold", RESNET, "--out", out, "--report", report, *args)
    assert result.exit_code == 5
    assert listing(tmp_path) == ["r.json"]
    data = json.loads(report.read_text())
    assert data["status"] == "failed" and data["failure"]["step"] == "verify (pytorch)"
    assert data["failure"]["message"] == error_line(result).removeprefix("error: ")
    assert data["options"]["rule"]["noise_factor"] == 0.0
    (worst, *_) = sorted(data["parity"]["pytorch"]["outputs"], key=lambda o: -o["max_abs_error"])
    assert worst["passed"] is False
    assert len(worst["max_abs_error_at"]) == 2 and worst["max_abs_error_at"][0] < worst["shape"][0]
    assert 0 < worst["p99_abs_error"] <= worst["max_abs_error"]
    assert worst["mean_abs_error"] <= worst["max_abs_error"]
    assert data["started"].endswith("+00:00") and data["versions"]["torch"] == version("torch")


def test_debug_prints_the_traceback_of_a_failure(tmp_path: Path) -> None:
    result = invoke("--debug", "fold", "normfold.models:mixed", "--out", tmp_path / "m.onnx", "--require-all")
    assert result.exit_code == 7
    assert "Traceback (most recent call last)" in result.stderr
    assert "NotFoldedError" in result.stderr


def test_exporter_errors_are_cleaned_and_name_the_op() -> None:
    from normfold.io.export import _exporter_failure

    class Eig(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x).real

    program = torch.export.export(Eig(), (torch.randn(2, 3, 3),))
    with pytest.raises(Exception) as exc:
        torch.onnx.export(program, (torch.randn(2, 3, 3),), dynamo=True, verbose=False)
    assert "\x1b[" in str(exc.value)  # the exporter's own message has terminal escape codes
    message = _exporter_failure(exc.value)
    assert "\x1b" not in message
    assert message.startswith(
        " at aten.linalg_eig.default (node linalg_eig): DispatchError: No ONNX function"
    )


# ------------------------------------------------------------------------------------------------
# shapes: names, several inputs, dynamic axes


def test_two_inputs_by_name_and_a_named_dynamic_axis(tmp_path: Path) -> None:
    out, report = tmp_path / "t.onnx", tmp_path / "t.json"
    result = ok(
        "fold", "normfold.models:two_tower", "--input-shape", "features:1,12", "--input-shape",
        "image:1,3,20,20", "--dynamic", "image:2=height,3=width", "--out", out, "--report", report,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "inputs: image float [batch, 3, height, width], features float [batch, 12]" in lines
    data = json.loads(report.read_text())
    assert data["input_shapes"] == [[1, 3, 20, 20], [1, 12]]  # put in the forward's order
    sets = {o["inputs"] for o in data["parity"]["onnxruntime-cpu"]["outputs"]}
    assert "resized[batch=3,height=40,width=40]" in sets  # checked at a second size, in onnxruntime too
    model = ZOO["two_tower"].factory()
    for size in (17, 33):
        xs = (torch.randn(3, 3, size, size + 5), torch.randn(3, 12))
        assert_fp32_close(run_ort(out, *xs), reference(model, *xs))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "1,3,24,24"],
         "factory normfold.models:two_tower's forward(image, features) takes 2 input(s), got 1 "
         "--input-shape: give one shape per input, in order or by argument name"),
        (["--input-shape", "img:1,3,24,24", "--input-shape", "features:1,12"],
         "--input-shape names img: factory normfold.models:two_tower's forward(image, features) has no such "
         "argument"),
        (["--input-shape", "image:1,3,24,24"],
         "--input-shape: factory normfold.models:two_tower's forward(image, features) needs a shape for "
         "features too"),
        (["--input-shape", "image:1,3,24,24", "--input-shape", "1,12"],
         "--input-shape: name every shape (name:1,3,224,224) or none of them"),
        (["--input-shape", "1,3,,24"],
         "--input-shape '1,3,,24': dimension 3 is empty (expected comma-separated positive integers like "
         "1,3,224,224)"),
        (["--dynamic", "2:height"],
         "--dynamic '2:height': expected [INPUT:]AXIS=NAME,... like 2=height,3=width or image:2=height"),
        (["--dynamic", "features:1=width"],  # the Linear fixes the feature axis
         "--dynamic width (input 1, axis 1): the model fails at sizes 24 and 13, so the axis cannot vary"),
    ],
)  # fmt: skip
def test_shape_and_dynamic_errors_name_the_fix(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("fold", "normfold.models:two_tower", "--out", tmp_path / "t.onnx", *args)
    assert result.exit_code == 2, result.output
    assert error_line(result) == f"error: {message}"
    assert listing(tmp_path) == []


def test_usage_errors_come_before_torch_is_imported(tmp_path: Path) -> None:
    """A typo is answered at once: the options are checked before torch (or onnx) is imported."""
    (tmp_path / "exists.onnx").write_bytes(b"x")
    commands = [
        ["fold", "m.pt", "--out", "o.onnx", "--input-shape", "1,,3"],
        ["fold", "m.pt", "--out", "o.onnx", "--value-range", "5,1"],
        ["fold", "m.pt", "--out", "o.onnx", "--model-args", "{x"],
        ["fold", "m.pt", "--out", "o.onx"],
        ["fold", "m.pt", "--out", tmp_path / "exists.onnx"],
        ["inspect", "m.pt", "--dynamic", "x"],
    ]
    _, runs = invoke_fresh(commands, timeout=120)
    for args, run in zip(commands, runs, strict=True):
        assert (run.exit_code, run.heavy) == (2, []), (args, run.stdout, run.stderr)


def test_piped_output_at_80_columns_never_splits_a_cell() -> None:
    result = invoke("inspect", "normfold.models:mixed", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    rows = [ln for ln in lines if ln.split(" | ")[0] in MIXED_REASONS]
    assert len(rows) == len(MIXED_REASONS)
    assert all(len(row.split(" | ")) == 4 for row in rows)  # every row whole on its line
    long = next(r for r in rows if r.startswith("bn_shared | "))
    assert len(long) > 80 and MIXED_REASONS["bn_shared"] in long
    assert not any(c in result.stdout for c in "│─╭")  # no box drawing in a log


def test_help_shows_metavars_defaults_and_examples() -> None:
    text = ok("fold", "--help").stdout
    assert "<list[str]>" not in text and "<bool>" not in text and "--trust " in text  # flags: no type tag
    for piece in ("[NAME:]SHAPE", "[default: 4.0]", "Examples:", "timm:create_model", "--require-all"):
        assert piece in text, piece
    assert "Examples:" in ok("inspect", "--help").stdout


# reparameterization


def test_inspect_merges_repvgg_blocks_by_default_and_not_with_no_reparam(tmp_path: Path) -> None:
    merged = ok("inspect", "normfold.models:repvgg", "--report", tmp_path / "a.json")
    assert "Parallel branches (reparameterization)" in merged.stdout
    branches = " + ".join(
        ["stages.1.rbr_dense.0 (conv 3x3)", "stages.1.rbr_1x1.0 (conv 1x1)", "stages.1.rbr_identity (norm)"]
    )
    assert f"stages.1 | {branches} | merge | stages.1.rbr_dense.0" in merged.stdout
    assert merged.stdout.strip().splitlines()[-1].startswith("normfold: ok folded=13/13 kept=0 merged=5/5 ")
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["summary"]["blocks_merged"] == 5 and data["options"]["folding"]["reparameterize"] is True
    assert [m["where"] for m in data["merged"]] == ["both"] * 5

    plain = ok("inspect", "normfold.models:repvgg", "--no-reparam")
    assert "Parallel branches" not in plain.stdout
    assert plain.stdout.strip().splitlines()[-1].startswith("normfold: ok folded=10/13 kept=3 ")
    assert "stages.1.rbr_identity | BatchNorm2d | keep | multiple_users" in plain.stdout
