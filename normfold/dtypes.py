"""Dtype facts every layer shares (as :mod:`normfold.errors` is shared): imports nothing of normfold.

:data:`LOW_PRECISION`: the 16-bit floating dtypes whose models normfold folds and proves in
float32 (their own arithmetic would drown the comparison), casting the proved values back once.
"""

from __future__ import annotations

import torch

__all__ = ["LOW_PRECISION"]

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
