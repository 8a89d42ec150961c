"""MACs read from a captured program's graph, checked against the arithmetic of each layer."""

from __future__ import annotations

import pytest
import torch
from normfold.models import example_inputs, repvgg
from torch import nn
from torch.export import Dim

import normfold
from normfold.engine.costs import program_macs


@pytest.mark.parametrize(
    ("layer", "shape", "macs"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 10, 10), 2 * 8 * 10 * 10 * 3 * 9),
        (nn.Conv2d(8, 8, 3, groups=4), (2, 8, 10, 10), 2 * 8 * 8 * 8 * 2 * 9),
        (nn.Conv1d(4, 6, 5, stride=2), (3, 4, 21), 3 * 6 * 9 * 4 * 5),
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5), 2 * 4 * 5 * 5 * 6 * 9),
        (nn.Linear(7, 5), (2, 3, 7), 2 * 3 * 5 * 7),
    ],
    ids=["conv", "grouped", "conv1d-strided", "conv-transpose", "linear-3d"],
)
def test_macs_of_one_layer_at_the_example_size(layer: nn.Module, shape: tuple[int, ...], macs: int) -> None:
    x = torch.randn(*shape)
    program = torch.export.export(layer.eval(), (x,), dynamic_shapes=({0: Dim("batch")},))
    assert program_macs(program) == macs


def test_folding_keeps_macs_and_merging_branches_lowers_them() -> None:
    model, x = repvgg(), example_inputs("repvgg")
    folded = normfold.fold(model, x, reparameterize=False)
    assert folded.macs_before == folded.macs_after > 0  # a BN's scale and shift are not MACs
    merged = normfold.fold(model, x)
    assert merged.merged and merged.macs_after < merged.macs_before == folded.macs_before
