"""Reparameterization regressions (issue 18): what is handed out (``result.model`` and
``result.program``) gives the original's outputs, and planning the result again finds nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import bn_ops, exported, randomize_bn
from torch import nn

import normfold

# --- an export-only fold next to a merged block (item 2) ---------------------------------------------


class ExportOnlyNextToBlock(nn.Module):
    """``a(x) + bn(b(x))`` (two 1x1 convs: a RepVGG-like block that merges into ``a``) with forward
    code that folds in the export only: a literal or an ``F.batch_norm``, before the block, on the
    merge target, on the other branch, or after the block."""

    def __init__(self, where: str, c: int = 4) -> None:
        super().__init__()
        self.where = where
        self.a, self.b, self.bn = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        gen = torch.Generator().manual_seed(7)
        self.register_buffer("mean", torch.randn(c, generator=gen) * 2 + 1)
        self.register_buffer("var", torch.rand(c, generator=gen) * 3 + 0.3)
        self.register_buffer("gamma", torch.rand(c, generator=gen) + 0.5)
        self.register_buffer("beta", torch.randn(c, generator=gen))

    def functional_bn(self, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, self.mean, self.var, self.gamma, self.beta, False, 0.0, 1e-5)

    def forward(self, x):
        w = self.where
        x = x + 100.0 if w == "shift_before" else self.functional_bn(x) if w == "bn_before" else x
        a = self.a(x)
        a = a * 2.0 if w == "scale_target" else self.functional_bn(a) if w == "bn_target" else a
        b = self.b(x)
        b = b * -3.0 if w == "scale_branch" else self.functional_bn(b) if w == "bn_branch" else b
        y = a + self.bn(b)
        return y * 0.5 - 7.0 if w == "scale_after" else self.functional_bn(y) if w == "bn_after" else y


#: where the export-only code sits -> how the merge lands in the module: where the block's branches
#: in the eager module are the program's, it merges there too, from the module's own values
_EAGER_MERGE = {
    "shift_before": "both",
    "bn_before": "both",
    "scale_after": "both",
    "bn_after": "both",
    "scale_target": "export",
    "bn_target": "export",
    "scale_branch": "export",
    "bn_branch": "export",
}


@pytest.mark.parametrize("where", sorted(_EAGER_MERGE))
def test_export_only_fold_next_to_a_merged_block_is_not_applied_twice(where):
    torch.manual_seed(0)
    model = randomize_bn(ExportOnlyNextToBlock(where))
    x = torch.randn(2, 4, 6, 6)
    result = normfold.reparameterize(model, x)
    (merge,) = result.merged
    assert merge.into == "a"
    assert any(f.where == "export" for f in result.folded)  # the forward code folded in the export
    assert merge.where == _EAGER_MERGE[where]
    if merge.where == "export":  # the note names the export-only fold that changes the block's branch
        assert merge.note is not None and merge.note.startswith("merged in the export only: the eager module")
        assert "folded in the export only" in merge.note
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()
    assert result.replan_folds == 0
    assert bn_ops(result.program) == 0
