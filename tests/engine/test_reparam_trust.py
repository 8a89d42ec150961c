"""Reparameterization regressions (issue 18): what is handed out (``result.model`` and
``result.program``) gives the original's outputs, and planning the result again finds nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import bn_ops, exported, randomize_bn
from torch import nn

import normfold
from normfold.engine.reparam_eager import MergedBranch

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


# --- re-planning after merges reaches a fixpoint (item 3) -------------------------------------------


class NormAfterBareIdentity(nn.Module):
    """``bn(h + c(h))`` after a strided ConvTranspose: ``h`` has two users, so ``bn`` stays in the
    first plan; once the block (identity + 1x1 conv) is merged, ``bn`` follows that conv."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 8, 1, stride=2)
        self.c = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.up(x)
        return self.bn(h + self.c(h))


class NormAfterModuleBlock(nn.Module):
    """``out(a(x) + b(x) + skip(x))``: every branch a module (the merge lands in the module too);
    ``out`` stays in the first plan (the identity branch's norm is no layer), then folds into the
    merged conv, in both. ``head``: then a conv with an ``F.batch_norm`` (folded in the export
    only, elsewhere: it does not keep the later round out of the module)."""

    def __init__(self, c: int = 6, head: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.skip, self.out = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, c, 1) if head else None
        self.register_buffer("mean", torch.linspace(-1.0, 2.0, c))
        self.register_buffer("var", torch.linspace(0.5, 3.0, c))

    def forward(self, x):
        y = torch.relu(self.out(self.a(x) + self.b(x) + self.skip(x)))
        return y if self.head is None else F.batch_norm(self.head(y), self.mean, self.var, None, None, False)


class NestedBlocks(nn.Module):
    """``bn2(bn1(h + c(h)) + d(h))``: merging the inner block lets ``bn1`` fold, which makes the
    outer sum a block of ``h``, whose merge lets ``bn2`` fold: three rounds."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 8, 1, stride=2)
        self.c, self.d = nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.up(x)
        return self.bn2(self.bn1(h + self.c(h)) + self.d(h))


def _replan_parity(model: nn.Module, x: torch.Tensor) -> normfold.FoldResult:
    result = normfold.reparameterize(model, x)
    assert result.replan_folds == 0
    for candidate in (result.model, exported(result.program)):
        report = normfold.verify(model, candidate, x)
        assert report.passed, report.failures()
    assert bn_ops(result.program) == 0 and result.skipped == []
    return result


def test_a_norm_after_an_export_only_merge_folds_in_the_program():
    torch.manual_seed(0)
    model = randomize_bn(NormAfterBareIdentity())
    result = _replan_parity(model, torch.randn(2, 1, 5, 5))
    (merge,) = result.merged
    assert (merge.into, merge.where) == ("c", "export")
    (bn,) = [f for f in result.folded if f.norm == "bn"]
    assert (bn.into, bn.pattern, bn.where) == ("c", "conv-bn", "export")
    # the module still sums h + c(h): its own c cannot take the norm
    why = "c.weight differs in the eager module: its block is merged in the export only"
    assert bn.note == f"folded in the export only: {why}"
    assert isinstance(result.model.bn, nn.BatchNorm2d) and isinstance(result.model.c, nn.Conv2d)


@pytest.mark.parametrize("head", [False, True])
def test_a_norm_after_a_merged_module_block_folds_in_both(head):
    torch.manual_seed(0)
    model = randomize_bn(NormAfterModuleBlock(head=head))
    result = _replan_parity(model, torch.randn(2, 6, 7, 7))
    (merge,) = result.merged
    assert (merge.into, merge.where) == ("a", "both")
    (out,) = [f for f in result.folded if f.norm == "out"]
    assert (out.into, out.pattern, out.where) == ("a", "conv-bn", "both")
    assert [(f.into, f.where) for f in result.folded if f.norm.startswith("forward:")] == (
        [("head", "export")] if head else []
    )
    assert isinstance(result.model.out, nn.Identity) and isinstance(result.model.skip, MergedBranch)


def test_nested_blocks_reach_a_fixpoint_over_several_rounds():
    torch.manual_seed(0)
    model = randomize_bn(NestedBlocks())
    result = _replan_parity(model, torch.randn(2, 2, 4, 4))
    assert sorted(m.into for m in result.merged) == ["c", "d"]
    assert {f.norm for f in result.folded} >= {"bn1", "bn2"}
    assert sum(n.op == "call_function" for n in result.program.graph.nodes) == 2  # up, one conv


# --- float16: a merged value that does not fit keeps the block --------------------------------------


class LargeFoldedBranches(nn.Module):
    """Two 1x1 conv-BN branches whose folded kernels (about 4.4e4 each: BN scale 5e4) fit float16,
    but their sum (about 8.8e4) does not; ``scale`` multiplies the sum in forward code (folded into
    the branches in the export only, where the merged kernel then fits)."""

    def __init__(self, scale: float | None = None, c: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.a, self.b = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        self.bna, self.bnb = nn.BatchNorm2d(c, eps=0.0), nn.BatchNorm2d(c, eps=0.0)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.copy_(0.85 + 0.05 * torch.rand(conv.weight.shape, generator=gen))
            for bn in (self.bna, self.bnb):
                bn.running_var.copy_(1e-6 * (1 + torch.rand(c, generator=gen) * 0.1))
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.01)
                bn.weight.copy_(50.0 + torch.rand(c, generator=gen))
                bn.bias.copy_(torch.randn(c, generator=gen))

    def forward(self, x):
        y = self.bna(self.a(x)) + self.bnb(self.b(x))
        return y if self.scale is None else y * self.scale


_INPUT16 = (torch.rand(2, 4, 5, 5, generator=torch.Generator().manual_seed(4)) * 1e-3).half()


def _finite_and_verified(model: nn.Module, result: normfold.FoldResult) -> None:
    with torch.no_grad():
        assert bool(model(_INPUT16).isfinite().all())  # the original does not overflow
        for candidate in (result.model, exported(result.program)):
            assert bool(candidate(_INPUT16).isfinite().all())
            report = normfold.verify(model, candidate, _INPUT16)
            assert report.passed, report.failures()


def test_float16_block_whose_merged_kernel_does_not_fit_stays_with_code_overflow():
    model = LargeFoldedBranches().half().eval()
    result = normfold.reparameterize(model, _INPUT16)
    assert result.merged == []
    (kept,) = result.not_merged
    assert (kept.block, kept.code) == ("forward", "overflow")
    assert kept.reason.startswith(
        "the merged a.weight does not fit in float16 (largest finite 6.55e+04, merged "
    )
    assert kept.reason.endswith("): merging the block would make it inf")
    assert {(f.norm, f.where) for f in result.folded} == {("bna", "both"), ("bnb", "both")}  # each fits
    _finite_and_verified(model, result)


def test_float16_merge_that_fits_only_in_the_export_stays_out_of_the_module():
    model = LargeFoldedBranches(scale=0.25).half().eval()
    result = normfold.reparameterize(model, _INPUT16)
    (merge,) = result.merged
    assert merge.where == "export"  # the program's kernel holds the export-only * 0.25
    assert merge.note is not None
    assert merge.note.startswith(
        "merged in the export only: in the eager module, the merged a.weight does not fit"
    )
    assert isinstance(result.model.a, nn.Conv2d) and isinstance(result.model.b, nn.Conv2d)
    _finite_and_verified(model, result)
