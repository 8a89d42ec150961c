"""The .onnx file: names of inputs, outputs and dynamic axes, written once, described, checked on
the providers asked for."""

from __future__ import annotations

import math
import re
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import randomize_bn
from torch import nn

import normfold
from normfold.errors import ExportError, UsageError
from normfold.io.export import ExportOptions, export_onnx, run_onnx


class TwoInTwoOut(nn.Module):
    """Conv-BN on an image, a Linear-BN on features; returns both and their sum's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.linear, self.bn1 = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(image))
        z = self.bn1(self.linear(features))
        return y, z + y.mean((2, 3))


def _two() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 5, generator=gen))
    return randomize_bn(TwoInTwoOut()), x


def _io(path: Path) -> tuple[list[tuple[str, list[int | str]]], list[tuple[str, list[int | str]]]]:
    """(name, shape) of each graph input and output, read back from the file."""
    graph = onnx.load(str(path)).graph

    def shape(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim]

    return [(v.name, shape(v)) for v in graph.input], [(v.name, shape(v)) for v in graph.output]


def test_default_names_are_the_forward_arguments_and_output_n(tmp_path):
    model, x = _two()
    folded = normfold.fold(model, x)
    out = tmp_path / "m.onnx"
    result = export_onnx(folded.model, x, out, original=model, program=folded.program)
    inputs, outputs = _io(out)
    assert inputs == [("image", ["batch", 3, 8, 8]), ("features", ["batch", 5])]
    assert outputs == [("output", ["batch", 4, 8, 8]), ("output_1", ["batch", 4])]
    assert result.parity["onnxruntime-cpu"].passed  # fed by the new names


def test_given_names_are_written_and_may_reuse_internal_names(tmp_path):
    """Names that the exporter already gave internal values (``conv2d``, ``linear``, the default
    ``output``) are still the graph's inputs and outputs, and the file checks and runs."""
    model, x = _two()
    folded = normfold.fold(model, x)
    out = tmp_path / "m.onnx"
    names = ExportOptions(input_names=["conv2d", "output"], output_names=["linear", "image"])
    result = export_onnx(folded.model, x, out, original=model, program=folded.program, options=names)
    inputs, outputs = _io(out)
    assert [n for n, _ in inputs] == ["conv2d", "output"] and [n for n, _ in outputs] == ["linear", "image"]
    assert [t.name for t in result.inputs] == ["conv2d", "output"]
    onnx.checker.check_model(str(out), full_check=True)
    assert result.parity["onnxruntime-cpu"].passed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["image"], {"conv2d": x[0].numpy(), "output": x[1].numpy()})[0]
    want = normfold.run_model(model, x)[1]
    assert torch.allclose(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


class Passthrough(nn.Module):
    """Returns its input as is, and one tensor twice: outputs the exporter must copy to name."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return x, y, y


def test_an_input_returned_and_an_output_returned_twice_get_their_own_names(tmp_path):
    x = (torch.randn(2, 3),)
    out = tmp_path / "m.onnx"
    result = export_onnx(Passthrough(), x, out, options=ExportOptions(output_names=["same", "a", "b"]))
    inputs, outputs = _io(out)
    assert [n for n, _ in inputs] == ["x"] and [n for n, _ in outputs] == ["same", "a", "b"]
    assert result.parity["onnxruntime-cpu"].passed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ExportOptions(input_names=["a", "b", "c"]),
         r"^input_names=\['a', 'b', 'c'\]: 3 names for 2 inputs \(the model takes 2 tensors\)$"),
        (ExportOptions(output_names=["y"]),
         r"^output_names=\['y'\]: 1 name for 2 outputs \(the model returns 2 tensors\)$"),
        (ExportOptions(input_names=["a", "a"]),
         r"^input_names=\['a', 'a'\]: 'a' is given twice in input_names$"),
        (ExportOptions(input_names=["a", "b"], output_names=["b", "c"]),
         r"^output_names=\['b', 'c'\]: 'b' names both an input and an output$"),
        (ExportOptions(input_names=["a", "two words"]),
         r"^input_names=\['a', 'two words'\]: 'two words' is not a name \(a letter or _ followed by "),
        (ExportOptions(output_names="y"), r"^output_names='y': give a list of names, one per output$"),
    ],
)  # fmt: skip
def test_bad_names_are_usage_errors_in_the_api_words(tmp_path, options, message):
    model, x = _two()
    with pytest.raises(UsageError, match=message):
        export_onnx(model, x, tmp_path / "m.onnx", options=options)
    assert list(tmp_path.iterdir()) == []


class Doubled(nn.Module):
    """Its output's first axis is twice the batch: a derived size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.cat([y, -y], 0)


def test_dynamic_axes_are_named_in_derived_sizes_and_by_argument_name(tmp_path):
    model = randomize_bn(Doubled())
    x = (torch.randn(2, 2, 9, 7),)
    out = tmp_path / "m.onnx"
    options = ExportOptions(dynamic_axes={"x": {2: "height"}})
    result = export_onnx(normfold.fold(model, x).model, x, out, original=model, options=options)
    inputs, outputs = _io(out)
    assert inputs == [("x", ["batch", 2, "height", 7])]
    assert outputs == [("output", ["2*batch", 3, "height - 2", 5])]
    assert [vars(t) for t in result.outputs] == [
        {"name": "output", "dtype": "float", "shape": ["2*batch", 3, "height - 2", 5]}
    ]
    symbols = {
        d.dim_param for v in onnx.load(str(out)).graph.value_info for d in v.type.tensor_type.shape.dim
    }
    assert not [s for s in symbols if re.search(r"\bs\d+\b", s)], symbols  # no exporter symbol left
    with pytest.raises(UsageError, match=r"^ExportOptions.dynamic_axes\['y'\]: Doubled's forward has no "
                       r"argument y; it takes x$"):  # fmt: skip
        export_onnx(model, x, tmp_path / "n.onnx", options=ExportOptions(dynamic_axes={"y": {2: "height"}}))


def test_an_axis_the_model_fixes_cannot_be_dynamic(tmp_path):
    """torch.export keeps an axis it specialized as a SymInt of constant value (here 9): still fixed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 7, 3))  # the Linear fixes every axis but the batch
    x = (torch.randn(2, 2, 9, 7),)
    message = r"^ExportOptions.dynamic_axes\[0\]: the model fixes axis 2 \(height\) at 9, so it cannot vary$"
    with pytest.raises(UsageError, match=message):
        export_onnx(model, x, tmp_path / "m.onnx", options=ExportOptions(dynamic_axes={0: {2: "height"}}))
    assert list(tmp_path.iterdir()) == []


def test_the_result_describes_the_written_file(tmp_path):
    model, x = _two()
    folded = normfold.fold(model, x)
    out = tmp_path / "m.onnx"
    result = export_onnx(folded.model, x, out, original=model, program=folded.program)
    proto = onnx.load(str(out))
    expected_opset = next(o.version for o in proto.opset_import if o.domain == "")
    assert (result.opset, result.ir_version) == (expected_opset, proto.ir_version)
    assert result.producer == f"pytorch {torch.__version__}"
    assert result.size_bytes == out.stat().st_size
    assert result.parameters == sum(math.prod(t.dims) for t in proto.graph.initializer) > 0
    assert result.batchnorm_nodes == 0 and result.op_counts["Conv"] == 1
    shown = result.to_dict(parity=False)
    assert {k: shown[k] for k in ("opset", "ir_version", "producer", "size_bytes")} == {
        "opset": expected_opset, "ir_version": proto.ir_version, "producer": result.producer,
        "size_bytes": out.stat().st_size,
    }  # fmt: skip
    assert shown["inputs"] == [
        {"name": "image", "dtype": "float", "shape": ["batch", 3, 8, 8]},
        {"name": "features", "dtype": "float", "shape": ["batch", 5]},
    ]
    assert [o["shape"] for o in shown["outputs"]] == [["batch", 4, 8, 8], ["batch", 4]]


def test_the_file_is_written_once_never_reloaded_and_run_in_one_session(tmp_path, monkeypatch):
    """No onnx.load/onnx.save round trip after the export (the file was saved, loaded and saved
    again to name its axes, then loaded twice to check and describe it), and one onnxruntime
    session for every input set (one was opened per set)."""
    model, x = _two()
    folded = normfold.fold(model, x)
    calls: list[str] = []
    for name in ("load", "load_model", "save", "save_model"):
        real = getattr(onnx, name)
        monkeypatch.setattr(onnx, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    sessions = []
    real_session = ort.InferenceSession
    monkeypatch.setattr(
        ort, "InferenceSession", lambda *a, **k: sessions.append(a[0]) or real_session(*a, **k)
    )
    result = export_onnx(folded.model, x, tmp_path / "m.onnx", original=model, program=folded.program)
    assert calls == []
    assert len(sessions) == 1 and len(result.parity["onnxruntime-cpu"].outputs) >= 4  # 2 outputs x 2+ sets


def test_the_check_runs_on_the_cpu_by_default_and_refuses_a_provider_not_installed(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    x = (torch.randn(2, 4),)
    installed = ort.get_available_providers()
    assert "NoSuchExecutionProvider" not in installed
    shown = re.escape(", ".join(installed))
    message = (
        r"^providers=\['NoSuchExecutionProvider'\]: 'NoSuchExecutionProvider' is not installed in this "
        rf"onnxruntime {re.escape(ort.__version__)} \(installed: {shown}\)$"
    )
    with pytest.raises(UsageError, match=message):
        export_onnx(
            model, x, tmp_path / "m.onnx", options=ExportOptions(providers=["NoSuchExecutionProvider"])
        )
    with pytest.raises(UsageError, match=r"^providers='CPUExecutionProvider': give a list of onnxruntime"):
        export_onnx(model, x, tmp_path / "m.onnx", options=ExportOptions(providers="CPUExecutionProvider"))
    with pytest.raises(UsageError, match=r"^providers=\['CPUExecutionProvider', 'CPUExecutionProvider'\]: a "
                       r"provider is given twice$"):  # fmt: skip
        export_onnx(
            model, x, tmp_path / "m.onnx", options=ExportOptions(providers=["CPUExecutionProvider"] * 2)
        )
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(model, x, tmp_path / "m.onnx")
    assert list(result.parity) == ["onnxruntime-cpu"]
    result = export_onnx(model, x, tmp_path / "m.onnx", force=True,
                         options=ExportOptions(providers=["CPUExecutionProvider"]))  # fmt: skip
    assert list(result.parity) == ["onnxruntime-cpu"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime with CUDA and a GPU",
)
def test_the_check_runs_on_cuda_when_asked(tmp_path):  # pragma: no cover - GPU machines only
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = (torch.randn(2, 3, 16, 16),)
    providers = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    result = export_onnx(normfold.fold(model, x).model, x, tmp_path / "m.onnx", original=model,
                         options=ExportOptions(providers=providers))  # fmt: skip
    assert list(result.parity) == ["onnxruntime-cpu", "onnxruntime-cuda"]
    assert all(r.passed for r in result.parity.values())


def test_a_session_that_falls_back_from_the_provider_asked_for_is_an_error(tmp_path, monkeypatch):
    """onnxruntime runs on the CPU when it cannot use the provider asked for; a check that did so
    is refused instead of reported as that provider's."""
    model = nn.Linear(4, 3)
    x = (torch.randn(2, 4),)
    out = tmp_path / "m.onnx"
    export_onnx(model, x, out)
    real = ort.InferenceSession

    class FellBack(real):  # what onnxruntime gives when the provider could not be used
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["FastExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, providers: FellBack(path, options))
    with pytest.raises(ExportError, match=r"^onnxruntime could not run m.onnx on FastExecutionProvider \(it "
                       r"would run on CPUExecutionProvider\)$"):  # fmt: skip
        run_onnx(out, x, "FastExecutionProvider")


def test_library_messages_name_no_cli_flag():
    """The export modules speak the API's words (``static_batch=True``, ``out=``); the CLI
    translates them."""
    import normfold.io.export
    import normfold.io.onnx_file
    import normfold.io.onnx_run

    for module in (normfold.io.export, normfold.io.onnx_file, normfold.io.onnx_run):
        source = Path(module.__file__).read_text()
        assert re.findall(r"--[a-z][a-z-]+", source) == [], module.__name__


def test_onnx_only_options_are_refused_for_a_pt2(tmp_path):
    model = nn.Linear(4, 3)
    cpu = ["CPUExecutionProvider"]
    cases = [(ExportOptions(input_names=["x"]), r"input_names=\['x'\]"),
             (ExportOptions(providers=cpu), r"providers=\['CPUExecutionProvider'\]")]  # fmt: skip
    for options, word in cases:
        with pytest.raises(UsageError, match=rf"^{word} applies to an .onnx file, not out=.*m\.pt2$"):
            normfold.export_model(model, (torch.randn(2, 4),), tmp_path / "m.pt2", options=options)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_over_protobufs_limit_with_small_weights_goes_to_external_data(tmp_path, monkeypatch):
    """The weights decide external data, but protobuf refuses any message over 2 GB: when the
    serialized model is too large all the same, its weights go to external data after all."""
    import onnx_ir

    real = onnx_ir.serde.serialize_model
    calls = []

    class TooLarge:
        def SerializeToString(self):  # protobuf's name
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")

    def serialize(model):
        calls.append(1)
        return TooLarge() if len(calls) == 1 else real(model)

    monkeypatch.setattr(onnx_ir.serde, "serialize_model", serialize)
    model = randomize_bn(nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32)))
    x = (torch.randn(2, 64),)
    result = export_onnx(normfold.fold(model, x).model, x, tmp_path / "m.onnx", original=model)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and re.fullmatch(r"m\.onnx\.[0-9a-f]{12}\.data", names[1]), names
    assert result.parity["onnxruntime-cpu"].passed and len(calls) == 2
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
