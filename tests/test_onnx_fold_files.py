"""normfold.fold_onnx / fold_onnx_file on files: external data in and out, the file rules, one plan."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_rows as rows
import pytest
import torch
from onnx import numpy_helper as nh

import normfold
import normfold.io.export as export_mod
import normfold.onnx_fold as onnx_fold
from normfold.errors import ParityError
from normfold.options import FoldOptions


def _external(folder: Path, name: str = "m.onnx") -> Path:
    """``rows.levit_matmul_reshape_bn`` (a Reshape to constant shapes, a MatMul, a BN) saved with
    its floating initializers in ``<name>.data`` (the Reshape shapes inline, as exporters keep
    small tensors: onnxruntime reads no shape from external data)."""
    folder.mkdir(exist_ok=True)
    onnx.save(rows.levit_matmul_reshape_bn(), folder / name, save_as_external_data=True,
              location=f"{name}.data", size_threshold=256)  # fmt: skip
    return folder / name


def _bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def test_external_data_in_and_out_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read beside the source (the working directory elsewhere); with the inline limit at one
    byte the output's weights go to ``<out>.<hash>.data`` beside it, named by their content."""
    src = _external(tmp_path / "in")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    run = normfold.fold_onnx_file(src, out)
    assert run.parity.passed and run.parity.notes == ()  # the float64 reference read the data too
    (data,) = out.parent.glob("f.onnx.*.data")
    assert re.fullmatch(r"f\.onnx\.[0-9a-f]{12}\.data", data.name)
    assert run.export.files == [data, out]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([data.name, "f.onnx"])
    onnx.checker.check_model(str(out), full_check=True)
    lazy = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {t.name for t in onnx.load(str(out)).graph.initializer if len(t.raw_data) >= 256}
    assert "qkv" in external  # the folded weight; tensors under 256 bytes stay in the proto
    folded = onnx.load(str(out))
    assert _bn(folded) == 0
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32) * 3  # other values
    from normfold.io.onnx_run import open_session

    want = open_session(src).session.run(None, {"x": x})[0]
    got = open_session(out).session.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # untouched


def test_external_data_in_small_model_out_inline(tmp_path: Path) -> None:
    src = _external(tmp_path)
    result = normfold.fold_onnx(src, tmp_path / "f.onnx")
    assert result.parity.passed and result.out == tmp_path / "f.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "m.onnx", "m.onnx.data"]
    assert _bn(onnx.load(str(tmp_path / "f.onnx"))) == 0


def test_the_folded_weights_written_lazily_are_the_plans_values() -> None:
    """The weights computed when the model is serialized are exactly :meth:`Plan.values`."""
    original = rows.conv_bn_relu()
    planned = onnx_fold.prepare(original, None, None)
    want = planned.plan.values(planned.values)
    folded = normfold.fold_onnx(original).model
    got = {t.name: torch.from_numpy(nh.to_array(t).copy()) for t in folded.graph.initializer}
    assert set(want) <= set(got)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_failed_check_leaves_no_output_and_no_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _external(tmp_path)
    monkeypatch.setattr(export_mod, "_ONNX_MAX_PROTO", 1)
    real = onnx_fold.write_onnx

    def corrupted(model, path, *, inline_limit):
        written = real(model, path, inline_limit=inline_limit)
        (data,) = path.parent.glob(f"{path.name}.*.data")
        proto = onnx.load(str(path), load_external_data=False)
        tensor = next(t for t in proto.graph.initializer if t.name == "qkv")
        offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
        with data.open("r+b") as f:  # one weight of the written data, scaled by 1.1
            f.seek(offset)
            value = np.frombuffer(f.read(4), dtype=np.float32) * np.float32(1.1)
            f.seek(offset)
            f.write(value.tobytes())
        return written

    monkeypatch.setattr(onnx_fold, "write_onnx", corrupted)
    with pytest.raises(ParityError) as failed:
        normfold.fold_onnx_file(src, tmp_path / "f.onnx")
    assert str(failed.value).startswith("the folded model differs from the original model: output['y']")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_require_all_plans_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import normfold.onnx_pipeline as pipeline

    src = tmp_path / "m.onnx"
    onnx.save(rows.conv_bn_relu(), src)
    calls = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(onnx_fold, "prepare", lambda *a, **k: pytest.fail("planned a second time"))
    run = normfold.fold_onnx_file(src, tmp_path / "f.onnx", folding=FoldOptions(require_all=True))
    assert calls == [1] and run.parity.passed and [f.norm for f in run.result.folded] == ["bn"]


def test_inspect_and_plan_read_external_data_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _external(tmp_path / "in")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    found = normfold.inspect_onnx(src)
    assert [(f.norm, f.pattern) for f in found.result.folded] == [("bn", "linear-bn")]
    assert [(f.norm, f.pattern) for f in normfold.plan_onnx(src).folded] == [("bn", "linear-bn")]


def test_a_node_the_lowering_leaves_is_noted_with_the_file_written(tmp_path: Path) -> None:
    """As on the PyTorch path: the lowering's notes are the export's (``report["export"]["notes"]``),
    not repeated in the run's; without a file written they stay the run's."""
    from normfold.options import ExportOptions

    b = rows.Builder(62)
    b.bn(b.conv("x", 3, 8, "conv"), 8, "bn", training_mode=1)
    b.nodes[-1].output.extend(["bn_mean", "bn_var"])
    b.node("Relu", ["bn"], "y")
    src = tmp_path / "m.onnx"
    onnx.save(b.model([("x", ["N", 3, 8, 8])], [("y", ["N", 8, 8, 8])], opset=15), src)
    note = ("kept BatchNormalization bn not lowered: it runs in training mode (batch statistics), which no "
            "constant map reproduces")  # fmt: skip
    run = normfold.fold_onnx_file(src, tmp_path / "f.onnx", export=ExportOptions(lower_kept="mul-add"))
    assert run.export is not None and run.export.notes == [note]
    assert note not in run.notes and run.to_dict()["export"]["notes"] == [note]
    plain = normfold.fold_onnx_file(src, None, export=ExportOptions(lower_kept="mul-add"))
    assert plain.export is None and note in plain.notes
