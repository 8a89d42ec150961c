"""The CLI's pre-flight (normfold.cli.preflight) and its words (normfold.cli.errors.cli_words):
file and usage errors decided from the disk come back before torch is imported, with the message
the library's loader gives for the same file; every API word in the library's messages reaches the
user as the CLI option that sets it."""

from __future__ import annotations

import ast
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from helpers import invoke_fresh
from normfold.cli.errors import FIELD_FLAGS, KEYWORD_FLAGS, cli_words
from normfold.models import mlp
from onnx import TensorProto, helper
from safetensors.torch import save_file

from normfold import load_model
from normfold.errors import NormfoldError

NORMFOLD = Path(__file__).parents[2] / "normfold"
MLP = "normfold.models:mlp"


def _files(folder: Path) -> None:
    """One real file of each kind the loader refuses or needs an architecture for."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    model = mlp()
    torch.export.save(torch.export.export(model, (torch.randn(2, 64),)), str(folder / "program.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; the format is real
        torch.jit.save(torch.jit.script(model), str(folder / "scripted.pt"))
    save_file(model.state_dict(), str(folder / "weights.safetensors"))
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save([torch.randn(4, 64)], folder / "batches.pt")
    (folder / "a_folder").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    full = (folder / "weights.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(full[:300])  # a zip cut short


# (args, exit code, the error line after "error: ", heavy modules allowed to be loaded)
CASES = [
    (["fold", "absent.pt", "--model", MLP, "--out", "o.onnx"], 3,
     "absent.pt: no such file (and not a factory spec like package.module:callable)", ()),
    (["fold", "a_folder", "--model", MLP, "--out", "o.onnx"], 3,
     "a_folder: not a file but a directory; pass a regular file", ()),
    (["fold", "model.onnx", "--model", MLP, "--out", "o.onnx"], 2,
     "model.onnx is an ONNX model: --model does not apply to it (the graph is its own architecture)", ()),
    (["fold", "program.pt2", "--model", MLP, "--out", "o.onnx"],
     3, "program.pt2 is a torch.export program", ()),
    (["inspect", "scripted.pt"], 3, "scripted.pt is a TorchScript archive", ()),
    (["fold", "truncated.pt", "--model", MLP, "--out", "o.onnx"], 3,
     "truncated.pt is not a readable zip archive (truncated or corrupt?)", ()),
    (["drop-bias", "weights.safetensors", "--out", "o.pt"], 2,
     "weights.safetensors holds weights only (safetensors); pass the architecture with --model "
     "package.module:callable", ()),
    (["fold", "nosuch_pkg.nets:build", "--out", "o.onnx"], 3,
     "cannot import 'nosuch_pkg.nets' for factory 'nosuch_pkg.nets:build': No module named 'nosuch_pkg'", ()),
    (["inspect", "weights.pt", "--model", "nosuch_pkg:build"], 3,
     "cannot import 'nosuch_pkg' for factory 'nosuch_pkg:build': No module named 'nosuch_pkg'", ()),
    (["fold", MLP, "--model", MLP, "--out", "o.onnx"], 2,
     f"{MLP} is already a factory spec; --model is only for weights files", ()),
    (["fold", "weights.pt", "--model", "not a spec", "--out", "o.onnx"], 2,
     "'not a spec' is not a factory spec of the form package.module:callable", ()),
    (["fold", MLP, "--out", "o.pt"], 2, "--out o.pt: unknown format .pt; use .onnx or .pt2", ()),
    (["recalibrate", MLP, "--data", "batches.pt", "--out", "o.onnx"], 2,
     "--out o.onnx: unknown format .onnx; use .pt or .pth or .safetensors", ()),
    (["fold", MLP, "--inputs", "model.onnx", "--out", "o.onnx"], 3,
     "model.onnx is not a readable tensor file: it is a model, not torch.save'd tensors", ()),
    (["fold", MLP, "--inputs", "empty.pt", "--out", "o.onnx"], 3,
     "empty.pt is not a readable tensor file: it is empty", ()),
    (["fold", MLP, "--calibrate", "absent.pt", "--out", "o.onnx"], 3, "absent.pt: no such data file", ()),
    (["recalibrate", MLP, "--data", "a_folder", "--out", "o.pt"],
     3, "a_folder: not a file but a directory", ()),
    (["swap", MLP, "--to", "group", "--inputs", "program.pt2", "--out", "o.pt"], 3,
     "program.pt2 is not a readable tensor file", ()),
    (["fold", MLP, "--input-names", "x,,y", "--out", "o.onnx"], 2,
     "--input-names 'x,,y': item 2 is empty (expected comma-separated names)", ()),
    (["fold", MLP, "--opset", "17", "--out", "o.onnx"], 2, "--opset 17 is not supported: choose 18 to ",
     ("onnx",)),
    (["drop-bias", MLP, "--opset", "1000", "--out", "o.onnx"], 2, "--opset 1000 is not supported", ("onnx",)),
    (["swap", MLP, "--to", "group", "--providers", "NoSuchExecutionProvider", "--out", "o.onnx"], 2,
     "--providers NoSuchExecutionProvider: 'NoSuchExecutionProvider' is not installed in this onnxruntime",
     ("onnxruntime",)),
]  # fmt: skip


def test_file_and_usage_errors_come_before_torch_is_imported(tmp_path: Path) -> None:
    """Each case in one fresh process: its exit code and message, with torch never imported (onnx
    only from the first --opset case on, onnxruntime from the first --providers one), and nothing
    written."""
    _files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    on_import, runs = invoke_fresh([args for args, *_ in CASES], cwd=tmp_path)
    assert on_import == []
    allowed: set[str] = set()
    for (args, exit_code, message, needs), run in zip(CASES, runs, strict=True):
        allowed |= set(needs)  # a module imported stays imported for the cases after it
        heavy = [m for m in run.heavy if m not in allowed]
        assert (run.exit_code, heavy, run.stdout) == (exit_code, [], ""), (args, run.stderr, heavy)
        assert run.stderr.startswith(f"error: {message}") and run.stderr.count("\n") == 1, (args, run.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("source", "model"),
    [("absent.pt", MLP), ("a_folder", MLP), ("model.onnx", MLP), ("program.pt2", MLP), ("scripted.pt", None),
     ("truncated.pt", MLP), ("weights.safetensors", None), (MLP, MLP), ("nosuch_pkg.nets:build", None),
     ("weights.pt", "nosuch_pkg:build")],
)  # fmt: skip
def test_preflight_says_what_the_loader_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, model: str | None
) -> None:
    """Pre-flight (the loader's byte checks, run before torch loads) gives the loader's own
    message (in the CLI's words) and exit code."""
    from normfold.cli.preflight import check_source

    from normfold.options import LoadOptions

    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NormfoldError) as early:
        check_source(source, LoadOptions(model=model))
    with pytest.raises(NormfoldError) as loader:
        load_model(source, model=model)
    assert (early.value.exit_code, str(early.value)) == (loader.value.exit_code, cli_words(str(loader.value)))


def _zip_bomb(path: Path) -> None:
    """A zip whose one deflated member declares 80 MiB: over the loader's allowance (16x the file's
    size, at least 64 MiB), so it is refused before any reader allocates it."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z,
        z.open("archive/data.pkl", "w") as f,
    ):
        for _ in range(80):
            f.write(bytes(2**20))


class _PastTheByteChecks(BaseException):  # not an Exception: the tensor loader catches those
    """Raised where the loader stops reading bytes and starts unpickling: what came before passed."""


def _verdict(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[int, str] | None:
    """None when ``call(*args, **kwargs)`` got past the byte checks, else its error's exit code and
    message (in the CLI's words, as the user reads both)."""
    try:
        call(*args, **kwargs)
    except _PastTheByteChecks:
        return None
    except NormfoldError as e:
        return e.exit_code, cli_words(str(e))
    return None


def test_preflight_and_the_loader_agree_on_every_file_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sample file (each kind the byte checks tell apart: ONNX, TorchScript, torch.export,
    safetensors, torch.save zip and legacy pickle, empty, truncated, a zip bomb, a folder, a
    missing file), as a model source and as a tensor file: pre-flight refuses exactly what the
    loader refuses before unpickling anything, with the same exit code and message, and lets
    through exactly what the loader reads on. The loader is stopped where its byte checks end."""
    from normfold.cli.preflight import check_source, check_tensor_file

    from normfold.io import load, tensor_files
    from normfold.options import LoadOptions

    _files(tmp_path)
    torch.save(mlp().state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _zip_bomb(tmp_path / "bomb.pt")
    monkeypatch.chdir(tmp_path)

    def past(*args: object, **kwargs: object) -> None:
        raise _PastTheByteChecks

    monkeypatch.setattr(load, "_torch_load", past)
    monkeypatch.setattr(load, "_load_safetensors", past)
    monkeypatch.setattr(tensor_files.torch, "load", past)
    names = [*sorted(p.name for p in tmp_path.iterdir()), "absent.pt"]
    assert {"model.onnx", "scripted.pt", "program.pt2", "bomb.pt", "legacy.pt", "a_folder"} <= set(names)
    refused = 0
    for name in names:
        early = _verdict(check_source, name, LoadOptions(model=MLP))
        assert early == _verdict(load_model, name, model=MLP), ("model", name)
        early_tensors = _verdict(check_tensor_file, Path(name), "inputs")
        assert early_tensors == _verdict(tensor_files.load_inputs, name), ("inputs", name)
        refused += (early is not None) + (early_tensors is not None)
    assert refused >= 12  # the samples are refused for many reasons, not all let through


def test_a_valid_source_passes_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from normfold.cli.preflight import check_source, check_tensor_file

    from normfold.options import LoadOptions

    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    fine = [(MLP, None), ("weights.pt", MLP), ("weights.safetensors", MLP), ("weights.pt", None)]
    for source, model in fine:
        check_source(source, LoadOptions(model=model))  # the loader decides the rest
    check_tensor_file(tmp_path / "batches.pt", "data")


# ------------------------------------------------------------------------------------------------
# cli_words

TRANSLATIONS = [
    ("out=m.onnx: unknown format .txt", "--out m.onnx: unknown format .txt"),
    ("report=r.json is the same file as out=m.onnx", "--report r.json is the same file as --out m.onnx"),
    ("save_inputs=in.pt: folder x does not exist", "--save-inputs in.pt: folder x does not exist"),
    ("m.onnx already exists; pass force=True to replace it",
     "m.onnx already exists; pass --force to replace it"),
    ("got 1 InputSpec.shapes: give one shape", "got 1 --input-shape: give one shape"),
    ("give InputSpec.shapes or InputSpec.file (a .pt of tensors)",
     "give --input-shape or --inputs (a .pt of tensors)"),
    ("InputSpec.dtype float64 differs from the weights' float32: inputs follow the weights (leave "
     "InputSpec.dtype out)",
     "--input-dtype float64 differs from the weights' float32: inputs follow the weights (omit "
     "--input-dtype)"),
    ("widened: set ExportOptions.static_batch=True or give smaller shapes",
     "widened: pass --static-batch or give smaller shapes"),
    ("unless static_batch=True", "unless --static-batch"),
    ("ExportOptions.dynamic_axes height (input 0, axis 2): fails",
     "--dynamic height (input 0, axis 2): fails"),
    ("dynamic_axes={0: {1: 'w'}}: the forward", "--dynamic {0: {1: 'w'}}: the forward"),
    ("ExportOptions.opset 17", "--opset 17"),
    ("opset=17 is not supported", "--opset 17 is not supported"),
    ("input_names=['a', 'b']: 2 names for 1 input", "--input-names a,b: 2 names for 1 input"),
    ("output_names=['y', 'x']: 'x' names both", "--output-names y,x: 'x' names both"),
    ("providers=['CUDAExecutionProvider']: not installed",
     "--providers CUDAExecutionProvider: not installed"),
    ("ExportOptions.providers", "--providers"),
    ("model= is only for weights files", "--model is only for weights files"),
    ("with model=package.module:callable", "with --model package.module:callable"),
    ("leave model= out to load a whole module with trust=True",
     "drop --model to load a whole module with --trust"),
    ("model_args is not valid JSON", "--model-args is not valid JSON"),
    ("model_args={'a': 1}", "--model-args {'a': 1}"),
    ("FoldOptions.calibrate and FoldOptions.require_all", "--calibrate and --require-all"),
    ("reparameterize=False", "--no-reparam"),
    ("not divisible by num_groups=5", "not divisible by --num-groups 5"),
    ("the layout=x and checkout= stay", "the layout=x and checkout= stay"),  # not an API word
]  # fmt: skip


@pytest.mark.parametrize(("api", "cli"), TRANSLATIONS)
def test_cli_words(api: str, cli: str) -> None:
    assert cli_words(api) == cli


def _message_strings() -> list[tuple[str, str]]:
    """Every string literal (f-string parts too) inside a ``raise`` in the library."""
    found = []
    for path in sorted(NORMFOLD.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found.append((f"{path.relative_to(NORMFOLD)}:{sub.lineno}", sub.value))
    return found


def test_every_api_word_in_the_library_messages_becomes_a_flag() -> None:
    """No option-object field (``InputSpec.shapes``) nor keyword (``out=``, ``force=True``) of the
    API is left in any library message once the CLI shows it."""
    fields = re.compile(r"\b(?:InputSpec|LoadOptions|FoldOptions|ExportOptions|WriteOptions|ParityRule)\.\w+")
    keywords = re.compile(r"(?<![\w.\-])(" + "|".join(KEYWORD_FLAGS) + r")=")
    messages = _message_strings()
    assert len(messages) > 100  # the walk found the library's messages
    seen = {m.group(0) for _, text in messages for m in fields.finditer(text)}
    assert seen and seen - {"ParityRule.of"} <= set(FIELD_FLAGS)  # a new field gets its flag here
    for where, text in messages:
        shown = cli_words(text)
        left = [m.group(0) for m in fields.finditer(shown) if m.group(0) != "ParityRule.of"]
        left += [m.group(0) for m in keywords.finditer(shown)]
        assert not left, (where, text, shown)
