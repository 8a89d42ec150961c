"""normfold.engine.records: a folded weight computed a block of rows at a time is the whole-weight
float64 computation, cast once, bit for bit (whatever the block size), and the weight it reads
stays as it was."""

from __future__ import annotations

import pytest
import torch

from normfold.engine import records
from normfold.engine.records import LayerUpdate, RowBlocks


def _update(channels: int, in_out: bool, seed: int) -> LayerUpdate:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=g, dtype=torch.float64) * 3 + 0.01
    shift = torch.randn(channels, generator=g, dtype=torch.float64) * 5
    return LayerUpdate("conv", "layer", "Conv2d", "conv", "layer.weight", "layer.bias", 1, in_out, "output",
                       scale, shift)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_row_blocks_equal_the_whole_weight_cast_once(dtype: torch.dtype, in_out: bool) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (1300, 48, 3, 3) if not in_out else (9000, 96)  # several blocks of records._CHUNK elements
    weight = (torch.randn(shape, generator=g) * 0.2 + 0.05).to(dtype)
    assert weight.numel() > 2 * records._CHUNK
    channels = shape[1] if in_out else shape[0]
    first, second = _update(channels, in_out, 2), _update(channels, in_out, 3)
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    before = weight.clone()
    rows, shift = RowBlocks.of(weight, bias, [first, second])
    scale = second.scale * first.scale  # the two maps composed per channel
    view = (1, -1) if in_out else (-1, 1, 1, 1)
    expected = (weight.double() * scale.reshape(view)).to(dtype)
    assert torch.equal(rows.tensor(), expected)
    assert len(list(rows.blocks())) > 1
    assert torch.equal(weight, before)  # the weight folded is read, never written (float64 too)
    expected_shift = second.scale * (first.scale * bias + first.shift) + second.shift
    assert torch.equal(shift, expected_shift)
