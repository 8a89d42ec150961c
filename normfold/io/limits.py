"""Limits and checks on option values that need no torch: input sizes and ``model_args`` (JSON text).

The command line validates its options with these before it imports torch, so a usage error
comes back at once; the library applies the same checks to its own arguments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from normfold.errors import UsageError

#: Largest total number of input elements generated or accepted (1 GiB of float32): a typo such as
#: ``1,3,100000,100000`` is refused before anything is allocated.
MAX_INPUT_ELEMENTS = 2**28

#: ``model_args`` JSON text: longest JSON text and deepest nesting accepted.
MAX_MODEL_ARGS_CHARS = 65_536
MAX_MODEL_ARGS_DEPTH = 32


def input_limit_rule() -> str:
    """The rule on input sizes, as every message that enforces it states it."""
    return (
        f"over the limit of {MAX_INPUT_ELEMENTS:,} (2**28) input elements per run, summed over all "
        "inputs and counted from their shapes"
    )


def check_size(shapes: Sequence[Sequence[int]], label: str | None = None) -> None:
    """Refuse inputs over :data:`MAX_INPUT_ELEMENTS` in total, from their shapes, before anything
    is allocated; ``label`` names them in the message (default: the shapes)."""
    total = sum(math.prod(shape) for shape in shapes)
    if total > MAX_INPUT_ELEMENTS:
        label = label or "inputs of shape " + ", ".join(str(tuple(s)) for s in shapes)
        raise UsageError(f"{label}: {total:,} input elements in total, {input_limit_rule()}")


def parse_model_args(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_MODEL_ARGS_CHARS:
        raise UsageError(
            f"model_args is {len(text):,} characters long, over the limit of {MAX_MODEL_ARGS_CHARS:,}"
        )
    depth = _json_depth(text)
    if depth > MAX_MODEL_ARGS_DEPTH:
        raise UsageError(
            f"model_args nests {depth:,} levels deep, over the limit of {MAX_MODEL_ARGS_DEPTH} "
            "(factory keyword arguments are a flat JSON object)"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise UsageError(f"model_args is not valid JSON ({e.msg} at column {e.colno}): {shown}") from e
    except RecursionError as e:  # not reached under the depth limit; never a traceback
        raise UsageError("model_args nests too deeply") from e
    if not isinstance(value, dict):
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise UsageError(f"model_args must be a JSON object of keyword arguments, got {shown}")
    return value


def _json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
