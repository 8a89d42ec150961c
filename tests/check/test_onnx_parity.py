"""normfold.check.onnx_parity: the runs of an ONNX model's parity check, and what it catches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_rows as rows
import pytest
import torch
from onnx import numpy_helper as nh

import normfold
from normfold.check import onnx_parity
from normfold.check.onnx_exact import initializer_tensors, perturbed_initializers, run_graph
from normfold.errors import ParityError


def _feeds(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}


def test_perturbed_runs_in_onnxruntime_are_the_interpreters_perturbed_runs() -> None:
    """The original's one session takes the perturbed initializers as overridable inputs: its run
    with seed k is the interpreter's float32 run of the same perturbed weights (to float32
    rounding), and not the unperturbed run (the feed is not silently ignored)."""
    original = rows.conv_bn_relu()
    feeds = _feeds()
    session = onnx_parity._fed_session(original, None)
    assert session is not None
    names = [o.name for o in session.session.get_outputs()]
    plain = onnx_parity._run(session, names, feeds)["y"]
    (ort_runs,) = onnx_parity._perturbed(original, [feeds], 2, session, names, None)
    (own_runs,) = onnx_parity._perturbed(original, [feeds], 2, None, names, None)
    scale = float(plain.abs().max())
    for ort_run, own_run in zip(ort_runs, own_runs, strict=True):
        assert float((ort_run["y"] - own_run["y"]).abs().max()) < 1e-5 * scale
        assert not torch.equal(ort_run["y"], plain)
    assert not torch.equal(ort_runs[0]["y"], ort_runs[1]["y"])  # one draw per seed


def test_perturbed_initializers_move_each_floating_weight_by_at_most_one_rounding() -> None:
    tensors = initializer_tensors(rows.conv_bn_relu())
    noisy = perturbed_initializers(tensors, 3)
    assert set(noisy) == {k for k, t in tensors.items() if t.is_floating_point()}
    for name, t in noisy.items():
        rel = ((t.double() - tensors[name].double()).abs() / tensors[name].double().abs()).max()
        assert t.dtype == tensors[name].dtype and 0 < float(rel) <= torch.finfo(torch.float32).eps
    again = perturbed_initializers(tensors, 3)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # seeded


def test_a_float16_model_is_perturbed_by_the_interpreter_in_float32() -> None:
    """The rule's perturbed runs of a float16 model are float32 runs: onnxruntime would run it in
    float16, so the interpreter makes them."""
    original = rows.conv_bn_relu()
    half = onnx.ModelProto()
    half.CopyFrom(original)
    weight = next(t for t in half.graph.initializer if t.name.endswith("weight"))
    weight.CopyFrom(nh.from_array(nh.to_array(weight).astype(np.float16), weight.name))
    assert onnx_parity._perturbable(original, _feeds())
    assert not onnx_parity._perturbable(half, _feeds())
    session = onnx_parity._session(original, None)
    assert not session.session.get_overridable_initializers()  # the plain session feeds none


def test_a_float16_models_perturbed_runs_open_no_session_and_a_failure_of_theirs_is_noted(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong candidate of a float16 model: its perturbed runs are the interpreter's, so no
    session of the original is opened again for them; a perturbed run that raises leaves the
    original's own error alone as the rule's noise, and the report says so (as the PyTorch path)."""
    half = onnx.ModelProto()
    half.CopyFrom(rows.conv_bn_relu())
    for t in half.graph.initializer:
        t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    for v in [*half.graph.input, *half.graph.output]:
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    wrong = onnx.ModelProto()
    wrong.CopyFrom(half)
    bias = next(t for t in wrong.graph.initializer if t.name == "conv.bias")
    value = nh.to_array(bias).copy()
    value[3] += 0.5
    bias.CopyFrom(nh.from_array(value, bias.name))
    feeds = {"x": _feeds()["x"].half()}
    opened: list[str] = []
    real_open = onnx_parity.open_session

    def counted(model, *args, **kwargs):
        opened.append(kwargs.get("name", ""))
        return real_open(model, *args, **kwargs)

    monkeypatch.setattr(onnx_parity, "open_session", counted)
    report = onnx_parity.parity_onnx(half, wrong, feeds, normfold.ParityRule())
    assert not report.passed and opened == ["the original model", "the folded model"]

    def broken(*args, **kwargs):
        raise RuntimeError("no float32 kernel for this op")

    monkeypatch.setattr(onnx_parity, "_perturbed", broken)
    report = onnx_parity.parity_onnx(half, wrong, feeds, normfold.ParityRule())
    assert not report.passed
    why = "no perturbed run (RuntimeError: no float32 kernel for this op); the model's own error alone"
    assert report.notes == (why,)


def test_the_folded_file_as_written_is_what_parity_judges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One channel of the folded conv's bias shifted by a tenth of a typical std in the file as
    written (after onnx.checker passed): the check fails against the original and nothing is
    written, not even a staging folder."""
    import normfold.onnx_fold as onnx_fold

    src = tmp_path / "m.onnx"
    onnx.save(rows.conv_bn_relu(), src)
    real = onnx_fold.write_onnx

    def corrupted(model, path, *, inline_limit):
        written = real(model, path, inline_limit=inline_limit)
        proto = onnx.load(str(path))
        bias = next(t for t in proto.graph.initializer if t.name.endswith("bias"))
        value = nh.to_array(bias).copy()
        value[3] += 0.1
        bias.CopyFrom(nh.from_array(value, bias.name))
        onnx.save(proto, path)
        return written

    monkeypatch.setattr(onnx_fold, "write_onnx", corrupted)
    with pytest.raises(ParityError) as failed:
        normfold.fold_onnx(src, tmp_path / "f.onnx")
    assert str(failed.value).startswith("the folded model differs from the original model: output['y']")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    monkeypatch.setattr(onnx_fold, "write_onnx", real)
    result = normfold.fold_onnx(src, tmp_path / "f.onnx")
    assert result.parity.passed and (tmp_path / "f.onnx").is_file()


def test_the_interpreter_reads_external_data_beside_the_model(tmp_path: Path) -> None:
    original = rows.conv_bn_relu()
    onnx.save(rows.conv_bn_relu(), tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)  # fmt: skip (onnx.save moves the data of the proto it is given)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    want = run_graph(original, _feeds())["y"]
    got = run_graph(lazy, _feeds(), initializers=initializer_tensors(lazy, base_dir=tmp_path))["y"]
    assert torch.equal(got, want)


def test_the_original_with_external_data_is_perturbed_in_onnxruntime(tmp_path: Path) -> None:
    """Its serialized copy (initializers listed as inputs) finds the data in the file's folder."""
    onnx.save(rows.levit_matmul_reshape_bn(), tmp_path / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=256)  # fmt: skip
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    session = onnx_parity._fed_session(lazy, tmp_path / "m.onnx")
    assert session is not None
    fed = {i.name for i in session.session.get_overridable_initializers()}
    assert fed == {"qkv", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}


def test_the_originals_session_is_freed_before_the_candidates_opens(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory: the two sessions (each holding a model's weights) are never alive together."""
    import gc
    import weakref

    real = onnx_parity.open_session
    opened: list[weakref.ref] = []

    def tracked(model, *args, **kwargs):
        if kwargs.get("name") == "the folded model":
            gc.collect()
            assert opened and all(r() is None for r in opened), "the original's session is still alive"
        session = real(model, *args, **kwargs)
        opened.append(weakref.ref(session.session))
        return session

    monkeypatch.setattr(onnx_parity, "open_session", tracked)
    assert normfold.fold_onnx(rows.conv_bn_relu()).parity.passed


def test_perturbed_runs_are_made_only_for_a_candidate_not_within_the_rule_by_own_error(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``check.reference.check``: an exact fold passes by the original's own error alone, and
    the perturbed runs only add noise, so they are not made for it; a wrong candidate is judged by
    the whole rule, perturbed runs included (the original's session opened again for them)."""
    made: list[int] = []
    real = onnx_parity._perturbed

    def counted(model, typed, count, session, *args):
        made.append(count)
        assert session is not None  # run in the original's own session, reopened
        return real(model, typed, count, session, *args)

    fed: list[int] = []  # sessions of a copy whose initializers can be fed: for perturbed runs only
    real_inputs = onnx_parity._with_initializer_inputs

    def serialized(model, names):
        fed.append(len(names))
        return real_inputs(model, names)

    monkeypatch.setattr(onnx_parity, "_perturbed", counted)
    monkeypatch.setattr(onnx_parity, "_with_initializer_inputs", serialized)
    original = rows.conv_bn_relu()
    result = normfold.fold_onnx(original)
    assert result.parity.passed and made == [] and fed == []
    wrong = onnx.ModelProto()
    wrong.CopyFrom(result.model)
    bias = next(i for i in wrong.graph.initializer if i.name.endswith("bias"))
    value = nh.to_array(bias).copy()
    value[3] += 0.1  # one channel shifted by a tenth of a typical std
    bias.CopyFrom(nh.from_array(value, bias.name))
    report = onnx_parity.parity_onnx(original, wrong, _feeds(), normfold.ParityRule())
    assert not report.passed and made == [4] and fed == [len(original.graph.initializer)]
