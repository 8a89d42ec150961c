"""A hostile-input corpus, generated into tmp_path (no binary fixtures): every file or option
below ends in its documented exit code with one line of message and no traceback, no code from a
file runs without --trust, and nothing big is allocated before a limit is checked.

Exit codes (README): 2 usage error, 3 load error.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from normfold.cli.app import app
from normfold.models import example_inputs, mlp, resnet
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from normfold import inputs as inputs_mod
from normfold.errors import LoadError, UsageError
from normfold.io import load as load_mod
from normfold.io.limits import MAX_INPUT_ELEMENTS, MAX_MODEL_ARGS_DEPTH, parse_model_args
from normfold.io.load import ZIP_MIN_ALLOWANCE, load_batches, load_inputs, load_model
from normfold.options import InputSpec

RESNET = "normfold.models:resnet"
MLP = "normfold.models:mlp"  # builds in a millisecond: for runs where the model is not the subject
ENV = {"COLUMNS": "250"}
LIMIT = "over the limit of 268,435,456 (2**28) input elements per run"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def fails(result: Result, code: int, text: str) -> str:
    """The run exited with ``code`` and printed exactly one line, an error line holding ``text``."""
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output}{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "\x1b" not in lines[0] and "weights_only=False" not in lines[0]  # no escapes, no unsafe advice
    assert text in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


class _Touch:
    """Unpickling an instance creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------------
# C. pickle payloads: no code runs without --trust


def _payload(kind: str, marker: Path) -> object:
    if kind == "top-level":
        return _Touch(marker)
    if kind == "in-state-dict":
        return {"conv1.weight": torch.ones(2), "x": _Touch(marker)}
    return {"state_dict": {"conv1.weight": torch.ones(2), "x": _Touch(marker)}, "epoch": 3}  # checkpoint


PAYLOAD_RUNS = [
    # args (FILE is the payload), exit code, text in the error line
    (["fold", "FILE", "--model", RESNET, "--out", "x.onnx"], 3, "arbitrary code"),
    (["inspect", "FILE"], 3, "arbitrary code"),
    (["inspect", "FILE", "--model", RESNET], 3, "arbitrary code"),
    (["fold", MLP, "--inputs", "FILE", "--out", "x.onnx"], 3, "beyond tensors, which are never unpickled"),
    (["fold", MLP, "--calibrate", "FILE", "--out", "x.onnx"], 3, "beyond tensors, which are never unpickled"),
    (["recalibrate", MLP, "--data", "FILE", "--out", "r.pt"], 3, "beyond tensors, which are never unpickled"),
]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["top-level", "in-state-dict", "in-checkpoint"])
def test_payload_never_runs_without_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip_format: bool, kind: str
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "canary"
    torch.save(_payload(kind, marker), "payload.pt", _use_new_zipfile_serialization=zip_format)
    for args, code, text in PAYLOAD_RUNS:
        result = invoke(*["payload.pt" if a == "FILE" else a for a in args])
        fails(result, code, text)
        assert not marker.exists(), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.pt"]  # nothing written
    # control: the payload is live, so the runs above mean something
    with pytest.raises(LoadError):
        load_model("payload.pt", trust=True)
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["payload", "module"])
def test_trust_with_model_never_unpickles_a_whole_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip_format: bool, kind: str
) -> None:
    """--model takes weights: a pickled object (a module carrying a payload, or the payload
    itself) given with --model and --trust is a usage error found before any unpickling."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "canary"
    obj: object = _Touch(marker)
    if kind == "module":
        obj = resnet()
        obj.extra = _Touch(marker)  # type: ignore[union-attr]
    torch.save(obj, "whole.pt", _use_new_zipfile_serialization=zip_format)
    line = fails(
        invoke("fold", "whole.pt", "--model", RESNET, "--trust", "--out", "x.onnx"), 2, "--model is only"
    )
    assert "it was not unpickled" in line
    if kind == "module" and zip_format:
        assert f"{type(obj).__module__}.ResNet" in line  # named from the pickle's opcodes
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# C. compiled and foreign formats given as the model


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from onnx import TensorProto, helper, save

    folder = tmp_path_factory.mktemp("foreign")
    files = {"torchscript": folder / "scripted.pt", "pt2": folder / "program.pt2", "onnx": folder / "m.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(mlp()), str(files["torchscript"]))
    torch.export.save(torch.export.export(mlp(), example_inputs("mlp")), files["pt2"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    save(helper.make_model(graph), str(files["onnx"]))
    return files


@pytest.mark.parametrize(
    ("fmt", "text"), [("torchscript", "is a TorchScript archive"), ("pt2", "is a torch.export program")]
)
@pytest.mark.parametrize("with_model", [False, True], ids=["alone", "with-model"])
@pytest.mark.parametrize("trust", [False, True], ids=["", "trust"])
def test_compiled_formats_are_named_and_refused(
    foreign: dict[str, Path], tmp_path: Path, fmt: str, text: str, with_model: bool, trust: bool
) -> None:
    path = foreign[fmt]
    extra = (["--model", RESNET] if with_model else []) + (["--trust"] if trust else [])
    line = fails(invoke("fold", path, *extra, "--out", tmp_path / "x.onnx"), 3, text)
    assert "torch.save(model.state_dict()" in line  # the safe alternative
    fails(invoke("inspect", path, *extra), 3, text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["drop-bias"], ["swap", "--to", "group"], ["fold-norms"]])
def test_an_onnx_model_is_refused_by_the_commands_that_need_a_module(
    foreign: dict[str, Path], tmp_path: Path, command: list[str]
) -> None:
    """fold and inspect take an ONNX model (tests/cli/test_cli_onnx.py); the commands that change
    a PyTorch module refuse it, naming the format and the safe alternative, and write nothing."""
    result = invoke(command[0], foreign["onnx"], *command[1:], "--out", tmp_path / "x.pt")
    line = fails(result, 3, "is an ONNX model")
    assert "torch.save(model.state_dict()" in line
    assert "no PyTorch module for this transform to change" in line and "`normfold fold`" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_an_onnx_model_is_data_and_takes_no_trust(
    foreign: dict[str, Path], tmp_path: Path, command: str
) -> None:
    out = ["--out", tmp_path / "x.onnx"] if command == "fold" else []
    result = invoke(command, foreign["onnx"], "--trust", *out)
    fails(result, 2, "is an ONNX model: --trust does not apply to it")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_compiled_formats_as_inputs_are_refused(foreign: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    fails(invoke("inspect", MLP, "--inputs", foreign[fmt]), 3, "it is a model, not torch.save'd tensors")


# ------------------------------------------------------------------------------------------------
# A1. input shapes: a limit on total elements, checked before allocating; no misparse


@pytest.mark.parametrize(
    ("shape", "text"),
    [
        ("1,3,100000,100000", f"30,000,000,000 input elements in total, {LIMIT}"),
        ("1,3,99999999999999999999,32", f"9,599,999,999,999,999,999,904 input elements in total, {LIMIT}"),
        ("1,3," + "9" * 5000 + ",32", "dimension 3 has 5,000 digits"),
        ("1,3,0,32", "dimension 3 is 0; dimensions must be positive"),
        ("1,3,-1,32", "dimension 3 is -1; dimensions must be positive"),
        ("1,3,,32", "'1,3,,32': dimension 3 is empty"),
        ("1,3,32,32,", "dimension 5 is empty"),
        ("", "dimension 1 is empty"),
        ("1,3,3.5,32", "dimension 3 ('3.5') is not an integer"),
        ("1,3,+-3,32", "dimension 3 ('+-3') is not an integer"),
    ],
)
def test_bad_input_shapes_are_one_line_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str, text: str
) -> None:
    monkeypatch.chdir(tmp_path)
    fails(invoke("fold", RESNET, "--input-shape", shape, "--out", "x.onnx"), 2, text)
    assert list(tmp_path.iterdir()) == []


def test_the_limit_is_the_sum_over_all_inputs() -> None:
    from normfold.cli.app import _source_options, _with_inputs

    def _input_spec(shapes: list[str], dtype: None, file: None) -> Any:
        return _with_inputs(_source_options("m", None, None, False, shapes, dtype, file, True))["inputs"]

    half = f"1,{MAX_INPUT_ELEMENTS // 2}"
    assert _input_spec([half, half], None, None).shapes == [(1, MAX_INPUT_ELEMENTS // 2)] * 2  # at the limit
    over = f"1,{MAX_INPUT_ELEMENTS // 2 + 1}"
    with pytest.raises(UsageError, match=rf"--input-shape {over} --input-shape {half}: 268,435,457 input"):
        _input_spec([over, half], None, None)


def test_library_shapes_are_checked_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model("normfold.models:mlp")

    def no_alloc(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocated before the check")

    monkeypatch.setattr("normfold.check.reference.torch.randn", no_alloc)
    with pytest.raises(
        UsageError, match=r"\(1, 3, 100000, 100000\): 30,000,000,000 input elements in total, over"
    ):
        inputs_mod.example_inputs(loaded, InputSpec(shapes=[(1, 3, 100000, 100000)]), optional=False)
    for bad in [(1, 0), (1, -2), (1, True), (1, 2.5), ()]:
        with pytest.raises(UsageError, match="must have positive integer dimensions"):
            inputs_mod.example_inputs(loaded, InputSpec(shapes=[bad]), optional=False)


# ------------------------------------------------------------------------------------------------
# A2. --model-args: length and nesting capped, RecursionError never escapes


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ("[" * 100_000, "--model-args is 100,000 characters long, over the limit of 65,536"),
        ("[" * 5_000 + "]" * 5_000, "--model-args nests 5,000 levels deep, over the limit of 32"),
        ('{"a":' * 40 + "1" + "}" * 40, "nests 40 levels deep"),
        ('{"seed": [[[' + "x" * 70_000, "characters long"),
    ],
    ids=["long", "deep-array", "deep-object", "long-string"],
)
def test_hostile_model_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: str, text: str) -> None:
    monkeypatch.chdir(tmp_path)
    fails(invoke("fold", RESNET, "--model-args", args, "--out", "x.onnx"), 2, text)


def test_model_args_depth_counts_brackets_outside_strings_only() -> None:
    nested = '{"a": ' + "[" * MAX_MODEL_ARGS_DEPTH + "]" * MAX_MODEL_ARGS_DEPTH + "}"
    with pytest.raises(UsageError, match="nests 33 levels deep"):
        parse_model_args(nested)
    assert parse_model_args('{"name": "[[[[{{{{' + "[" * 100 + '\\"]"}') == {
        "name": "[[[[{{{{" + "[" * 100 + '"]'
    }


# ------------------------------------------------------------------------------------------------
# A3. a deflate bomb in a zip checkpoint: refused from the declared sizes, before torch.load

BOMB_BYTES = ZIP_MIN_ALLOWANCE + 32 * 2**20  # 96 MiB of zeros, about 100 KB deflated


def _deflated(src: bytes) -> bytes:
    """The same zip with every member deflated, as an attacker writes it with zipfile."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    zeros = torch.zeros(BOMB_BYTES, dtype=torch.uint8)
    files = {}
    for name, obj in [("weights", {"conv1.weight": zeros}), ("inputs", zeros), ("data", [zeros])]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(_deflated(buf.getvalue()))
    return files


def test_bomb_premise_torch_would_inflate_it(bombs: dict[str, Path]) -> None:
    assert bombs["weights"].stat().st_size < 1_000_000
    assert torch.load(bombs["inputs"], weights_only=True).numel() == BOMB_BYTES  # a real, loadable bomb


@pytest.mark.parametrize(
    "args",
    [["fold", "{weights}", "--model", RESNET, "--out", "x.onnx"], ["inspect", "{weights}", "--model", RESNET],
     ["inspect", "{weights}", "--model", RESNET, "--trust"], ["inspect", MLP, "--inputs", "{inputs}"],
     ["recalibrate", MLP, "--data", "{data}", "--out", "r.pt"]],
    ids=["fold", "inspect", "inspect-trust", "inputs", "data"],
)  # fmt: skip
def test_deflate_bomb_is_refused_before_torch_load(
    bombs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(load_mod.torch, "load", no_load)
    line = fails(invoke(*[a.format(**bombs) for a in args]), 3, "zip member 'archive/data/0' declares")
    assert f"declares {BOMB_BYTES:,} bytes uncompressed" in line
    assert "a decompression bomb? refused before reading it" in line
    assert list(tmp_path.iterdir()) == []


def test_a_modestly_compressed_checkpoint_still_loads(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(resnet(seed=3).state_dict(), buf)
    path = tmp_path / "deflated.pt"
    path.write_bytes(_deflated(buf.getvalue()))
    loaded = load_model(path, model=RESNET)
    assert torch.equal(loaded.model.conv1.weight, resnet(seed=3).conv1.weight)


# ------------------------------------------------------------------------------------------------
# A4. inputs that declare more elements than they store (expanded, stride 0)


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda: torch.zeros(1).expand(10**12), "its inputs have 1,000,000,000,000 elements in total"),
        (lambda: torch.zeros(1).expand(1, 3, 10000, 10000), "its inputs have 300,000,000 elements"),
        (lambda: (torch.zeros(1).expand(2**27), torch.zeros(1).expand(2**27 + 1)), "268,435,457 elements"),
        (lambda: torch.zeros(4, 4).to_sparse(), "expected a dense (strided) CPU tensor"),
    ],
    ids=["1e12", "3e8", "sum", "sparse"],
)
@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_expanded_inputs_are_refused_before_materializing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[], object], text: str, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(make(), "x.pt")
    assert Path("x.pt").stat().st_size < 5_000
    out = ["--out", "x.onnx"] if command == "fold" else []
    line = fails(invoke(command, MLP, "--inputs", "x.pt", *out), 3, text)
    if "elements" in text:
        assert LIMIT in line


def test_expanded_inputs_within_the_limit_still_load(tmp_path: Path) -> None:
    torch.save(torch.randn(1, 3, 1, 1).expand(2, 3, 32, 32), tmp_path / "x.pt")
    (x,) = load_inputs(tmp_path / "x.pt")
    assert x.shape == (2, 3, 32, 32)


def test_data_files_may_not_show_more_than_they_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save([torch.zeros(1).expand(2**26, 1, 1, 1)] * 5, "data.pt")
    line = fails(invoke("recalibrate", MLP, "--data", "data.pt", "--out", "r.pt"), 3, "stores only 1")
    assert "show 335,544,320 elements in total" in line
    torch.save([torch.zeros(1).expand(2**28 + 1)], "one.pt")
    fails(invoke("recalibrate", MLP, "--data", "one.pt", "--out", "r.pt"), 3, "batch 0 has 268,435,457")
    # real data over the limit in total is fine: every element is stored
    batches = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    torch.save(batches, "real.pt")
    assert len(load_batches("real.pt")) == 3


# ------------------------------------------------------------------------------------------------
# A5. lying safetensors headers


def _st(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
LYING_SAFETENSORS = {
    "header-longer-than-file": (_st({"w": _F32}, bytes(8), length=10**6), "declares a header of 1,000,000"),
    "header-2**63": (_st({}, length=2**63), "declares a header of 9,223,372,036,854,775,808"),
    "header-over-100MiB": (b"\x00\x00\x00\x40\x00\x00\x00\x00", "declares a header"),
    "offsets-beyond-file": (_st({"w": {**_F32, "shape": [2**20], "data_offsets": [0, 2**22]}}, bytes(8)),
                            "not a readable safetensors file"),
    "overlapping": (_st({"a": _F32, "b": {**_F32, "data_offsets": [4, 12]}}, bytes(12)),
                    "not a readable safetensors file"),
    "dtype-shape-vs-bytes": (_st({"w": {**_F32, "shape": [3]}}, bytes(8)), "not a readable safetensors file"),
    "shape-overflow": (_st({"w": {**_F32, "shape": [2**40, 2**40]}}, bytes(8)), "not a readable safetensors"),
    "reversed-offsets": (_st({"w": {**_F32, "data_offsets": [8, 0]}}, bytes(8)), "not a readable"),
    "unknown-dtype": (_st({"w": {**_F32, "dtype": "Q9"}}, bytes(8)), "not a readable safetensors file"),
    "deep-json": (struct.pack("<Q", 20_000) + b"[" * 20_000, "not a readable safetensors file"),
    "too-short": (b"\x01\x02", "only 2 bytes long"),
}  # fmt: skip


@pytest.mark.parametrize(("content", "text"), LYING_SAFETENSORS.values(), ids=LYING_SAFETENSORS.keys())
def test_lying_safetensors_headers(tmp_path: Path, content: bytes, text: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    fails(invoke("inspect", path, "--model", RESNET), 3, text)


# ------------------------------------------------------------------------------------------------
# A6. truncation at many offsets: always a load error


def _cuts(n: int, count: int = 20) -> list[int]:
    return sorted({0, 1, 7, 8, 9, n - 1} | {n * i // count + i % 5 for i in range(count)})


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_truncated_files_are_load_errors(tmp_path: Path, fmt: str) -> None:
    state = resnet().state_dict()
    full = tmp_path / ("full.safetensors" if fmt == "safetensors" else "full.pt")
    if fmt == "safetensors":
        save_file(state, str(full))
    else:
        torch.save(state, full, _use_new_zipfile_serialization=fmt == "zip")
    data = full.read_bytes()
    cut_file = tmp_path / f"cut{full.suffix}"
    for cut in _cuts(len(data)):
        cut_file.write_bytes(data[:cut])
        fails(invoke("inspect", cut_file, "--model", RESNET), 3, str(cut_file))
        if fmt != "safetensors":
            fails(invoke("inspect", MLP, "--inputs", cut_file), 3, str(cut_file))


def test_torch_advice_to_load_unsafely_is_not_passed_on(tmp_path: Path) -> None:
    """A file of zeros reads as a legacy tar to torch, whose error says to retry with
    weights_only=False: the one line says the safe loader cannot read it instead."""
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(bytes(65536))
    fails(invoke("inspect", zeros, "--model", RESNET), 3, "the safe (weights_only) loader cannot read it")
    fails(invoke("inspect", MLP, "--inputs", zeros), 3, "the safe (weights_only) loader cannot read it")


# ------------------------------------------------------------------------------------------------
# A7. special files: never opened, so a FIFO cannot hang a run and a device cannot feed it forever

_RUN_ALL = r"""
import json, sys
from typer.testing import CliRunner
from normfold.cli.app import app
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    results.append([r.exit_code, r.stderr.strip().splitlines()])
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_opening_them(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    cases = {
        "fifo.pt": "not a file but a FIFO (named pipe)",
        "/dev/zero": "not a file but a character device",
        "/dev/urandom": "not a file but a character device",
        "zero.pt": "not a file but a character device",
        "folder.pt": "not a file but a directory",
        "dangling.pt": f"a symbolic link to '{tmp_path / 'gone.pt'}', which does not exist",
    }
    runs = []
    for name in cases:
        runs += [["inspect", name, "--model", RESNET], ["inspect", MLP, "--inputs", name],
                 ["recalibrate", MLP, "--data", name, "--out", "r.pt"]]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(runs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for args, (code, lines) in zip(runs, results, strict=True):
        name = next(a for a in args if a in cases)
        assert code == 3, (args, lines)
        assert len(lines) == 1 and cases[name] in lines[0], (args, lines)
    assert not (tmp_path / "r.pt").exists()
