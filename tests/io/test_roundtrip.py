"""A folded module saved with its structural edits and rebuilt from the user's own class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from normfold.models import example_inputs, mobileone, resnet
from torch import nn

import normfold
from normfold.errors import LoadError
from normfold.io.roundtrip import load_folded, save_folded


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_folded_resnet_loads_back_into_a_fresh_instance_of_its_class(tmp_path: Path, suffix: str) -> None:
    original, x = resnet(seed=3), example_inputs("resnet")
    result = normfold.fold(original, x)
    assert result.folded, "nothing folded: the round trip would prove nothing"
    with pytest.raises(RuntimeError):  # what a user hits without normfold's manifest
        resnet(seed=5).load_state_dict(result.model.state_dict())
    path = save_folded(result.model, tmp_path / f"folded{suffix}")
    rebuilt = load_folded(resnet(seed=5), path)  # other random weights: every value comes from the file
    assert sorted(rebuilt.state_dict()) == sorted(result.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), result.model(*x))  # the same module, value for value
    assert normfold.verify(original, rebuilt, x).passed


def test_merged_branches_are_rebuilt_too(tmp_path: Path) -> None:
    original, x = mobileone(seed=1), example_inputs("mobileone")
    result = normfold.fold(original, x, reparameterize=True)
    merged = [n for n, m in result.model.named_modules() if type(m).__name__ == "MergedBranch"]
    assert merged, "no branch was merged in the eager module: this test would prove nothing"
    rebuilt = load_folded(mobileone(seed=2), save_folded(result.model, tmp_path / "m.safetensors"))
    assert [n for n, m in rebuilt.named_modules() if type(m).__name__ == "MergedBranch"] == merged
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), result.model(*x))


def test_a_dropped_bias_stays_dropped(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    dropped = normfold.drop_redundant_biases(model, x).model
    assert dropped[0].bias is None
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    rebuilt = load_folded(fresh, save_folded(dropped, tmp_path / "d.pt"))
    assert rebuilt[0].bias is None


def test_a_file_without_the_manifest_or_for_another_class_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(resnet().state_dict(), plain)
    with pytest.raises(LoadError, match=r"plain.pt was not written by normfold.save_folded"):
        load_folded(resnet(), plain)
    x = example_inputs("resnet")
    path = save_folded(normfold.fold(resnet(), x).model, tmp_path / "f.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(LoadError, match=r"f.safetensors: the folded weights do not fit Sequential: "):
        load_folded(other, path)


def test_save_never_replaces_a_file_without_force(tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(normfold.UsageError, match="already exists"):
        save_folded(resnet(), out)
    assert out.read_bytes() == b"mine"
