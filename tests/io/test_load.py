"""Tests for normfold.io.load: factory specs, weights files, refused formats and unsafe pickles."""

from __future__ import annotations

import importlib
import pathlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import state_bytes
from normfold.models import ZOO, ResNet, example_inputs, mlp, resnet
from safetensors.torch import save_file
from torch import nn

from normfold.errors import LoadError, UsageError
from normfold.io.limits import parse_model_args
from normfold.io.load import LoadedModel, load_inputs, load_model

RESNET = "normfold.models:resnet"
SAFE_ALTERNATIVE = "torch.save(model.state_dict()"


class _TouchOnUnpickle:
    """Unpickling an instance calls ``Path.touch(marker)``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a uniquely named module into tmp_path (the cwd) and return its import name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader may add the cwd: undo it afterwards
    names: list[str] = []

    def make(source: str) -> str:
        name = f"nf_test_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return state_bytes(a) == state_bytes(b)


# ------------------------------------------------------------------------------------------------
# factory specs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_factory_spec_loads_zoo_model_with_default_input_shape(name: str) -> None:
    loaded = load_model(f"normfold.models:{name}")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, nn.Module)
    assert type(loaded.model) is type(ZOO[name].factory())
    assert loaded.input_shapes == list(ZOO[name].input_shapes)
    assert loaded.source == f"factory normfold.models:{name}"
    assert _same_state(loaded.model, ZOO[name].factory())


def test_factory_spec_with_model_args() -> None:
    loaded = load_model(RESNET, model_args=parse_model_args('{"num_classes": 3, "seed": 7}'))
    assert loaded.model.fc.out_features == 3
    assert _same_state(loaded.model, resnet(seed=7, num_classes=3))
    assert not _same_state(loaded.model, resnet(seed=0, num_classes=3))


def test_parse_model_args_valid_and_empty() -> None:
    assert parse_model_args('{"seed": 1, "num_classes": 4}') == {"seed": 1, "num_classes": 4}
    assert parse_model_args(None) == {}
    assert parse_model_args("") == {}


def test_parse_model_args_invalid_json() -> None:
    with pytest.raises(UsageError, match="model_args is not valid JSON") as exc:
        parse_model_args("{seed: 1}")
    assert "{seed: 1}" in str(exc.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"seed"', "3", "null"])
def test_parse_model_args_not_an_object(text: str) -> None:
    with pytest.raises(UsageError, match="must be a JSON object"):
        parse_model_args(text)


def test_unknown_module_is_a_load_error() -> None:
    with pytest.raises(LoadError, match=r"cannot import 'no_such_pkg_nf\.sub'"):
        load_model("no_such_pkg_nf.sub:factory")


def test_missing_attribute_is_a_load_error() -> None:
    with pytest.raises(LoadError, match="has no attribute 'no_such_factory'"):
        load_model("normfold.models:no_such_factory")


def test_non_callable_attribute_is_a_load_error() -> None:
    with pytest.raises(LoadError, match="is a dict, not a callable"):
        load_model("normfold.models:ZOO")


def test_factory_returning_non_module(make_module: Callable[[str], str]) -> None:
    name = make_module("def build():\n    return [1, 2, 3]\n")
    with pytest.raises(LoadError, match=r"returned list, not a torch\.nn\.Module"):
        load_model(f"{name}:build")


def test_factory_from_the_current_directory(make_module: Callable[[str], str]) -> None:
    name = make_module("from torch import nn\n\ndef build(width=4):\n    return nn.Linear(width, 2)\n")
    loaded = load_model(f"{name}:build", model_args={"width": 6})
    assert isinstance(loaded.model, nn.Linear)
    assert loaded.model.in_features == 6
    assert loaded.input_shapes is None  # not a zoo factory: no default input shape


def test_factory_that_raises_is_a_load_error(make_module: Callable[[str], str]) -> None:
    name = make_module("def build(**kw):\n    raise ValueError('bad config')\n")
    with pytest.raises(LoadError, match=r"failed with arguments .*bad config"):
        load_model(f"{name}:build")
    with pytest.raises(LoadError, match="unexpected keyword argument 'bogus'"):
        load_model(RESNET, model_args={"bogus": 1})


def test_module_failing_at_import_is_a_load_error(make_module: Callable[[str], str]) -> None:
    broken = make_module("raise RuntimeError('boom at import')\n")
    with pytest.raises(LoadError, match="boom at import"):
        load_model(f"{broken}:build")
    syntax = make_module("def build(:\n")
    with pytest.raises(LoadError, match="SyntaxError"):
        load_model(f"{syntax}:build")


def test_model_option_with_a_factory_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="already a factory spec"):
        load_model(RESNET, model=RESNET)


# ------------------------------------------------------------------------------------------------
# weights files


def test_state_dict_loads_into_factory_architecture(tmp_path: Path) -> None:
    original = resnet(seed=0)
    other = resnet(seed=1)
    assert not _same_state(original, other)  # the test would be vacuous otherwise
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)

    loaded = load_model(path, model=RESNET, model_args={"seed": 1})
    assert _same_state(loaded.model, original)
    assert not _same_state(loaded.model, other)
    assert loaded.input_shapes == [ZOO["resnet"].input_shape]
    assert "state_dict" in loaded.source and str(path) in loaded.source
    (x,) = example_inputs("resnet")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_dict(tmp_path: Path, key: str) -> None:
    original = resnet(seed=0)
    path = tmp_path / "checkpoint.pth"
    torch.save({key: original.state_dict(), "epoch": 12, "best_acc": 0.91}, path)
    loaded = load_model(path, model=RESNET, model_args={"seed": 3})
    assert _same_state(loaded.model, original)


def test_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    original = resnet(seed=0)
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in original.state_dict().items()}, path)
    loaded = load_model(path, model=RESNET, model_args={"seed": 2})
    assert _same_state(loaded.model, original)


def test_safetensors_loads(tmp_path: Path) -> None:
    original = resnet(seed=0)
    path = tmp_path / "weights.safetensors"
    save_file(original.state_dict(), str(path))
    loaded = load_model(path, model=RESNET, model_args={"seed": 5})
    assert _same_state(loaded.model, original)
    assert loaded.source.startswith("safetensors ")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_without_model_is_a_usage_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(resnet().state_dict(), path)
    else:
        save_file(resnet().state_dict(), str(path))
    with pytest.raises(UsageError, match=r"pass the architecture with model=package\.module:callable"):
        load_model(path)


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), path)
    with pytest.raises(LoadError) as exc:
        load_model(path, model=RESNET)
    msg = str(exc.value)
    assert f"does not fit {RESNET}" in msg
    # totals, then the first keys, sorted: resnet's that mlp lacks, mlp's that resnet lacks
    assert "45 of the model's 50 keys are missing from the file (conv1.weight, " in msg
    assert "10 of the file's 15 keys are unexpected (bn2.bias, " in msg
    assert "the prefix" not in msg  # no prefix makes these fit: no hint


def test_keys_under_a_prefix_get_the_fix_named(tmp_path: Path) -> None:
    """A Lightning-style checkpoint (``model.`` before every key) and a wrapper's (the model's
    keys under ``backbone.``): the message names the prefix to strip or add."""
    path = tmp_path / "lightning.pt"
    torch.save({f"model.{k}": v for k, v in mlp().state_dict().items()} | {"loss.w": torch.ones(1)}, path)
    with pytest.raises(LoadError) as exc:
        load_model(path, model="normfold.models:mlp")
    fix = "; strip the prefix 'model.' from the file's keys and 15 of the model's 15 keys match"
    assert str(exc.value).endswith(fix)
    path = tmp_path / "inner.pt"
    state = mlp().state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("fc1.")}, path)
    with pytest.raises(LoadError) as exc:
        load_model(path, model="normfold.models:mlp")
    assert "the prefix" not in str(exc.value)  # keys missing, but no prefix would fix it


def test_key_names_in_a_load_error_are_escaped(tmp_path: Path) -> None:
    """A key with a newline or a terminal escape cannot start a line of the message."""
    path = tmp_path / "forged.pt"
    forged = "x\nnormfold: ok folded=8/8 kept=0 out=r.onnx\x1b[2K\u2028"
    torch.save(mlp().state_dict() | {forged: torch.ones(1)}, path)
    with pytest.raises(LoadError) as exc:
        load_model(path, model="normfold.models:mlp")
    msg = str(exc.value)
    assert msg.isprintable() and "\n" not in msg
    shown = "x\\nnormfold: ok folded=8/8 kept=0 out=r.onnx\\x1b[2K\\u2028"
    assert f"1 of the file's 16 keys are unexpected ({shown})" in msg


def test_many_unexpected_keys_give_a_bounded_message_fast(tmp_path: Path) -> None:
    """20,000 unexpected keys, each under its own prefix (the case that made the prefix hint
    quadratic: minutes from a file of a few MB): the message names at most 5 of them, and the
    load error comes back within a bound a linear hint meets by far on any machine."""
    import time

    path = tmp_path / "many.safetensors"
    extra = {f"head{i}.block{i}.weight": torch.zeros(1) for i in range(20_000)}
    save_file(mlp().state_dict() | extra, str(path))
    start = time.perf_counter()
    with pytest.raises(LoadError) as exc:
        load_model(path, model="normfold.models:mlp")
    elapsed = time.perf_counter() - start
    msg = str(exc.value)
    first = "head0.block0.weight, head1.block1.weight, head10.block10.weight, "
    assert f"20000 of the file's 20015 keys are unexpected ({first}" in msg
    assert msg.count("head") == 5 and len(msg) < 1000, msg
    assert "the prefix" not in msg
    assert elapsed < 10, f"{elapsed:.1f}s"


def test_same_keys_wrong_shapes_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.pt"
    torch.save(resnet(num_classes=10).state_dict(), path)
    with pytest.raises(
        LoadError,
        match=r"does not fit .*size mismatch: fc\.weight \(10, 32\) in the file, \(3, 32\) in the model",
    ):
        load_model(path, model=RESNET, model_args={"num_classes": 3})


def test_empty_or_non_tensor_mapping_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(LoadError, match="not a state_dict"):
        load_model(path, model=RESNET)


# ------------------------------------------------------------------------------------------------
# whole pickled modules and code execution


def test_pickled_module_refused_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(resnet(), path)
    with pytest.raises(LoadError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "arbitrary code" in msg
    assert "trust=True" in msg and "--" not in msg  # the API's words, never a CLI flag
    assert SAFE_ALTERNATIVE in msg and "model=package.module:callable" in msg


def test_pickled_module_loads_with_trust(tmp_path: Path) -> None:
    original = resnet(seed=4)
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    loaded = load_model(path, trust=True)
    assert isinstance(loaded.model, nn.Module)
    assert type(loaded.model) is ResNet
    assert _same_state(loaded.model, original)
    assert loaded.source == f"pickled module {path} (trusted)"
    with pytest.raises(UsageError, match="whole module"):
        load_model(path, trust=True, model=RESNET)


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_no_code_runs_without_trust(tmp_path: Path, zipfile_format: bool) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "payload.pt"
    torch.save(
        {"weight": torch.ones(2), "x": _TouchOnUnpickle(marker)},
        path,
        _use_new_zipfile_serialization=zipfile_format,
    )

    with pytest.raises(LoadError, match="arbitrary code"):
        load_model(path)
    with pytest.raises(LoadError, match="arbitrary code"):
        load_model(path, model=RESNET)
    with pytest.raises(LoadError):
        load_inputs(path)
    assert not marker.exists()

    # control: the payload is live, so the check above means something
    with pytest.raises(LoadError):  # the unpickled dict is not a state_dict
        load_model(path, trust=True, model=RESNET)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_archive_is_refused(tmp_path: Path, trust: bool) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(mlp()), str(path))
    with pytest.raises(LoadError, match="TorchScript") as exc:
        load_model(path, trust=trust, model=RESNET if not trust else None)
    assert SAFE_ALTERNATIVE in str(exc.value)


@pytest.mark.parametrize("trust", [False, True])
def test_exported_program_is_refused(tmp_path: Path, trust: bool) -> None:
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(mlp(), example_inputs("mlp")), path)
    with pytest.raises(LoadError, match=r"torch\.export") as exc:
        load_model(path, trust=trust)
    assert SAFE_ALTERNATIVE in str(exc.value)


# ------------------------------------------------------------------------------------------------
# unreadable files


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_pt(tmp_path: Path, trust: bool) -> None:
    full = tmp_path / "full.pt"
    torch.save(resnet().state_dict(), full)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[:300])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_model(path, model=RESNET, trust=trust)


@pytest.mark.parametrize(
    "content",
    [b"just some notes\n", b'{"weights": [1, 2]}\n', b"\x08\x07\x12\x04onnx", b""],
    ids=["text", "json", "protobuf", "empty"],
)
def test_non_torch_file_is_not_mistaken_for_a_pickle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    expected = "is an ONNX model" if content.startswith(b"\x08") else "truncated or corrupt"
    with pytest.raises(LoadError, match=expected) as exc:
        load_model(path, model=RESNET)
    assert "--trust" not in str(exc.value)  # no advice to unpickle a file that is not a pickle


@pytest.mark.parametrize("cut", [0, 5, 300, "half"])
def test_truncated_safetensors(tmp_path: Path, cut: int | str) -> None:
    full = tmp_path / "full.safetensors"
    save_file(resnet().state_dict(), str(full))
    data = full.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_model(path, model=RESNET)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "absent.pt", model=RESNET)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "weights.pt"
    folder.mkdir()
    with pytest.raises(LoadError, match="not a file"):
        load_model(folder, model=RESNET)


# ------------------------------------------------------------------------------------------------
# load_inputs


def test_load_inputs_tensor(tmp_path: Path) -> None:
    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / "x.pt"
    torch.save(x, path)
    (got,) = load_inputs(path)
    assert torch.equal(got, x)


@pytest.mark.parametrize("container", [tuple, list])
def test_load_inputs_sequence(tmp_path: Path, container: type) -> None:
    xs = container([torch.randn(2, 4), torch.arange(6).reshape(2, 3)])
    path = tmp_path / "xs.pt"
    torch.save(xs, path)
    got = load_inputs(path)
    assert isinstance(got, tuple) and len(got) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, xs, strict=True))


@pytest.mark.parametrize(
    "obj", [{"x": torch.ones(2)}, (), (torch.ones(2), 3)], ids=["dict", "empty", "mixed"]
)
def test_load_inputs_rejects_non_tensors(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(LoadError, match="expected a tensor or a tuple of tensors"):
        load_inputs(path)


def test_load_inputs_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such inputs file"):
        load_inputs(tmp_path / "absent.pt")
    text = tmp_path / "inputs.pt"
    text.write_text("1, 2, 3\n")
    with pytest.raises(LoadError, match="not a readable tensor file"):
        load_inputs(text)


def test_factory_import_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    import sys

    from normfold.io.load import resolve_factory

    (tmp_path / "nf_pathcheck_factory.py").write_text("def build():\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert resolve_factory("nf_pathcheck_factory:build")() == 1
    assert sys.path == before  # the working directory is importable for that import only


# ------------------------------------------------------------------------------------------------
# the weights' dtype is kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_weights_dtype_is_kept(tmp_path: Path, dtype: torch.dtype, fmt: str) -> None:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet(seed=2).state_dict().items()}
    path = tmp_path / f"w{fmt}"
    if fmt == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = load_model(path, model=RESNET)
    name = str(dtype).removeprefix("torch.")
    assert {v.dtype for v in loaded.model.state_dict().values() if v.is_floating_point()} == {dtype}
    assert loaded.dtype == dtype
    assert loaded.notes == [
        f"the weights in {path} are {name}: {RESNET} (float32) was cast to {name} to keep them"
    ]
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())  # bit for bit, no round trip via fp32


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_float8_weights_are_a_load_error(tmp_path: Path, dtype: torch.dtype, fmt: str) -> None:
    """float8 is a storage dtype (no kernels to fold or run in): a load error naming it, not an
    internal error at the first op."""
    path = tmp_path / f"w.{fmt}"
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in mlp().state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    name = str(dtype).removeprefix("torch.")
    message = (rf"^the weights in .*w\.{fmt} are {name}, a storage dtype normfold cannot fold, run or "
               r"export in \(it computes in float16, bfloat16, float32, float64\)")  # fmt: skip
    with pytest.raises(LoadError, match=message):
        load_model(path, model="normfold.models:mlp")
    assert LoadError.exit_code == 3


def test_mixed_weight_dtypes_are_noted(tmp_path: Path) -> None:
    state = resnet().state_dict()
    state["conv1.weight"] = state["conv1.weight"].half()
    torch.save(state, tmp_path / "mixed.pt")
    loaded = load_model(tmp_path / "mixed.pt", model=RESNET)
    assert loaded.dtype is None
    assert loaded.model.conv1.weight.dtype == torch.float32
    assert loaded.notes == [
        f"the weights in {tmp_path / 'mixed.pt'} mix floating dtypes (float16, float32); each was "
        f"converted to the dtype of its tensor in {RESNET} (float32)"
    ]


def test_same_dtype_weights_add_no_note(tmp_path: Path) -> None:
    torch.save(resnet().state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", model=RESNET)
    assert loaded.notes == [] and loaded.dtype is None


def test_fp16_weights_are_inspected_in_fp16_with_the_note(tmp_path: Path) -> None:
    """The pipeline's notes carry the loader's; example inputs, random or from a file, follow."""
    from normfold import pipeline

    state = {k: v.half() if v.is_floating_point() else v for k, v in resnet().state_dict().items()}
    torch.save(state, tmp_path / "w16.pt")
    run = pipeline.inspect(
        tmp_path / "w16.pt", load=pipeline.LoadOptions(model=RESNET)
    )  # fp32 inputs would fail to trace
    assert run.notes[0].startswith(f"the weights in {tmp_path / 'w16.pt'} are float16")
    torch.save(torch.randn(2, 3, 32, 32), tmp_path / "x.pt")
    run = pipeline.inspect(
        tmp_path / "w16.pt",
        load=pipeline.LoadOptions(model=RESNET),
        inputs=pipeline.InputSpec(file=tmp_path / "x.pt"),
    )
    assert f"the floating inputs in {tmp_path / 'x.pt'} (float32) were cast to float16" in " ".join(run.notes)


# ------------------------------------------------------------------------------------------------
# sniffing and the trusted-load gate


def test_safetensors_header_length_that_looks_like_onnx_is_not_onnx(tmp_path: Path) -> None:
    from normfold.io.load import _sniff

    onnx_like = tmp_path / "w.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    header += b" " * (0x3A0108 - len(header))  # length bytes 08 01 3a: ir_version 1, graph field
    onnx_like.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    assert _sniff(onnx_like) == "other"
    with pytest.raises(LoadError, match="does not fit"):  # read as safetensors, not named ONNX
        load_model(onnx_like, model="normfold.models:mlp")


def test_pickled_top_level_is_read_without_unpickling(tmp_path: Path) -> None:
    from normfold.io.load import _pickled_top_level

    marker = tmp_path / "code_ran"
    module_class = f"{ResNet.__module__}.{ResNet.__qualname__}"  # normfold.models.cnns.ResNet
    cases: dict[str, object] = {
        "dict": {"w": torch.ones(1)},
        "collections.OrderedDict": resnet().state_dict(),
        module_class: resnet(),
        "torch._utils._rebuild_tensor_v2": torch.ones(1),
    }
    for expected, obj in cases.items():
        for zip_format in (True, False):
            torch.save(obj, tmp_path / "f.pt", _use_new_zipfile_serialization=zip_format)
            got = _pickled_top_level(tmp_path / "f.pt")
            if zip_format or expected != module_class:
                assert got == expected, (expected, zip_format)
            else:
                assert got is None  # a legacy module pickle starts with its source: unknown, refused
    torch.save(_TouchOnUnpickle(marker), tmp_path / "p.pt")
    assert _pickled_top_level(tmp_path / "p.pt") not in (None, "dict")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert _pickled_top_level(tmp_path / "junk.pt") is None
    assert not marker.exists()


def test_trusted_pickle_finds_its_class_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19, friction 5: a whole pickled module whose class lives in ``./wdnet.py`` loads with
    trust=True as ``model=wdnet:build`` finds that file, also when the working directory is not on
    ``sys.path`` (the ``normfold`` console script's case)."""
    import importlib
    import sys

    (tmp_path / "wdnet.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n        self.bn = nn.BatchNorm2d(4)\n\n"
        "    def forward(self, x):\n        return self.bn(self.conv(x))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    wdnet = importlib.import_module("wdnet")
    torch.save(wdnet.Net().eval(), tmp_path / "whole.pt")
    del sys.modules["wdnet"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    loaded = load_model(tmp_path / "whole.pt", trust=True)
    assert type(loaded.model).__name__ == "Net" and type(loaded.model).__module__ == "wdnet"
    assert tmp_path / "wdnet.py" in loaded.code_files  # its code ran: an input of the run
    assert "wdnet" not in [Path(p).name for p in sys.path]  # importable for the load only


def test_an_onnx_file_is_refused_in_the_apis_words(tmp_path: Path) -> None:
    """load_model of an ONNX file (the path drop_redundant_biases/swap/fold_norm_affine load
    through) refuses it with the API's words: what folds an ONNX file, and model= (never a flag)."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    path = tmp_path / "m.onnx"
    save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    with pytest.raises(LoadError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path} is an ONNX model, not a readable torch.save file")
    assert "no PyTorch module for this transform to change" in message and "fold_onnx_file" in message
    assert "model=package.module:callable" in message and "--" not in message
