"""Export: checked files written atomically; any failed check leaves the folder as it was."""

from __future__ import annotations

import copy
import re

import onnx
import pytest
import torch
from helpers import randomize_bn
from normfold.models import ZOO, example_inputs
from torch import nn

import normfold
import normfold.io.export as export_mod
from normfold.check.parity import ParityRule
from normfold.check.reference import Reference, make_reference, parity_sets
from normfold.errors import ExportError, UsageError
from normfold.io.export import ExportOptions, export_model, export_onnx, run_onnx, write_state_dict

RULE = ParityRule()


def _reference(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Reference:
    """The original model's outputs on the parity input sets of ``x``, and its float64 run."""
    return make_reference(model, parity_sets(x, RULE), RULE)


@pytest.fixture(scope="module")
def folded_resnet():
    model = ZOO["resnet"].factory()
    x = example_inputs("resnet")
    return model, normfold.fold(model, x).model, x


def _batch_dim(path) -> int | str:
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param


def test_onnx_export_is_checked_against_the_original(folded_resnet, tmp_path):
    model, folded, x = folded_resnet
    out = tmp_path / "m.onnx"
    result = export_onnx(folded, x, out, original=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert result.files == [out] and result.batchnorm_nodes == 0
    assert result.opset is not None and result.opset >= 17
    report = result.parity["onnxruntime-cpu"]
    assert report.passed and {o.inputs for o in report.outputs} == {"given", "normal", "uniform[0,255]"}
    assert isinstance(_batch_dim(out), str)  # dynamic batch by default
    # the written file runs on another batch size and still matches the original
    x3 = (torch.randn(3, *x[0].shape[1:]),)
    [got] = run_onnx(out, x3, "CPUExecutionProvider")
    want = normfold.run_model(model, x3)
    assert (got - want).abs().max() <= 1e-6 + 1e-5 * want.abs().max()


def test_static_batch_fixes_the_batch_dim(folded_resnet, tmp_path):
    _, folded, x = folded_resnet
    out = tmp_path / "s.onnx"
    export_model(folded, x, out, options=ExportOptions(static_batch=True))
    assert _batch_dim(out) == x[0].shape[0]


def test_pt2_export_round_trips(folded_resnet, tmp_path):
    model, folded, x = folded_resnet
    result = export_model(folded, x, tmp_path / "m.pt2", original=model)
    assert result.format == "pt2" and result.parity["torch.export"].passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_wrong_export_raises_and_writes_nothing(folded_resnet, tmp_path):
    model, folded, x = folded_resnet
    right = _reference(model, x)
    shifted = [o + 0.5 for o in right.outputs]  # a reference the export cannot match
    wrong = Reference(right.sets, shifted, shifted)
    message = r"^onnxruntime-cpu output differs from the original model: output on given inputs: "
    with pytest.raises(ExportError, match=message):
        export_onnx(folded, x, tmp_path / "m.onnx", original=wrong)
    assert list(tmp_path.iterdir()) == []


def test_original_is_what_the_written_file_is_judged_against(folded_resnet, tmp_path):
    """``original=`` the model before folding: a wrong fold fails the export even though the
    file matches the (wrong) folded model it was written from; the right fold passes."""
    model, folded, x = folded_resnet
    wrong = copy.deepcopy(folded)
    with torch.no_grad():
        wrong.conv1.bias.add_(0.05)  # a fold that forgot part of a shift
    message = r"^onnxruntime-cpu output differs from the original model: output on given inputs: "
    with pytest.raises(ExportError, match=message):
        export_onnx(wrong, x, tmp_path / "m.onnx", original=model)
    assert list(tmp_path.iterdir()) == []
    assert export_onnx(wrong, x, tmp_path / "self.onnx").parity["onnxruntime-cpu"].passed  # itself: no proof
    result = export_onnx(folded, x, tmp_path / "m.onnx", original=model)
    assert result.parity["onnxruntime-cpu"].passed


def test_export_onnx_takes_only_its_own_keywords(folded_resnet, tmp_path):
    """An explicit signature: a keyword it does not take (README once showed ``reference_outputs=``)
    is a TypeError naming it, not swallowed by ``**kwargs``."""
    _, folded, x = folded_resnet
    with pytest.raises(TypeError, match="unexpected keyword argument 'reference_outputs'"):
        export_onnx(folded, x, tmp_path / "m.onnx", reference_outputs=None)
    with pytest.raises(UsageError, match=r"^export_onnx writes .onnx files, got out=.*m\.pt2$"):
        export_onnx(folded, x, tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_force(folded_resnet, tmp_path):
    _, folded, x = folded_resnet
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass force=True to replace it"):
        export_onnx(folded, x, out)
    assert out.read_bytes() == b"keep me"
    export_onnx(folded, x, out, force=True)
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize(
    ("name", "message"),
    [("m.txt", "unknown format .txt; use .onnx or .pt2"), ("missing/m.onnx", "does not exist")],
)
def test_bad_destination_is_a_usage_error(tmp_path, name, message):
    with pytest.raises(UsageError, match=message):
        export_model(nn.Linear(2, 2), (torch.zeros(2, 2),), tmp_path / name)


def test_large_models_use_external_data(folded_resnet, tmp_path, monkeypatch):
    # The 2 GB protobuf limit, lowered so a small model takes the same path.
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1)
    model, folded, x = folded_resnet
    out = tmp_path / "big.onnx"
    result = export_onnx(folded, x, out, original=model)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "big.onnx", names
    assert re.fullmatch(r"big\.onnx\.[0-9a-f]{12}\.data", names[1]), names  # named by its content
    assert result.files == [tmp_path / names[1], out]  # the model file lands last, after its data
    assert result.parity["onnxruntime-cpu"].passed
    onnx.checker.check_model(str(out), full_check=True)

    # Without force neither the model nor its data is replaced.
    with pytest.raises(UsageError, match="already exists; pass force=True"):
        export_onnx(folded, x, out, original=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == names

    # A re-export of other weights: new data beside the new model, the replaced model's data removed.
    model, folded = copy.deepcopy(model), copy.deepcopy(folded)  # the fixture is shared
    with torch.no_grad():
        folded.fc.weight.mul_(1.5)  # large enough to live in the external data
        model.fc.weight.mul_(1.5)
    export_onnx(folded, x, out, original=model, force=True)
    again = sorted(p.name for p in tmp_path.iterdir())
    assert len(again) == 2 and again[0] == "big.onnx" and again[1] != names[1], again
    onnx.checker.check_model(str(out), full_check=True)


class DataDependentReshape(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)  # hard-codes the batch: a dynamic batch cannot export


def test_export_failure_names_the_fix_and_writes_nothing(tmp_path):
    message = r"torch.export failed for DataDependentReshape \(set ExportOptions.static_batch=True\)"
    with pytest.raises(ExportError, match=message):
        export_onnx(DataDependentReshape(), (torch.randn(2, 3),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    export_onnx(
        DataDependentReshape(),
        (torch.randn(2, 3),),
        tmp_path / "m.onnx",
        options=ExportOptions(static_batch=True),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


TOP_OPSET = onnx.defs.onnx_opset_version()


@pytest.mark.parametrize("opset", [1, 17, TOP_OPSET + 1, 99, True, 18.0])
def test_an_opset_the_exporter_cannot_give_is_refused_before_work(tmp_path, opset):
    with pytest.raises(UsageError, match=rf"^opset {opset!r} is not supported: choose 18 to {TOP_OPSET}$"):
        export_onnx(
            nn.Linear(2, 2), (torch.zeros(2, 2),), tmp_path / "m.onnx", options=ExportOptions(opset=opset)
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [18, TOP_OPSET])
def test_the_opset_asked_for_is_the_opset_written(tmp_path, opset, caplog):
    model = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval()
    x = (torch.randn(2, 4),)
    result = export_onnx(normfold.fold(model, x).model, x, tmp_path / "m.onnx", original=model,
                         options=ExportOptions(opset=opset))  # fmt: skip
    assert result.opset == opset
    assert [(o.domain, o.version) for o in onnx.load(str(tmp_path / "m.onnx")).opset_import
            if o.domain in ("", "ai.onnx")] == [("", opset)]  # fmt: skip
    assert result.parity["onnxruntime-cpu"].passed
    assert not [r for r in caplog.records if "version conversion" in r.getMessage()]  # no converter noise


@pytest.mark.parametrize("name", ["m.pt2", "m.pt", "m.onnx"])
def test_a_full_disk_is_an_export_error_not_an_abort(tmp_path, monkeypatch, name):
    """torch's zip writer aborts the process on a full disk (exit 134): files are serialized in
    memory and written by Python, whose OSError becomes an ExportError; nothing is left."""
    from pathlib import Path

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    model = randomize_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval()
    with pytest.raises(ExportError, match=rf"^writing {name} failed: No space left on device$"):
        if name.endswith((".pt2", ".onnx")):
            export_model(model, (torch.randn(2, 4),), tmp_path / name)
        else:
            write_state_dict(model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_weights_onnx_cannot_hold_or_run_are_refused_with_the_way_out(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    bf16 = normfold.fold(model.bfloat16(), (x.bfloat16(),)).model
    message = r"weights are bfloat16, which ONNX Conv and Gemm do not accept; write a .pt2 instead"
    with pytest.raises(ExportError, match=message):
        export_model(bf16, (x.bfloat16(),), tmp_path / "m.onnx")
    f64 = normfold.fold(model.double(), (x.double(),)).model
    message = r"failed to run m.onnx: .*NOT_IMPLEMENTED.* \(onnxruntime has no kernel for that op in the"
    with pytest.raises(ExportError, match=message + r" model's dtype: write a .pt2 instead"):
        export_model(f64, (x.double(),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    export_model(f64, (x.double(),), tmp_path / "m.pt2")  # the way out works
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def _kept_bn_model() -> tuple[nn.Module, torch.Tensor]:
    """Conv -> ReLU -> BN: the BN after the activation stays (``after_activation``)."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6))
    randomize_bn(model, seed=5)
    return model.eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("form", "op"), [("mul-add", "Mul"), ("conv", "Conv")])
def test_lower_kept_writes_the_kept_batch_norms_as_other_ops(tmp_path, form, op):
    model, x = _kept_bn_model()
    result = normfold.fold(model, x)
    assert [s.code for s in result.skipped] == ["after_activation"]
    out = tmp_path / "m.onnx"
    written = export_onnx(result.model, (x,), out, original=model, program=result.program,
                          options=ExportOptions(lower_kept=form))  # fmt: skip
    graph = onnx.load(str(out)).graph
    assert [n.op_type for n in graph.node].count("BatchNormalization") == 0
    assert written.batchnorm_nodes == 0 and len(written.lowered) == 1
    assert written.lowered[0].into == ("Mul+Add" if form == "mul-add" else "Conv")
    assert [n.op_type for n in graph.node].count(op) == 1 + (op == "Conv")
    assert written.parity and all(r.passed for r in written.parity.values())
    assert written.to_dict()["lowered"] == [vars(written.lowered[0])]


def test_lower_kept_is_refused_for_a_pt2_and_for_an_unknown_form(tmp_path):
    model, x = _kept_bn_model()
    with pytest.raises(UsageError, match=r"^lower_kept='conv' applies to an \.onnx file, not out="):
        export_model(model, (x,), tmp_path / "m.pt2", options=ExportOptions(lower_kept="conv"))
    with pytest.raises(UsageError, match=r"^lower_kept must be 'mul-add' or 'conv', got 'Mul'$"):
        export_model(model, (x,), tmp_path / "m.onnx", options=ExportOptions(lower_kept="Mul"))
    assert not list(tmp_path.iterdir())
