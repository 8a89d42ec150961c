"""``normfold fold-norms``: one library call (:func:`normfold.pipeline.fold_norms_and_write`), the
norms' scales and shifts folded into their Linear layers, written as weights that load into the
user's own class, or as an export checked against the loaded model."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import invoke, ok
from safetensors.torch import load_file

_FACTORY = '''
import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm block: LayerNorm -> q/k/v, a residual; then a tied head after a final norm."""

    def __init__(self, d=16, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.final = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n in (self.norm, self.final):
                n.weight.copy_(torch.rand(d, generator=g) + 0.5)
                n.bias.copy_(torch.rand(d, generator=g) - 0.5)

    def forward(self, tokens):
        x = self.embed(tokens)
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        return self.head(self.final(x + a))


def build():
    torch.manual_seed(0)  # the same weights on every call: the test rebuilds the original
    return Block().eval()
'''


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"nf_norms_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(_FACTORY)
    yield f"{name}:build"
    sys.modules.pop(name, None)


def _tokens(path: Path) -> Path:
    torch.save([torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))], path)
    return path


def test_folds_into_the_linears_and_writes_weights_the_class_loads(tmp_path: Path, factory: str) -> None:
    inputs = _tokens(tmp_path / "tokens.pt")
    args = ("--inputs", inputs, "--out", "folded.safetensors", "--report", "r.json")
    lines = ok("fold-norms", factory, *args).stdout.splitlines()
    # the first norm feeds only Linears: folded; v has no bias, so the shift stays in the norm
    folded = "folded norm (LayerNorm) into q.weight, k.weight, v.weight (new_bias_needed: v has no bias"
    assert any(ln.startswith(folded) for ln in lines), lines
    assert any(ln.startswith("kept final: tied_weight: ") for ln in lines), lines
    assert "proved against the loaded model: pass" in lines
    assert lines[-1] == "folded 1 norms, kept 1; wrote folded.safetensors"
    state = load_file(tmp_path / "folded.safetensors")
    module = __import__(factory.split(":")[0])
    original, fresh = module.build(), module.build()
    fresh.load_state_dict(state, strict=True)  # the user's own class takes the folded weights
    tokens = torch.load(inputs)[0]
    with torch.no_grad():  # run in float64: the only difference left is the folded weights' rounding
        want, got = original.double()(tokens), fresh.double()(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # a wrong fold moves logits by ~1e-1
    assert torch.equal(state["norm.weight"], torch.ones(16))  # the norm is parameter-free
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "ok" and report["command"] == "fold-norms"
    # the discovered map, in the forms other tools take (the tied head's norm stays: not listed)
    assert report["mappings"]["aimet"] == [["norm", ["q", "k", "v"]]]
    assert report["mappings"]["llm-compressor"] == [{"norm": "norm", "linears": ["q", "k", "v"]}]
    assert report["mappings"]["autoround"][0]["balance_layers"] == ["^q$", "^k$", "^v$"]


def test_untie_folds_the_tied_head_too(tmp_path: Path, factory: str) -> None:
    inputs = _tokens(tmp_path / "tokens.pt")
    lines = ok("fold-norms", factory, "--inputs", inputs, "--untie", "--out", "u.pt").stdout.splitlines()
    folded = "folded final (LayerNorm) into head.weight; untied head.weight"
    assert any(ln.startswith(folded) for ln in lines), lines
    assert lines[-1] == "folded 2 norms, kept 0; wrote u.pt"


def test_an_export_is_checked_against_the_loaded_model(tmp_path: Path, factory: str) -> None:
    inputs = _tokens(tmp_path / "tokens.pt")
    lines = ok("fold-norms", factory, "--inputs", inputs, "--out", "m.onnx").stdout.splitlines()
    assert any(ln.startswith("exported m.onnx (onnx") for ln in lines), lines
    assert "checked in onnxruntime-cpu: pass (1 comparison)" in lines, lines  # one input set, one output


def test_without_inputs_it_says_what_it_needs(tmp_path: Path, factory: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("fold-norms", factory, "--out", "x.safetensors")
    assert result.exit_code == 2
    assert "no input shape known" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_checkpoint_folder_is_folded_into_a_folder(tmp_path: Path, factory: str) -> None:
    """MODEL a safetensors checkpoint folder: the architecture built on the meta device, the fold
    written shard by shard (normfold.fold_norm_affine_checkpoint), the same weights as a file."""
    from safetensors.torch import save_file

    inputs = _tokens(tmp_path / "tokens.pt")
    ok("fold-norms", factory, "--inputs", inputs, "--out", tmp_path / "file.safetensors")  # in memory
    module = __import__(factory.split(":")[0])
    original = module.build()
    state = {k: v for k, v in original.state_dict().items() if k != "head.weight"}  # tied: one name
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    args = ("--model", factory, "--inputs", inputs, "--report", "r.json")
    lines = ok("fold-norms", tmp_path / "ckpt", *args, "--out", tmp_path / "out").stdout.splitlines()
    assert any(ln.startswith("kept final: tied_weight: ") for ln in lines), lines
    assert lines[-2] == "proved norm by norm (each with its consumers): pass (1)"
    assert lines[-1] == f"folded 1 norms, kept 1; wrote 1 files into {tmp_path / 'out'}"
    folded = load_file(tmp_path / "out" / "model.safetensors")
    reference = load_file(tmp_path / "file.safetensors")
    assert set(folded) == set(state) == set(reference) - {"head.weight"}  # the tied head: tied back on load
    assert all(torch.equal(t, reference[k]) for k, t in folded.items())  # bit-equal to the in-memory fold
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "ok" and report["mappings"]["aimet"] == [["norm", ["q", "k", "v"]]]
    refused = invoke("fold-norms", tmp_path / "ckpt", *args, "--out", tmp_path / "o2", "--opset", "18")
    assert refused.exit_code == 2 and "--opset: only for an export" in refused.output
    missing = invoke("fold-norms", tmp_path / "ckpt", "--inputs", inputs, "--out", tmp_path / "o3")
    assert missing.exit_code == 2 and "give its architecture with --model" in missing.output
