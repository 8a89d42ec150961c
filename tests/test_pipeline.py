"""The one-call pipeline behind the CLI: inputs, batch widening, parity gate, step timings."""

from __future__ import annotations

import pytest
import torch

from normfold.check.parity import ParityRule
from normfold.errors import ParityError, UsageError
from normfold.pipeline import ExportOptions, InputSpec, WriteOptions, fold_and_export, inspect


def test_batch_one_shape_exports_a_dynamic_batch_and_checks_parity_on_two(tmp_path):
    run = fold_and_export(
        "normfold.models:resnet", tmp_path / "m.onnx", inputs=InputSpec(shapes=[(1, 3, 32, 32)])
    )
    assert run.input_shapes == [(1, 3, 32, 32)]
    assert run.parity.outputs[0].shape[0] == 2  # widened for parity
    assert run.export.parity["onnxruntime-cpu"].outputs[0].shape[0] == 2
    assert list(run.timings) == [
        "load",
        "capture and fold",
        "verify (pytorch)",
        "export (onnx)",
        "check (onnxruntime)",
    ]
    assert all(t >= 0 for t in run.timings.values())


def test_static_batch_keeps_the_given_batch(tmp_path):
    run = fold_and_export(
        "normfold.models:audio_cnn",
        tmp_path / "m.onnx",
        inputs=InputSpec(shapes=[(1, 1, 400)]),
        export=ExportOptions(static_batch=True),
    )
    assert run.parity.outputs[0].shape[0] == 1
    assert run.export.dynamic_batch is False


def test_inputs_file_with_batch_one_is_widened(tmp_path):
    torch.save(torch.randn(1, 64), tmp_path / "x.pt")
    run = fold_and_export("normfold.models:mlp", None, inputs=InputSpec(file=tmp_path / "x.pt"))
    assert run.export is None and run.parity.passed
    assert run.parity.outputs[0].shape == (2, 10)


def test_parity_failure_raises_before_anything_is_written(tmp_path):
    strict = ParityRule(rtol=0.0, atol=0.0, noise_factor=0.0)  # bit-exact: any reordered rounding fails
    with pytest.raises(
        ParityError, match=r"^folded model differs from the original model: output on normal inputs: "
    ):
        fold_and_export("normfold.models:resnet", tmp_path / "m.onnx", rule=strict)
    assert list(tmp_path.iterdir()) == []


def test_out_equal_to_input_is_refused(tmp_path):
    same = tmp_path / "m.onnx"
    same.write_bytes(b"x")
    with pytest.raises(UsageError, match="is an input of this run"):
        fold_and_export(str(same), same, write=WriteOptions(force=True))
    assert same.read_bytes() == b"x"


def test_unknown_shapes_for_a_non_zoo_factory_are_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(3, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UsageError, match=r"no input shape known for factory mynet:build: give InputSpec\.shapes"
    ):
        fold_and_export("mynet:build", tmp_path / "m.onnx")


def test_inspect_reports_every_norm_with_code_and_changes_nothing():
    run = inspect("normfold.models:mixed")
    rows = {r.norm: r for r in run.layers}
    assert len(rows) == 6
    assert (rows["bn_a"].action, rows["bn_a"].into, rows["bn_a"].pattern) == ("fold", "conv_a", "conv-bn")
    assert rows["bn_shared"].action == "keep" and rows["bn_shared"].code == "shared_producer"
    assert "shared.weight is used by 2 ops" in rows["bn_shared"].reason
    assert run.parity is None and run.export is None


@pytest.mark.parametrize("name", ["mixed", "mlp", "levit", "bn_head", "custom_bn", "same_pad"])
def test_inspect_decides_exactly_as_fold(name: str) -> None:
    """Same engine, same inputs (the batch widened, the batch axis dynamic): the same rows."""
    seen = inspect(f"normfold.models:{name}")
    done = fold_and_export(f"normfold.models:{name}", None)
    assert [vars(r) for r in seen.layers] == [vars(r) for r in done.layers]
    assert seen.summary() == done.summary()


def test_a_batch_of_one_widened_over_the_input_limit_is_refused_before_allocating(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 1 becomes a batch of 2 for a dynamic batch axis: that doubling is checked too."""
    monkeypatch.setattr("normfold.inputs.MAX_INPUT_ELEMENTS", 1000)  # the rule, at a small scale
    spec = InputSpec(shapes=[(1, 8, 63)])  # 504 elements: within the limit, doubled it is not
    message = r"^inputs of shape \(1, 8, 63\) are widened to a batch of 2 for a dynamic batch axis: 1,008 "
    with pytest.raises(
        UsageError,
        match=message + r"elements, .* set ExportOptions.static_batch=True or give smaller shapes$",
    ):
        fold_and_export("normfold.models:mlp", tmp_path / "o.onnx", inputs=spec)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_check_names_its_step_in_the_report(tmp_path, monkeypatch):
    """The written file differs from the original in onnxruntime (its outputs shifted): the
    report of the failed run names the step, ``check (onnxruntime)``, not null."""
    import json

    import normfold.io.export as export_mod
    from normfold.errors import ExportError

    real = export_mod.run_onnx
    monkeypatch.setattr(export_mod, "run_onnx", lambda *a: [t + 1.0 for t in real(*a)])
    report = tmp_path / "r.json"
    with pytest.raises(ExportError, match=r"^onnxruntime-cpu output differs from the original model: "):
        fold_and_export("normfold.models:mlp", tmp_path / "m.onnx", write=WriteOptions(report=report))
    failure = json.loads(report.read_text())["failure"]
    assert failure["step"] == "check (onnxruntime)"
    assert (failure["error"], failure["exit_code"]) == ("ExportError", 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


_CONSTANT = '''
import torch
from torch import nn


class Constant(nn.Module):
    """A conv + BN whose output a ReLU of a large negative bias kills: the same on every input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4).eval()
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)
            self.bn.bias.fill_(-1e4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + torch.tensor([1.5, -2.0, 0.25, 3.0]).view(1, 4, 1, 1)


def build():
    return Constant().eval()
'''


def test_an_output_that_ignores_the_input_is_not_called_different(tmp_path, monkeypatch):
    """Item 15: a model whose outputs are the same on every input set fails as 'could not be
    judged', naming why, not as 'differs from the original'."""
    (tmp_path / "constant_model.py").write_text(_CONSTANT)
    monkeypatch.syspath_prepend(str(tmp_path))
    undecided = r"^folded model: parity with the original model could not be judged: "
    with pytest.raises(ParityError, match=undecided) as e:
        fold_and_export("constant_model:build", tmp_path / "m.onnx", inputs=InputSpec(shapes=[(2, 3, 8, 8)]))
    assert "identical on all" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


def test_a_trace_error_on_widened_inputs_names_the_shapes_given() -> None:
    """Friction 8: a wrong shape with batch 1 fails on the widened batch of 2; the message also
    names the shape the user gave and why it changed (with a static batch, nothing to explain)."""
    from normfold.errors import TraceError

    with pytest.raises(TraceError) as e:
        inspect("normfold.models:resnet", inputs=InputSpec(shapes=[(1, 4, 32, 32)]))
    message = str(e.value)
    assert "(2, 4, 32, 32)" in message  # what torch.export saw
    assert message.endswith(
        "(the inputs given, of shape (1, 4, 32, 32), were widened to a batch of 2 for the dynamic batch "
        "axis; ExportOptions.static_batch=True keeps the batch as given)"
    )
    with pytest.raises(TraceError) as e:
        inspect(
            "normfold.models:resnet",
            inputs=InputSpec(shapes=[(1, 4, 32, 32)]),
            export=ExportOptions(static_batch=True),
        )
    assert "widened" not in str(e.value) and "(1, 4, 32, 32)" in str(e.value)


def test_fold_and_export_takes_a_module_and_its_tensors(tmp_path) -> None:
    """Friction 9: a module given as is, with a tensor or a tuple of tensors as inputs; the
    caller's module is left as it was; anything else as inputs is a UsageError naming it."""
    from normfold.models import example_inputs, mlp

    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (x,) = example_inputs("mlp")
    run = fold_and_export(model, tmp_path / "m.onnx", inputs=x)
    assert run.source == "module MLP" and run.parity.passed and run.export.path == tmp_path / "m.onnx"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    no_file = {"ops_written": None, "exporter_removed_batchnorms": None}
    assert fold_and_export(model, None, inputs=(x,)).summary() == run.summary() | no_file
    message = r"^inputs must be a tensor, a sequence of tensors .* got a list of int"
    with pytest.raises(UsageError, match=message):
        fold_and_export(model, None, inputs=[1, 2])


def test_swap_to_a_state_dict_needs_no_input_shape(tmp_path) -> None:
    """Friction 4: a GroupNorm swap written as a state dict does not trace the model."""
    from normfold.pipeline import swap_and_write

    (tmp_path / "noshape.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), "
        "torch.nn.BatchNorm2d(8)).eval()\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        run = swap_and_write("noshape:build", tmp_path / "g.pt", "group", num_groups=2)
    finally:
        sys.path.remove(str(tmp_path))
    assert [s.to_type for s in run.result.swapped] == ["GroupNorm"]
    state = torch.load(tmp_path / "g.pt", weights_only=True)
    assert state["1.weight"].shape == (8,)


def _kept_after_relu() -> torch.nn.Module:
    """Conv -> ReLU -> BN (kept: ``after_activation``), realistic statistics."""
    from helpers import randomize_bn

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(6))
    return randomize_bn(model, seed=3).eval()


def test_lower_kept_counts_as_normfolds_not_the_exporters(tmp_path):
    """Review of 805555c: a lowered BatchNormalization was counted as one the exporter removed."""
    run = fold_and_export(_kept_after_relu(), tmp_path / "m.onnx", inputs=torch.randn(2, 3, 8, 8),
                          export=ExportOptions(lower_kept="mul-add"))  # fmt: skip
    assert [s.code for s in run.fold.skipped] == ["after_activation"]
    assert run.export.batchnorm_nodes == 0 and [low.into for low in run.export.lowered] == ["Mul+Add"]
    assert run.summary()["exporter_removed_batchnorms"] == 0
    assert all(r.passed for r in run.export.parity.values())


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("m.pt2", r"^lower_kept='conv' applies to an \.onnx file, not out=.*m\.pt2$"),
        (None, r"^lower_kept='conv' applies to the \.onnx file written, and no out= was given$"),
    ],
)
def test_onnx_only_options_are_refused_before_any_work(tmp_path, out, message):
    steps = []
    with pytest.raises(UsageError, match=message):
        fold_and_export(
            _kept_after_relu(), tmp_path / out if out else None, inputs=torch.randn(2, 3, 8, 8),
            export=ExportOptions(lower_kept="conv"), write=WriteOptions(report=tmp_path / "r.json"),
            on_step=lambda *a: steps.append(a),
        )  # fmt: skip
    assert steps == [] and list(tmp_path.iterdir()) == []
