"""The exact (float64) reference of an ONNX model's outputs, for :func:`normfold.onnx_fold.parity_onnx`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx
import torch


def exact_run(model: onnx.ModelProto, feeds: Mapping[str, torch.Tensor]) -> tuple[Any, str | None]:
    """``(outputs by name in float64, None)``, or ``(None, why)`` when no float64 run is possible."""
    return None, "no float64 reference: the folded model is measured against the original's own run"
