"""``normfold fold model.onnx`` and ``normfold inspect model.onnx``: an ONNX model in, an ONNX model
out, with the PyTorch path's report, exit codes, file rules, ``--require-all`` and JSON report;
options that need a PyTorch model refused by name, before torch is imported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_rows as rows
import onnxruntime as ort
import pytest
import torch
from helpers import invoke, invoke_fresh, ok


def _two_norms() -> onnx.ModelProto:
    """conv1 -> bn1 -> relu -> conv2 -> bn2, whose conv output also feeds the residual Add: bn1
    folds, bn2 stays (``multiple_users``), and so does the sum ``bn2(conv2(r)) + conv2(r)`` as a block
    (bn2 stays on its conv branch: merged=0/1, as on the PyTorch path)."""
    b = rows.Builder(21)
    r = b.node("Relu", [b.bn(b.conv("x", 3, 6, "conv1"), 6, "bn1")], "r")
    c2 = b.conv(r, 6, 6, "conv2")
    b.node("Add", [b.bn(c2, 6, "bn2"), c2], "y")
    return b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 6, 8, 8])])


def _bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no refolding in ORT
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    onnx.save(_two_norms(), "m.onnx")
    return tmp_path / "m.onnx"


def test_fold_writes_fewer_batchnorms_matching_the_original(model: Path) -> None:
    result = ok("fold", "m.onnx", "--out", "f.onnx", "--report", "r.json")
    out = model.parent / "f.onnx"
    assert (_bn_count(model), _bn_count(out)) == (2, 1)
    x = np.random.default_rng(0).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)
    ref, got = _run(model, x), _run(out, x)
    assert np.abs(got - ref).max() <= 1e-6 + 1e-5 * np.abs(ref).max()
    folded = onnx.load(str(out))
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # input shapes kept
    lines = result.stdout.splitlines()
    assert "bn1 | BatchNormalization | fold | conv1_conv (conv-bn)" in lines
    assert "bn2 | BatchNormalization | keep | multiple_users: conv2_conv (Conv) output has 2 users" in lines
    assert "normfold folded 1 of 2 norm ops; 1 kept (reasons above)" in lines
    assert lines[-1] == "normfold: ok folded=1/2 kept=1 merged=0/1 parity=pass(onnxruntime) out=f.onnx"
    assert result.stderr == ""


def test_the_json_report_has_the_fold_reports_keys(model: Path) -> None:
    ok("fold", "m.onnx", "--out", "f.onnx", "--report", "r.json", "--input-shape", "x:3,3,8,8", "-q")
    report = json.loads((model.parent / "r.json").read_text())
    for key in ("schema_version", "command", "status", "options", "source", "summary", "folded", "skipped",
                "notes", "parity", "export", "timings_s", "elapsed_s", "versions"):  # fmt: skip
        assert key in report, key
    assert (report["command"], report["status"], report["source"]) == ("fold", "ok", "m.onnx")
    summary = report["summary"]
    assert {k: summary[k] for k in ("norms", "folded", "kept", "batchnorms_left")} == {
        "norms": 2, "folded": 1, "kept": 1, "batchnorms_left": 1
    }  # fmt: skip
    assert summary["ops_original"]["BatchNormalization"] == 2
    assert summary["params_after"] == summary["params_before"] - 4 * 6  # bn1's four vectors gone
    folded = [(f["norm"], f["into"], f["pattern"]) for f in report["folded"]]
    assert folded == [("bn1", "conv1_conv", "conv-bn")]
    assert [(s["norm"], s["code"]) for s in report["skipped"]] == [("bn2", "multiple_users")]
    assert report["input_shapes"] == {"x": [3, 3, 8, 8]}  # --input-shape sized the symbolic batch
    parity = report["parity"]["onnxruntime"]
    assert parity["passed"] and {o["inputs"] for o in parity["outputs"]} == {"normal", "uniform[0,255]"}
    assert report["export"]["batchnorm_nodes"] == 1 and report["export"]["path"] == "f.onnx"
    assert report["options"]["spec"]["shapes"] == {"x": [3, 3, 8, 8]}


def test_inputs_file_feeds_the_parity_check(model: Path) -> None:
    torch.save(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)), "x.pt")
    ok("fold", "m.onnx", "--inputs", "x.pt", "--out", "f.onnx", "--report", "r.json", "-q")
    report = json.loads((model.parent / "r.json").read_text())
    sets = {o["inputs"] for o in report["parity"]["onnxruntime"]["outputs"]}
    assert sets == {"given", "normal", "uniform[0,255]"}
    assert report["input_shapes"] == {"x": [2, 3, 8, 8]}


def test_inspect_writes_nothing_but_its_report(model: Path) -> None:
    before = _files(model.parent)
    result = ok("inspect", "m.onnx")
    assert _files(model.parent) == before
    lines = result.stdout.splitlines()
    assert "bn1 | BatchNormalization | fold | conv1_conv (conv-bn)" in lines
    assert "1 of 2 norm ops would fold" in lines
    assert lines[-1] == "normfold: ok folded=1/2 kept=1 merged=0/1 out=none"
    ok("inspect", "m.onnx", "--report", "r.json")
    assert _files(model.parent) == sorted([*before, "r.json"])
    report = json.loads((model.parent / "r.json").read_text())
    assert (report["command"], report["status"]) == ("inspect", "ok")
    assert (report["parity"], report["export"]) == ({}, None)  # nothing run, nothing written
    assert report["ops_after"] == {} and report["summary"]["folded"] == 1


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_require_all_exits_7_naming_the_norm_kept(model: Path, command: str) -> None:
    before = _files(model.parent)
    args = ["--out", "f.onnx"] if command == "fold" else []
    result = invoke(command, "m.onnx", *args, "--require-all", "--report", "r.json")
    assert result.exit_code == 7, result.output
    assert result.stderr.splitlines() == [
        "error: 1 of 2 norm ops stay, and every one was required to fold:",
        "  bn2: multiple_users: conv2_conv (Conv) output has 2 users",
    ]
    assert _files(model.parent) == sorted([*before, "r.json"])  # no model written
    report = json.loads((model.parent / "r.json").read_text())
    assert report["status"] == "failed"
    assert (report["failure"]["step"], report["failure"]["exit_code"]) == ("require all", 7)


def test_a_parity_failure_exits_5_writing_only_its_report(model: Path) -> None:
    """No tolerance at all: the folded weights' own float32 rounding fails the rule, as any fold would."""
    before = _files(model.parent)
    args = ("--rtol", "0", "--atol", "0", "--noise-factor", "0", "--report", "r.json")
    result = invoke("fold", "m.onnx", "--out", "f.onnx", *args)
    assert result.exit_code == 5, result.output
    assert result.stderr.startswith("error: the folded model differs from the original model: output['y']")
    assert _files(model.parent) == sorted([*before, "r.json"])
    report = json.loads((model.parent / "r.json").read_text())
    assert (report["status"], report["failure"]["step"]) == ("failed", "fold and verify (onnxruntime)")
    assert report["parity"]["onnxruntime"]["passed"] is False
    assert [f["norm"] for f in report["folded"]] == ["bn1"]


def test_existing_out_needs_force(model: Path) -> None:
    (model.parent / "f.onnx").write_bytes(b"precious")
    result = invoke("fold", "m.onnx", "--out", "f.onnx")
    assert result.exit_code == 2 and "f.onnx already exists; pass --force" in result.stderr
    assert (model.parent / "f.onnx").read_bytes() == b"precious"
    ok("fold", "m.onnx", "--out", "f.onnx", "--force", "-q")
    assert _bn_count(model.parent / "f.onnx") == 1


def test_an_onnx_file_under_another_name_is_told_by_its_bytes(model: Path) -> None:
    model.rename(model.parent / "m.bin")
    result = ok("fold", "m.bin", "--out", "f.onnx", "-q")
    assert result.stdout == "" and _bn_count(model.parent / "f.onnx") == 1


#: (args, exit code, the whole error line after "error: ")
REFUSED = [
    (["fold", "m.onnx", "--model", "normfold.models:mlp", "--out", "o.onnx"], 2,
     "m.onnx is an ONNX model: --model does not apply to it (the graph is its own architecture)"),
    (["fold", "m.onnx", "--opset", "18", "--out", "o.onnx"], 2,
     "m.onnx is an ONNX model: --opset does not apply to it (the folded file keeps the original's opset "
     "imports)"),
    (["inspect", "m.onnx", "--dynamic", "2=height"], 2,
     "m.onnx is an ONNX model: --dynamic does not apply to it (the folded file keeps the original's input "
     "shapes; give sizes to symbolic dims with --input-shape)"),
    (["fold", "m.onnx", "--input-dtype", "float16", "--out", "o.onnx"], 2,
     "m.onnx is an ONNX model: --input-dtype does not apply to it (the graph declares its inputs' types)"),
    (["fold", "m.onnx", "--trust", "--out", "o.onnx"], 2,
     "m.onnx is an ONNX model: --trust does not apply to it (an ONNX file is data, read without running code "
     "from it)"),
    (["fold", "m.onnx", "--calibrate", "b.pt", "--out", "o.onnx"], 2,
     "m.onnx is an ONNX model: --calibrate does not apply to it (recalibrating BatchNorm statistics needs "
     "the PyTorch model)"),
    (["fold", "m.onnx", "--out", "o.pt2"], 2, "--out o.pt2: unknown format .pt2; use .onnx"),
    (["fold", "m.onnx", "--out", "o.onnx", "--lower-kept", "mul"], 2,
     "--lower-kept must be 'mul-add' or 'conv', got 'mul'"),
    (["fold", "m.onnx", "--out", "o.onnx", "--save-inputs", "s.npz"], 2,
     "--save-inputs s.npz: unknown format .npz; use .pt"),
    (["fold", "absent.onnx", "--out", "o.onnx"], 3, "absent.onnx: no such ONNX file"),
    (["inspect", "a_folder.onnx"], 3, "a_folder.onnx: not a file but a directory; pass a regular file"),
]  # fmt: skip


def test_options_that_need_a_pytorch_model_and_missing_files_fail_before_torch_loads(model: Path) -> None:
    (model.parent / "a_folder.onnx").mkdir()
    before = _files(model.parent)
    on_import, runs = invoke_fresh([args for args, *_ in REFUSED], cwd=model.parent)
    assert on_import == []
    for (args, code, message), run in zip(REFUSED, runs, strict=True):
        assert (run.exit_code, run.heavy, run.stdout) == (code, [], ""), (args, run.stderr)
        assert run.stderr == f"error: {message}\n", args
    assert _files(model.parent) == before


def test_a_file_named_onnx_that_is_not_onnx_is_a_load_error(model: Path) -> None:
    (model.parent / "notes.onnx").write_text("hello\n")
    result = invoke("fold", "notes.onnx", "--out", "o.onnx")
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        "error: notes.onnx is not an ONNX model: its first bytes are not those of an ONNX protobuf\n"
    )


def test_an_input_shape_the_graph_cannot_take_is_a_usage_error(model: Path) -> None:
    result = invoke("fold", "m.onnx", "--input-shape", "2,4,8,8", "--out", "o.onnx")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: --input-shape gives x the shape [2, 4, 8, 8]; the graph declares x [N, 3, 8, 8]\n"
    )
    assert not (model.parent / "o.onnx").exists()


@pytest.mark.parametrize(("form", "op"), [("mul-add", "Mul"), ("conv", "Conv")])
def test_lower_kept_writes_no_batchnorm_left(model: Path, form: str, op: str) -> None:
    result = ok("fold", "m.onnx", "--out", "f.onnx", "--lower-kept", form, "--report", "r.json")
    out = model.parent / "f.onnx"
    assert (_bn_count(model), _bn_count(out)) == (2, 0)  # bn1 folded, bn2 kept and lowered
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count(op) == [n.op_type for n in onnx.load(str(model)).graph.node].count(op) + 1
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    ref, got = _run(model, x), _run(out, x)
    assert np.abs(got - ref).max() <= 1e-6 + 1e-5 * np.abs(ref).max()
    into = "Mul+Add" if form == "mul-add" else "Conv"
    assert f"lowered 1 kept BatchNormalization(s) to {into}; none left in the file" in result.stdout
    report = json.loads((model.parent / "r.json").read_text())
    assert report["lowered"] == [{"node": "bn2", "into": into}]
    assert report["export"]["lowered"] == [{"node": "bn2", "into": into}]


def test_save_inputs_writes_the_parity_sets_also_when_parity_fails(model: Path) -> None:
    ok("fold", "m.onnx", "--out", "f.onnx", "--save-inputs", "s.pt")
    sets = torch.load(model.parent / "s.pt", weights_only=True)
    assert list(sets) == ["normal", "uniform[0,255]"]
    assert [t.shape for t in sets["normal"]] == [(2, 3, 8, 8)]  # the symbolic batch at its default, 2
    assert sets["uniform[0,255]"][0].dtype == torch.float32 and float(sets["uniform[0,255]"][0].min()) >= 0
    x = sets["normal"][0].numpy()
    ref = _run(model, x)
    assert np.abs(_run(model.parent / "f.onnx", x) - ref).max() <= 1e-5 * np.abs(ref).max()

    zero = ("--rtol", "0", "--atol", "0", "--noise-factor", "0")  # any fold's own rounding fails
    failed = invoke("fold", "m.onnx", "--out", "g.onnx", "--save-inputs", "t.pt", *zero)
    assert failed.exit_code == 5, failed.output
    assert not (model.parent / "g.onnx").exists()
    assert list(torch.load(model.parent / "t.pt", weights_only=True)) == ["normal", "uniform[0,255]"]


def test_providers_check_the_folded_file_on_each(model: Path) -> None:
    ok("fold", "m.onnx", "--out", "f.onnx", "--providers", "CPUExecutionProvider,AzureExecutionProvider",
       "--report", "r.json")  # fmt: skip
    report = json.loads((model.parent / "r.json").read_text())
    outputs = report["parity"]["onnxruntime"]["outputs"]
    assert sorted({o["name"].split(":")[0] for o in outputs}) == ["onnxruntime-azure", "onnxruntime-cpu"]
    assert report["parity"]["onnxruntime"]["passed"] is True


def test_parallel_branches_are_merged_unless_no_reparam(model: Path) -> None:
    onnx.save(rows.repvgg_block(), model.parent / "rep.onnx")
    result = ok("fold", "rep.onnx", "--out", "f.onnx", "--report", "r.json")
    assert "Parallel branches (reparameterization)" in result.stdout
    assert "merged=1/1" in result.stdout.splitlines()[-1]
    ops = [n.op_type for n in onnx.load(str(model.parent / "f.onnx")).graph.node]
    assert sorted(ops) == ["Conv", "Relu"]
    report = json.loads((model.parent / "r.json").read_text())
    assert report["summary"]["blocks_merged"] == 1 and report["merged"][0]["into"] == "conv_a"
    plain = ok("fold", "rep.onnx", "--out", "g.onnx", "--no-reparam")
    assert "merged=" not in plain.stdout.splitlines()[-1]
    assert _bn_count(model.parent / "g.onnx") == 1  # the identity branch's norm stays
