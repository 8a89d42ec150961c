"""The parity rule per scale band of slices, and checks that cannot decide (normfold.check.slices)."""

from __future__ import annotations

import torch
from torch import nn

import normfold
from normfold.check.parity import ParityRule, compare


def _detections(seed: int = 0) -> torch.Tensor:
    """float64 ``(batch 2, 5 channels, 40 anchors)``: four box coordinates in 0..640, then a class
    probability of std ~0.01 (as detection heads concatenate them)."""
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.rand(2, 4, 40, generator=gen, dtype=torch.float64) * 640
    probs = 0.02 + 0.01 * torch.rand(2, 1, 40, generator=gen, dtype=torch.float64)
    return torch.cat([boxes, probs], dim=1)


def test_a_small_scale_channel_cannot_hide_behind_a_large_one() -> None:
    """Item 5: the class probabilities move by 1e-4 (~100x their own rounding); the boxes' scale
    and rounding make the whole-tensor allowance 6.6e-3, so only the per-band rule sees it."""
    exact = _detections()
    original = exact.float()
    moved = original.clone()
    moved[:, 4] += 1e-4
    report = compare(original, moved, exact_outputs=exact, rule=ParityRule())
    (out,) = report.outputs
    assert out.exact_error <= out.allowed_error  # the whole-tensor rule alone would pass it
    assert not report.passed and report.decided
    assert out.slice_failure is not None and "along axis 1" in out.slice_failure
    assert "(index 4)" in out.slice_failure
    assert report.failures()[0].startswith("output on given inputs: along axis 1, the 1 slice(s) of scale")
    # the same tensor with the probabilities' own rounding only passes
    assert compare(original, original.clone(), exact_outputs=exact, rule=ParityRule()).passed


def test_slices_of_one_scale_pool_their_noise() -> None:
    """Elements of comparable scale (one band) share one noise estimate: a perturbed run's
    rounding on one element admits a candidate of that size on its neighbours (no per-element
    luck), while the same error on a part 1000x smaller fails."""
    exact = torch.tensor([[1.0, -2.0, 3.0], [1e-3, 2e-3, -3e-3]], dtype=torch.float64)
    original = exact.float()
    perturbed = exact.clone()
    perturbed[0, 0] += 3e-6
    rule = ParityRule(rtol=0, atol=0)
    near = original.clone()
    near[0, 1:] += 1e-5  # within 4x the band's noise
    assert compare(original, near, exact_outputs=exact, perturbed_outputs=[perturbed], rule=rule).passed
    far = original.clone()
    far[1, 1] += 1e-5  # the small row's own noise is ~1e-10
    report = compare(original, far, exact_outputs=exact, perturbed_outputs=[perturbed], rule=rule)
    assert not report.passed
    assert "along axis 0" in report.outputs[0].slice_failure


class _TwoHeads(nn.Module):
    """A detection-style head: boxes ~640 and probabilities ~0.01 concatenated on the channel axis;
    ``shift`` moves the logits' BN mean by a hundredth of its std (a real change)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.conv = nn.Conv1d(3, 5, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(5, 3, 1, generator=gen))
            self.conv.bias.copy_(torch.randn(5, generator=gen))
        self.bn = nn.BatchNorm1d(1).eval()
        with torch.no_grad():
            self.bn.running_mean.fill_(0.4 + shift * 1.5)
            self.bn.running_var.fill_(2.25)
            self.bn.weight.fill_(0.8)
            self.bn.bias.fill_(-4.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        boxes = torch.sigmoid(h[:, :4]) * 640
        probs = torch.sigmoid(self.bn(h[:, 4:]))
        return torch.cat([boxes, probs], dim=1)


def test_verify_sees_a_shift_of_the_small_head() -> None:
    x = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(1))
    assert normfold.verify(_TwoHeads(), _TwoHeads(), x).passed
    report = normfold.verify(_TwoHeads(), _TwoHeads(shift=0.01), x)
    assert not report.passed and report.decided
    failed = [o for o in report.outputs if not o.passed]
    assert failed and all(o.exact_error <= o.allowed_error for o in failed)  # the boxes masked it
    assert all("along axis 1" in o.slice_failure for o in failed)


def test_noise_reaching_the_output_scale_decides_nothing() -> None:
    """Item 4: a perturbed run flips a sigmoid (noise 1.0 on an output of scale 1.0): the
    allowance 4.0 would pass any output, so the check fails as undecidable, even for a candidate
    equal to the original."""
    exact = torch.tensor([0.999, 0.5, 0.001], dtype=torch.float64)
    original = exact.half()
    flipped = exact.clone()
    flipped[0] = 0.0
    moved = original.clone()
    moved[0] = 0.17
    for candidate in (original.clone(), moved):
        report = compare(original, candidate, exact_outputs=exact, perturbed_outputs=[flipped])
        assert not report.passed and not report.decided
        assert report.failures()[0].startswith("output on given inputs: cannot decide: the allowed error")
        assert "inputs=" in report.failures()[0] and "higher precision" in report.failures()[0]
        assert report.verdict().startswith("the folded model: parity with the original model could not")


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.25, -1.5, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3) + 0 * x[:, :3].clamp(0, 0)


def test_an_output_independent_of_the_input_compares_nothing() -> None:
    """Item 15: outputs identical on every input set say nothing, and the verdict says so rather
    than calling the candidate different."""
    x = torch.randn(2, 4)
    report = normfold.verify(_Constant(), _Constant(), x)
    assert not report.passed and not report.decided
    assert any("identical on all 3 input sets" in p for p in report.problems)
    assert "could not be judged" in report.verdict()
