"""Differential fuzzing of ``normfold.fold`` on random valid models (see ``fuzz_models.py``).

For every generated model (:func:`check_fold`):

1. parity: ``verify(model, result.model, inputs)`` and ``verify(model, exported(result.program),
   inputs)`` (so both follow the one parity rule of :mod:`normfold.parity`) on standard normal,
   U(0, 255) and N(0, 1) * 100 inputs (verify adds its own generated sets); an input set on which
   the *original* overflows or outputs only zeros is not compared;
2. the input model is not mutated: state_dict bytes, every submodule's ``training`` flag, and the
   caller's input tensors;
3. no global state changes: default dtype, grad mode, the global RNG state, ``sys.path``;
4. every norm the generator marked foldable is in ``result.folded`` (and not skipped), every norm
   marked must-not-fold is in ``result.skipped`` with an expected code, every norm is reported,
   and planning the folded program again finds nothing.

Profiles: ``NORMFOLD_FUZZ_EXAMPLES`` (default 150, the CI run; 10000 for a long run) and
``NORMFOLD_FUZZ_SEED`` (a random seed instead of the default derandomized, reproducible run)::

    NORMFOLD_FUZZ_EXAMPLES=10000 NORMFOLD_FUZZ_SEED=$RANDOM .venv/bin/pytest tests/test_fuzz.py

A bug the fuzzer finds is pinned here as a plain ``test_regression_<what>`` function building the
shrunk model by hand (none so far).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from fuzz_models import Built, Expect, ModelSpec, build, make_inputs, model_specs
from helpers import exported, state_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from torch import nn

import normfold

logger = logging.getLogger(__name__)

MAX_EXAMPLES = int(os.environ.get("NORMFOLD_FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("NORMFOLD_FUZZ_SEED")

#: (input kind, batch, seed): the fold's example inputs are the first entry's
INPUT_SETS = (("normal", 2, 1), ("wide", 3, 2), ("x100", 2, 3))

#: examples run by the property test (valid ones: the generator never rejects)
_EXAMPLES = [0]
#: examples with at least one input set on which parity was compared
_COMPARED = [0]


def _informative(output: torch.Tensor) -> bool:
    """Finite everywhere and not all zeros (a dead ReLU chain): an output parity can judge."""
    return bool(torch.isfinite(output).all()) and bool((output != 0).any())


def _global_state() -> dict[str, Any]:
    return {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "rng state": torch.get_rng_state().numpy().tobytes(),
        "sys.path": list(sys.path),
    }


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _input_bytes(inputs: tuple[torch.Tensor, ...]) -> list[bytes]:
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in inputs]


def check_fold(
    model: nn.Module,
    input_sets: dict[str, tuple[torch.Tensor, ...]],
    expect: dict[str, Expect],
    context: str = "",
) -> normfold.FoldResult:
    """Fold ``model`` on the first input set and check the four properties (module docstring)."""
    example = next(iter(input_sets.values()))
    before_state, before_flags = state_bytes(model), _flags(model)
    before_inputs = {k: _input_bytes(v) for k, v in input_sets.items()}
    before_global = _global_state()

    result = normfold.fold(model, example)
    assert result.program is not None, f"{context}: fold captured the model in parts: {result.uncaptured}"
    program = exported(result.program)
    compared = []
    for kind, inputs in input_sets.items():
        if not _informative(normfold.run_model(model, inputs)):
            continue  # the original overflows, or outputs only zeros: nothing to compare on this set
        compared.append(kind)
        for what, candidate in (("folded module", result.model), ("folded program", program)):
            report = normfold.verify(model, candidate, inputs)
            assert report.passed, f"{context}\n{what} on {kind} inputs: {report.failures()}"

    after_global = _global_state()
    changed = [k for k in before_global if before_global[k] != after_global[k]]
    assert not changed, f"{context}\nfold/verify changed global state: {changed}"
    assert state_bytes(model) == before_state, f"{context}\nfold changed the input model's state_dict"
    assert _flags(model) == before_flags, f"{context}\nfold changed the input model's training flags"
    for kind, inputs in input_sets.items():
        assert _input_bytes(inputs) == before_inputs[kind], f"{context}\nthe {kind} inputs changed"

    folded = {f.norm: f for f in result.folded}
    skipped = {s.norm: s for s in result.skipped}
    for name, e in expect.items():
        where = f"{context}\nnorm {name} ({e.status}): folded={folded.get(name)}, skipped={skipped.get(name)}"
        assert name in folded or name in skipped, f"not reported. {where}"
        if e.status == "fold":
            assert name in folded and name not in skipped, f"not folded. {where}"
        elif e.status == "keep":
            assert name not in folded and name in skipped, f"folded. {where}"
            assert skipped[name].code in e.codes, f"code not in {sorted(e.codes)}. {where}"
    assert result.replan_folds == 0, f"{context}\nplanning the folded program again finds folds"
    _COMPARED[0] += bool(compared)
    return result


def _inputs_for(spec: ModelSpec, built: Built) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        kind: make_inputs(spec, built.dtype, batch=batch, kind=kind, seed=spec.seed + s)
        for kind, batch, s in INPUT_SETS
    }


def _fuzz_settings(test: Callable[..., None]) -> Callable[..., None]:
    configured = settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    return configured if SEED is None else hypothesis_seed(int(SEED))(configured)


@_fuzz_settings
@given(spec=model_specs())
def _fold_fuzz(spec: ModelSpec) -> None:
    _EXAMPLES[0] += 1
    built = build(spec)
    check_fold(built.model, _inputs_for(spec, built), built.expect, repr(spec))


def test_fold_fuzz(record_property: Callable[[str, object], None]) -> None:
    """The four properties on ``NORMFOLD_FUZZ_EXAMPLES`` random models (deterministic by default)."""
    before, before_compared = _EXAMPLES[0], _COMPARED[0]
    _fold_fuzz()
    ran, compared = _EXAMPLES[0] - before, _COMPARED[0] - before_compared
    record_property("fuzz_examples", ran)
    record_property("fuzz_examples_compared", compared)
    logger.info("normfold fuzz: %d examples, %d with parity compared (seed %s)", ran, compared, SEED or "-")
    assert ran >= MAX_EXAMPLES
    assert compared >= 0.8 * ran  # dead or overflowing models are rare: the parity check is exercised
