"""One perturbation rule: :func:`normfold.check.exact.perturbed_tensor` (one tensor, used by the
local proof of a sharded fold) gives the bits :func:`normfold.check.exact.perturb` gives the same
tensor of a model, for every floating dtype, held in the dtype asked for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normfold.check.exact import perturb, perturbed_tensor


class _One(nn.Module):
    def __init__(self, t: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_one_tensor_is_perturbed_as_a_models_tensor_is(dtype: torch.dtype) -> None:
    t = (torch.randn(7, 5, generator=torch.Generator().manual_seed(3)) * 3 + 0.7).to(dtype)
    model = _One(t.clone())
    copy_ = _One(t.clone())
    perturb(copy_, model, seed=11)
    one = perturbed_tensor(t, torch.Generator().manual_seed(11), dtype)
    assert one.dtype == dtype and torch.equal(one, copy_.w.detach())
    assert torch.equal(t, model.w.detach())  # the input is unchanged
    assert not torch.equal(one, t)  # some element moved by a rounding
    held = perturbed_tensor(t, torch.Generator().manual_seed(11), torch.float32)
    assert held.dtype == torch.float32 and torch.equal(held, one.float())  # rounded first, then held
