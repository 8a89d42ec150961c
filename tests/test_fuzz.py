"""Differential fuzzing of the exact transforms, ``normfold.fold`` and
``normfold.drop_redundant_biases``, on random valid models (see ``fuzz_models.py``).

For every generated model, ``test_fold_fuzz`` (:func:`check_fold`) checks:

1. parity: ``verify(model, result.model, inputs)`` and ``verify(model, exported(result.program),
   inputs)`` (so both follow the one parity rule of :mod:`normfold.check.parity`) on standard normal,
   U(0, 255) and N(0, 1) * 100 inputs (verify adds its own generated sets); an input set on which
   the *original* overflows or outputs only zeros is not compared, and a check that ``verify``
   reports as undecidable (``ParityReport.decided`` False: it failed, saying the original cannot
   tell a change from its own rounding) is counted, not passed;
2. the input model is not mutated: state_dict bytes, every submodule's ``training`` flag, and the
   caller's input tensors;
3. no global state changes: default dtype, grad mode, the global RNG state, ``sys.path``, the
   number of intra-op threads;
4. every norm the generator marked foldable is in ``result.folded`` (and not skipped; in
   float16/bfloat16 a skip with code ``overflow`` is allowed), every norm marked must-not-fold is
   in ``result.skipped`` with an expected code, every norm is reported, and planning the folded
   program again finds nothing.

``test_drop_redundant_biases_fuzz`` (:func:`check_drop`) checks the same parity (1) for the
model with its biases dropped, the same no-mutation and no-global-state properties (2, 3), a
float64 train-mode step of the original and the dropped model giving the same outputs and running
variances (running means apart by exactly the dropped bias), every bias the generator marked
droppable dropped with ``running_mean - bias`` (float64, cast once) in its norm; on a quarter of
the examples ``inplace=True`` on a deep copy, for ``drop_redundant_biases`` and for ``fold``, gives
bit-identical state to the default copy.

Profiles, by environment variable:

* ``NORMFOLD_FUZZ_EXAMPLES``: examples of ``test_fold_fuzz`` (default 120: the CI run, about 1.5
  minutes on a loaded 2-core machine; 10000 for a release check, in chunks);
* ``NORMFOLD_FUZZ_BIAS_EXAMPLES``: examples of ``test_drop_redundant_biases_fuzz`` (default:
  ``NORMFOLD_FUZZ_EXAMPLES`` when that is set, else 150, the CI run);
* ``NORMFOLD_FUZZ_DTYPES``: the model dtypes drawn (default ``float32,float64,float16,bfloat16``);
* ``NORMFOLD_FUZZ_SEED``: an integer seed for hypothesis instead of the default derandomized run
  (the default is the same examples on every run, whatever the process ran before; a seed
  explores new ones and is reproducible)::

    NORMFOLD_FUZZ_EXAMPLES=10000 NORMFOLD_FUZZ_SEED=$RANDOM .venv/bin/python -m pytest -s tests/test_fuzz.py

* ``NORMFOLD_FUZZ_CHUNK``: with a seed, chunk ``k`` of a campaign on it: ``NORMFOLD_FUZZ_EXAMPLES``
  examples (``N``), numbered ``k*N`` to ``(k+1)*N - 1``, drawn by hypothesis from the seed
  ``SEED * 1000 + k``. Hypothesis cannot resume a run, and a 10,000-example run takes hours on a
  loaded 2-core machine, so a campaign on one seed runs as chunks (10 of 1,000) that each end with
  their own verdict, in one session or several::

    NORMFOLD_FUZZ_EXAMPLES=1000 NORMFOLD_FUZZ_SEED=934055385 NORMFOLD_FUZZ_CHUNK=3 \\
        .venv/bin/python -m pytest -s tests/test_fuzz.py -k test_fold_fuzz

``-s`` prints the counts (examples run, examples with parity compared, biases dropped); they are
also recorded as junit properties (``record_property``). Torch runs single-threaded during the
fuzz tests (restored after): tiny models gain nothing from intra-op threads.

A bug the fuzzer finds is pinned here as a plain ``test_regression_<what>`` function building the
shrunk model by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import fuzz_pins
import pytest
import torch
from fuzz_models import (
    Built,
    ConvNorm,
    ConvSpec,
    Expect,
    Fork,
    LinearNorm,
    LinearSpec,
    ModelSpec,
    NormLinear,
    NormSpec,
    Residual,
    SeqLinear,
    SharedNorm,
    block_specs,
    build,
    fixed_constants,
    make_inputs,
    model_specs,
)
from helpers import exported, state_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine import gate
from normfold.folding import _fold, capture_options

logger = logging.getLogger(__name__)

# the CI profile (120 + 150) keeps the suite under its 15-minute budget; campaigns set the counts
MAX_EXAMPLES = int(os.environ.get("NORMFOLD_FUZZ_EXAMPLES", "120"))
# (150 drop examples: 26 biases dropped, well above the check's 10%; 100 would drop 11)
_BIAS_DEFAULT = os.environ.get("NORMFOLD_FUZZ_EXAMPLES", "150")
BIAS_EXAMPLES = int(os.environ.get("NORMFOLD_FUZZ_BIAS_EXAMPLES", _BIAS_DEFAULT))
SEED = os.environ.get("NORMFOLD_FUZZ_SEED")
CHUNK = os.environ.get("NORMFOLD_FUZZ_CHUNK")
if CHUNK is not None and SEED is None:
    raise RuntimeError("NORMFOLD_FUZZ_CHUNK numbers a chunk of a seeded campaign: set NORMFOLD_FUZZ_SEED too")
#: the seed hypothesis draws from (None: the derandomized default run), how messages name the
#: run, and the environment that reruns it
HYPOTHESIS_SEED: int | None = None
RUN, AGAIN = "none (derandomized default run)", ""
if SEED is not None:
    HYPOTHESIS_SEED = int(SEED) * 1000 + int(CHUNK) if CHUNK is not None else int(SEED)
    RUN = SEED if CHUNK is None else f"{SEED}, chunk {CHUNK}"
    AGAIN = f"NORMFOLD_FUZZ_SEED={SEED} " + (f"NORMFOLD_FUZZ_CHUNK={CHUNK} " if CHUNK is not None else "")

#: (input kind, batch, seed): the fold's example inputs are the first entry's
#: (a batch of 4+: a batch-statistics norm on 2 samples turns a channel where both nearly agree
#: into an ill-conditioned output whose one rounding decides the parity rule's noise estimate)
INPUT_SETS = (("normal", 4, 1), ("wide", 5, 2), ("x100", 4, 3))

#: examples run by the property test (valid ones: the generator never rejects)
_EXAMPLES = [0]
#: examples with at least one input set on which parity was compared
_COMPARED = [0]
#: checks that could decide nothing (``ParityReport.decided`` False: the original's outputs do not
#: depend on its input, or its own noise reaches its output's scale); counted, never passed
_UNDECIDED = [0]
#: examples whose every informative input set was undecidable
_UNDECIDED_EXAMPLES = [0]


def _leaves(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


def _informative(output: Any) -> bool:
    """Finite everywhere and not all zeros (a dead ReLU chain): outputs parity can judge."""
    leaves = _leaves(output)
    finite = all(bool(torch.isfinite(t).all()) for t in leaves)
    return finite and any(bool((t != 0).any()) for t in leaves)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Intra-op threads on the tiny fuzz models only cost: on a loaded machine (other jobs on the
    cores) OpenMP waits made an example 5-20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _global_state() -> dict[str, Any]:
    return {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
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
    compared, undecided = [], False
    for kind, inputs in input_sets.items():
        if not _informative(normfold.run_model(model, inputs)):
            continue  # the original overflows, or outputs only zeros: nothing to compare on this set
        for what, candidate in (("folded module", result.model), ("folded program", program)):
            report = normfold.verify(model, candidate, inputs)
            if not report.passed and not report.decided:
                _UNDECIDED[0] += 1  # the original cannot tell a change from its rounding: nothing judged
                undecided = True
                continue
            assert report.passed, f"{context}\n{what} on {kind} inputs: {report.failures()}"
            compared.append(kind)

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
        if e.status == "fold" and name in skipped and skipped[name].code in e.codes:
            # an allowed refusal, never a guess: a folded value that does not fit the dtype (inf),
            # or a fold the gate measured beyond the parity rule, which must fail it when forced
            if "does not fit in" not in skipped[name].reason:
                forced_fails = _forced_fold_fails(model, input_sets, name, result)
                assert forced_fails, f"refused, yet the forced fold passes. {where}"
            continue
        if e.status == "fold":
            assert name in folded and name not in skipped, f"not folded. {where}"
        elif e.status == "keep":
            assert name not in folded and name in skipped, f"folded. {where}"
            assert skipped[name].code in e.codes, f"code not in {sorted(e.codes)}. {where}"
    assert result.replan_folds == 0, f"{context}\nplanning the folded program again finds folds"
    _COMPARED[0] += bool(compared)
    _UNDECIDED_EXAMPLES[0] += not compared and undecided
    return result


def _forced_fold_fails(
    model: nn.Module, input_sets: dict[str, tuple[torch.Tensor, ...]], name: str, result: normfold.FoldResult
) -> bool:
    """Whether ``model`` folded with norm ``name``'s fold forced (every other norm ``result`` kept
    stays kept, the gate skipped) fails the rule the gate judges by (:func:`gate.judging_rule`) on
    the fuzz's own input sets, the gate's (:func:`gate.judging_sets`) or a wider batch the fuzz
    draws itself: a refusal with code ``cancellation`` or ``overflow`` must rest on a failure of
    that norm's own fold, measured again here, never on another norm's or on the gate's word."""
    example = next(iter(input_sets.values()))
    keep = {s.norm: (s.code, s.reason) for s in result.skipped if s.norm != name}
    options = capture_options(example, True, None)
    forced = _fold(model, example, options, inplace=False, reparameterize=True, keep=keep, judged=True)
    assert name in {f.norm for f in forced.folded}, f"{name} does not fold even when forced"
    gen = torch.Generator().manual_seed(20261207)
    wider = tuple(
        torch.randn((t.shape[0] + 1, *t.shape[1:]), generator=gen, dtype=torch.float64).to(t.dtype)
        if t.is_floating_point() else t
        for t in example
    )  # fmt: skip
    rule = gate.judging_rule(forced)
    for inputs in [*input_sets.values(), *gate.judging_sets(example)[1:], wider]:
        try:
            report = normfold.verify(model, forced, inputs, rule=rule)
        except normfold.TraceError:
            continue  # the model runs at its example batch only
        if not report.passed and report.decided:
            return True
    return False


def _train_run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, list[torch.Tensor]]:
    """One float64 train-mode forward of a copy of ``model`` (batch statistics, running statistics
    updated on the copy, dropout drawn from a fixed seed): the copy and its outputs."""
    copy64 = copy.deepcopy(model).double().train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        outputs = _leaves(copy64(*(t.double() for t in inputs)))
    return copy64, outputs


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """float64 results of one computation reordered (train mode): a tight relative bound."""
    if not bool(torch.isfinite(a).all()):
        return True, "not finite"
    a, b = a.detach(), b.detach()
    error, scale = float((a - b).abs().max()), float(a.abs().max())
    return error <= 1e-6 * scale + 1e-9, f"error {error:.3g}, max {scale:.3g}"


def check_drop(
    model: nn.Module,
    input_sets: dict[str, tuple[torch.Tensor, ...]],
    drops: dict[str, str],
    context: str = "",
    *,
    inplace: bool = False,
) -> normfold.BiasResult:
    """``drop_redundant_biases`` on the first input set: eval-mode parity (``verify``) on every
    informative set, a float64 train-mode run matching the original's (outputs and running
    variances), the input model, its flags, the inputs and global state untouched, every bias the
    generator marked droppable dropped (its norm's running mean moved by ``-bias``); ``inplace``:
    ``inplace=True`` on a deep copy gives bit-identical state."""
    example = next(iter(input_sets.values()))
    before_state, before_flags = state_bytes(model), _flags(model)
    before_inputs = {k: _input_bytes(v) for k, v in input_sets.items()}
    before_global = _global_state()

    result = normfold.drop_redundant_biases(model, example)
    for kind, inputs in input_sets.items():
        if not _informative(normfold.run_model(model, inputs)):
            continue
        report = normfold.verify(model, result.model, inputs)
        failures = report.failures()
        assert report.passed or not report.decided, f"{context}\ndropped model on {kind} inputs: {failures}"
    if _informative(normfold.run_model(model, example)):
        original, original_out = _train_run(model, example)
        dropped, dropped_out = _train_run(result.model, example)
        for i, (a, b) in enumerate(zip(original_out, dropped_out, strict=True)):
            ok, how = _close(a, b)
            assert ok, f"{context}\ntrain mode, output {i}: {how}"
        for name, m in original.named_modules():
            if isinstance(m, _BatchNorm) and m.running_var is not None:
                ok, how = _close(m.running_var, dropped.get_submodule(name).running_var)
                assert ok, f"{context}\ntrain mode, {name}.running_var: {how}"
        for d in result.dropped:  # the running mean stays shifted by -bias (and its one rounding)
            bias = original.get_submodule(d.layer).bias.detach()
            stored = result.model.get_submodule(d.norm).running_mean.double()
            exact = model.get_submodule(d.norm).running_mean.double() - bias
            rounding = float((stored - exact).abs().max())  # the shifted mean cast back to its dtype
            shifted = original.get_submodule(d.norm).running_mean - bias
            error = float((shifted - dropped.get_submodule(d.norm).running_mean).abs().max())
            allowed = rounding + 1e-6 * float(shifted.abs().max()) + 1e-9
            assert error <= allowed, f"{context}\ntrain mode, {d.norm}.running_mean: {error} > {allowed}"

    after_global = _global_state()
    changed = [k for k in before_global if before_global[k] != after_global[k]]
    assert not changed, f"{context}\ndrop_redundant_biases/verify changed global state: {changed}"
    assert state_bytes(model) == before_state, f"{context}\nthe input model's state_dict changed"
    assert _flags(model) == before_flags, f"{context}\nthe input model's training flags changed"
    assert _flags(result.model) == before_flags, f"{context}\nthe result's training flags differ"
    for kind, inputs in input_sets.items():
        assert _input_bytes(inputs) == before_inputs[kind], f"{context}\nthe {kind} inputs changed"

    dropped = {d.layer: d.norm for d in result.dropped}
    kept = {k.layer: k for k in result.kept}
    for layer, norm in drops.items():
        assert dropped.get(layer) == norm, f"{context}\nbias of {layer} not dropped: {kept.get(layer)}"
    for d in result.dropped:
        assert result.model.get_submodule(d.layer).bias is None, f"{context}\n{d.layer}.bias is still there"
        old_mean = model.get_submodule(d.norm).running_mean
        expected = (old_mean.double() - model.get_submodule(d.layer).bias.double()).to(old_mean.dtype)
        new_mean = result.model.get_submodule(d.norm).running_mean
        assert torch.equal(new_mean, expected), f"{context}\n{d.norm}.running_mean is not mean - bias"
    assert result.params_saved == sum(d.params for d in result.dropped), context

    if inplace:
        twin = copy.deepcopy(model)
        again = normfold.drop_redundant_biases(twin, example, inplace=True)
        assert again.model is twin, f"{context}\ninplace=True did not return the model it was given"
        assert state_bytes(twin) == state_bytes(result.model), f"{context}\ninplace=True gave other values"
        twin = copy.deepcopy(model)
        folded = normfold.fold(twin, example, inplace=True)
        reference = normfold.fold(model, example)
        assert folded.model is twin, f"{context}\nfold(inplace=True) did not return the model it was given"
        assert state_bytes(twin) == state_bytes(reference.model), f"{context}\nfold(inplace=True) differs"
        assert [type(m) for m in twin.modules()] == [type(m) for m in reference.model.modules()], context
    return result


def _inputs_for(spec: ModelSpec, built: Built) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        kind: make_inputs(spec, built.dtype, batch=batch, kind=kind, seed=spec.seed + s)
        for kind, batch, s in INPUT_SETS
    }


def _fuzz_settings(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The fuzz's hypothesis settings; the examples drawn depend on the seed only, never on what
    the process imported before (:func:`fuzz_models.fixed_constants`)."""

    def configure(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(
            max_examples=examples,
            deadline=None,
            derandomize=SEED is None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(test)
        configured = configured if HYPOTHESIS_SEED is None else hypothesis_seed(HYPOTHESIS_SEED)(configured)

        @functools.wraps(configured)
        def run() -> None:
            with fixed_constants():
                configured()

        return run

    return configure


def _progress(what: str, count: int) -> None:
    """Every 500 examples a line with a time stamp (seen with ``-s``), for long runs."""
    if count % 500 == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {what} fuzz: {count} examples", flush=True)


def recheck_fold(spec: ModelSpec) -> normfold.FoldResult:
    """Rebuild ``spec`` and run :func:`check_fold` on it (what a failure's one-line command calls)."""
    built = build(spec)
    return check_fold(built.model, _inputs_for(spec, built), built.expect, repr(spec))


def recheck_drop(spec: ModelSpec) -> normfold.BiasResult:
    """Rebuild ``spec`` and run :func:`check_drop` on it, as :func:`_drop_fuzz` does."""
    built = build(spec)
    inputs = _inputs_for(spec, built)
    return check_drop(built.model, inputs, built.drops, repr(spec), inplace=spec.seed % 4 == 0)


def spec_source(value: Any) -> str:
    """Python source that rebuilds ``value`` (the specs' own ``repr`` is for reading, not ``eval``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(
            f"{f.name}={spec_source(getattr(value, f.name))}" for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}({fields})"
    if isinstance(value, tuple):
        return "(" + "".join(f"{spec_source(v)}, " for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(spec_source(v) for v in value) + "]"
    if isinstance(value, frozenset):
        return f"frozenset({spec_source(sorted(value))})"
    return repr(value)


def rebuild_command(test: str, spec: ModelSpec) -> str:
    """How to rebuild a failing example: the seed, the spec and two one-line commands."""
    recheck = "recheck_fold" if test == "test_fold_fuzz" else "recheck_drop"
    examples = f"NORMFOLD_FUZZ_EXAMPLES={MAX_EXAMPLES if test == 'test_fold_fuzz' else BIAS_EXAMPLES} "
    return (
        f"fuzz seed: {RUN}\n"
        f"spec: {spec!r}\n"
        f"rerun the fuzz test: {AGAIN}{examples}.venv/bin/python -m pytest tests/test_fuzz.py -k {test}\n"
        f"rebuild this example alone: cd tests && ../.venv/bin/python -c "
        f'"from fuzz_models import *; from test_fuzz import {recheck}; {recheck}({spec_source(spec)})"'
    )


def _with_rebuild(test: str, spec: ModelSpec, check: Callable[[ModelSpec], object]) -> None:
    """Run ``check(spec)``; any failure carries the seed, the spec and the commands that rebuild
    it in its message (shown by pytest with or without ``-s``, for the shrunk example too)."""
    try:
        check(spec)
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}\n{rebuild_command(test, spec)}") from e


@_fuzz_settings(MAX_EXAMPLES)
@given(spec=model_specs())
def _fold_fuzz(spec: ModelSpec) -> None:
    _EXAMPLES[0] += 1
    _progress("fold", _EXAMPLES[0])
    _with_rebuild("test_fold_fuzz", spec, recheck_fold)


#: the per-test timeout (pyproject's 300 s) scales with a campaign's examples (a few seconds each at most)
@pytest.mark.timeout(max(300, 5 * MAX_EXAMPLES))
def test_fold_fuzz(record_property: Callable[[str, object], None]) -> None:
    """The four properties on ``NORMFOLD_FUZZ_EXAMPLES`` random models (deterministic by default)."""
    before, before_compared, before_undecided = _EXAMPLES[0], _COMPARED[0], _UNDECIDED_EXAMPLES[0]
    _fold_fuzz()
    ran, compared = _EXAMPLES[0] - before, _COMPARED[0] - before_compared
    undecided = _UNDECIDED_EXAMPLES[0] - before_undecided
    record_property("fuzz_examples", ran)
    record_property("fuzz_examples_compared", compared)
    message = (
        f"normfold fold fuzz: {ran} examples, {compared} with parity compared, {undecided} undecidable "
        f"({_UNDECIDED[0]} checks) (seed {RUN})"
    )
    logger.info(message)
    print(message)
    assert ran >= MAX_EXAMPLES
    # dead or overflowing models are rare: the parity check is exercised. The generator's large
    # running means swamp the input of some models in their own dtype (bit-identical outputs on
    # every input set): verify says it cannot decide those, and they are not counted as compared
    assert compared >= 0.8 * (ran - undecided) and undecided <= 0.35 * ran


#: examples run by the drop_redundant_biases property test, and those with parity compared
_DROP_EXAMPLES = [0]
_DROP_COMPARED = [0]
_DROP_DROPPED = [0]


@_fuzz_settings(BIAS_EXAMPLES)
@given(spec=model_specs())
def _drop_fuzz(spec: ModelSpec) -> None:
    _DROP_EXAMPLES[0] += 1
    _progress("drop", _DROP_EXAMPLES[0])
    done: list[normfold.BiasResult] = []
    # a quarter of the examples also checks inplace=True (drop and fold) on a deep copy
    _with_rebuild("test_drop_redundant_biases_fuzz", spec, lambda s: done.append(recheck_drop(s)))
    built = build(spec)
    input_sets = _inputs_for(spec, built)
    _DROP_COMPARED[0] += any(_informative(normfold.run_model(built.model, i)) for i in input_sets.values())
    _DROP_DROPPED[0] += len(done[0].dropped)


@pytest.mark.timeout(max(300, 5 * BIAS_EXAMPLES))
def test_drop_redundant_biases_fuzz(record_property: Callable[[str, object], None]) -> None:
    """``drop_redundant_biases`` on ``NORMFOLD_FUZZ_BIAS_EXAMPLES`` random models: eval parity,
    train-mode equality, no mutation, no global state change, expected drops (:func:`check_drop`)."""
    before, before_compared, before_dropped = _DROP_EXAMPLES[0], _DROP_COMPARED[0], _DROP_DROPPED[0]
    _drop_fuzz()
    ran, compared = _DROP_EXAMPLES[0] - before, _DROP_COMPARED[0] - before_compared
    dropped = _DROP_DROPPED[0] - before_dropped
    record_property("fuzz_examples", ran)
    record_property("fuzz_examples_compared", compared)
    record_property("fuzz_biases_dropped", dropped)
    message = (
        f"normfold drop fuzz: {ran} examples, {compared} with parity compared, {dropped} biases dropped "
        f"(seed {RUN})"
    )
    logger.info(message)
    print(message)
    assert ran >= BIAS_EXAMPLES
    assert compared >= 0.8 * ran
    # the transform is exercised, not only its refusals: 26 biases dropped in the 150 default
    # examples, alone, after an ONNX export or after CLI tests (the examples depend on the seed
    # only: fuzz_models.fixed_constants; the 60 and 11 once seen were other examples, drawn with
    # the constants of modules imported before). A seeded run of a few hundred examples explores in
    # correlated stretches (8 to 43 biases in 150 examples over five example sequences): its count
    # is the seed's, not normfold's, and each bias the generator marks droppable is asserted
    # dropped anyway (check_drop); from 1000 examples on it settles (173 to 260 over three)
    if SEED is None or ran >= 1000:
        assert ran < 100 or dropped >= 0.1 * ran, f"{dropped} biases dropped in {ran} examples"


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(spec=model_specs())
def test_failure_message_rebuilds_the_example(spec: ModelSpec) -> None:
    """A failing example's message names the seed and a command whose spec source is the spec."""

    def fail(_: ModelSpec) -> None:
        raise RuntimeError("boom")

    with pytest.raises(AssertionError) as info:
        _with_rebuild("test_fold_fuzz", spec, fail)
    message = str(info.value)
    assert message.startswith("RuntimeError: boom\nfuzz seed: ")
    assert "-m pytest tests/test_fuzz.py -k test_fold_fuzz" in message
    source = message.split("recheck_fold(", 1)[1].removesuffix(')"')
    import fuzz_models

    assert eval(source, vars(fuzz_models)) == spec


# --------------------------------------------------------------------------- regressions


def _sets(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """The fuzz input sets (``INPUT_SETS``) for a per-sample ``shape`` and a spec's ``seed``."""
    sets = {}
    for kind, batch, offset in INPUT_SETS:
        gen = torch.Generator().manual_seed(seed + offset)
        if kind == "wide":
            x = torch.rand((batch, *shape), generator=gen, dtype=torch.float64) * 255
        else:
            x = torch.randn((batch, *shape), generator=gen, dtype=torch.float64) * (
                100.0 if kind == "x100" else 1.0
            )
        sets[kind] = (x.to(dtype),)
    return sets


class _BatchStatsChain(nn.Module):
    """``bn3(fc2(fc1(bn2(relu(bn1(relu(x)))))))``, bn3 on batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(7, eps=1e-3, affine=False)
        self.bn2 = nn.BatchNorm1d(7, eps=1e-5, affine=False)
        self.fc1, self.fc2 = nn.Linear(7, 4, bias=False), nn.Linear(4, 6, bias=False)
        self.bn3 = nn.BatchNorm1d(6, eps=0.1, affine=False, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(torch.relu(x))
        return self.bn3(self.fc2(self.fc1(self.bn2(torch.relu(y)))))


def test_regression_batch_statistics_two_samples() -> None:
    """Seed 7 (fuzz generator bug, not an engine bug): bn2 folds into fc1 (bn-linear); the kept
    batch-statistics bn3 saw 2 samples whose fc2 outputs (~|600|, ~1e-7 relative rounding in both
    the original and the folded model) nearly agreed in one channel, so that channel's output was
    one rounding of an ill-conditioned difference and the original's own error there happened to
    be 9x smaller than the fold's: a fluke of the parity rule's noise estimate. The fuzz input sets
    now have batches of 4-5; this model passes on them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2689)  # the shrunk example's weights and statistics, drawn as build() does
        model = _BatchStatsChain()
    gen = torch.Generator().manual_seed(2689)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(7, generator=gen, dtype=torch.float64) * 1000)
        model.bn1.running_var.copy_(10 ** (-5.62 + 3.12 * torch.rand(7, generator=gen, dtype=torch.float64)))
        model.bn2.running_var.fill_(100.0)
    assert all(batch >= 4 for _, batch, _ in INPUT_SETS)
    expect = {"bn1": Expect("keep", frozenset({"after_activation"})), "bn2": Expect("fold"),
              "bn3": Expect("keep", frozenset({"batch_statistics"}))}  # fmt: skip
    check_fold(model.eval(), _sets((7,), torch.float32, 2689), expect, "batch statistics chain")


def test_regression_lucky_own_error() -> None:
    """Fuzz seed 4242 (a parity rule bug): bn-linear folds exactly, and its error (3.9e-6 on an
    output of scale 6.3e-3 after a ReLU that cancels activations of ~500) is the model's usual
    rounding; the original's own error on those 4 output elements happened to be 10x smaller
    (4.2e-7), so the fold failed. The rule now also measures the model's noise by float64 runs with
    rounding-sized parameter perturbations (5.4e-6 here). The figures are one CPU's float32
    rounding (on an AVX-512 EPYC the own error is 7.6e-7, and the old rule passes too): the test
    pins the model and asserts normfold's verdict, never which rule a CPU's rounding defeats."""
    norm = functools.partial(NormSpec, kind="module", affine=True, track=True, gamma="mixed")
    conv = functools.partial(ConvSpec, dims=1, stride=1, padding=0, dilation=1, groups=1)
    spec = ModelSpec(in_shape=(1, 3), dtype="float32", mode="eval", seed=106, outputs="last", blocks=(
        SharedNorm(a=conv(cin=1, cout=13, kernel=3, stride=2, padding=1, bias=False),
                   b=conv(cin=13, cout=13, kernel=1, bias=True),
                   norm=norm(affine=False, eps=1e-5, mean_scale=30.0, log_var=(0.0, 0.0),
                             gamma="positive", beta_scale=0.0), act_between=False),
        LinearNorm(linear=LinearSpec(26, 5, False), flatten=True, act=False,
                   norm=norm(eps=0.1, mean_scale=30.0, log_var=(-5.41, 2.0), beta_scale=5.0)),
        NormLinear(linear=LinearSpec(5, 2, False), act=True,
                   norm=norm(eps=0.001, mean_scale=30.0, log_var=(-2.65, -1.7), beta_scale=0.0)),
        LinearNorm(linear=LinearSpec(2, 1, False), norm=None, flatten=False, act=False),
    ))  # fmt: skip
    built = build(spec)
    check_fold(built.model, _inputs_for(spec, built), built.expect, repr(spec))


def test_regression_heavy_tailed_noise_near_relu_kinks() -> None:
    """Fuzz seed 1001 (a parity rule bug): in bfloat16 the depthwise conv before a ReLU folds
    exactly, but its rounded folded weight moves a few values across the ReLU kink and through a
    kept batch-statistics norm: 1.04 at the output (scale 9.4). Perturbing the original's
    parameters by one rounding does the same only now and then (0 to 0.43 over 8 draws of one
    weight alone), so the two up-front perturbed runs measured 0.056 and refused it; with the
    eight the rule asks for before refusing, the noise is 1.28. (Figures of one CPU; the test
    asserts normfold's verdict only.)"""
    conv = functools.partial(ConvSpec, dims=2, stride=1, dilation=2, padding=2, kernel=3)
    norm = functools.partial(NormSpec, kind="module", track=True, eps=1e-5, beta_scale=0.0)
    spec = ModelSpec(in_shape=(3, 4, 7), dtype="bfloat16", mode="eval", seed=16351, outputs="last", blocks=(
        Fork(branches=(
            (ConvNorm(conv=conv(cin=3, cout=2, groups=1, bias=True), norm=None, through=None, act=False),),
            (Residual(conv1=conv(cin=3, cout=3, kernel=1, padding=0, groups=3, bias=True),
                      norm1=norm(affine=True, track=False, eps=0.1, mean_scale=0.0, log_var=(-5.77, -5.74),
                                 gamma="mixed"),
                      conv2=conv(cin=3, cout=3, groups=1, bias=True, padding_mode="reflect"),
                      norm2=norm(affine=False, mean_scale=30.0, log_var=(-0.48, 0.0), gamma="positive")),
             ConvNorm(conv=conv(cin=3, cout=6, groups=3, bias=False), through=None, act=True,
                      norm=norm(affine=True, mean_scale=30.0, log_var=(-5.33, 0.0), gamma="negative"))),
        ), merge="cat", norm=norm(kind="functional", affine=True, mean_scale=0.0, log_var=(0.0, 2.32),
                                  gamma="negative", beta_scale=5.0)),
        ConvNorm(conv=conv(cin=8, cout=1, kernel=2, padding=1, dilation=1, groups=1, bias=False), norm=None,
                 through=None, act=False),
    ))  # fmt: skip
    built = build(spec)
    check_fold(built.model, _inputs_for(spec, built), built.expect, repr(spec))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(block=block_specs((3, 1)))
def test_regression_no_transposed_length_one_output(block: Any) -> None:
    """Fuzz seed 1002 (a torch bug, not ours): ``Conv1d(3, 14, 1, stride=2, padding=1, dilation=2)``
    on ``randn(4, 1, 3).transpose(1, 2)`` segfaults in torch 2.13 on CPU (contiguous input works),
    which killed the fuzz run. The generator no longer draws the transposing SeqLinear block on
    length-1 input."""
    assert not isinstance(block, SeqLinear)


def test_regression_drop_fp16_running_mean_rounding() -> None:
    """Seed 7 (fuzz test bug): in float16 the shifted ``running_mean - bias`` is rounded once to
    float16, so after a train-mode step the dropped model's running mean differs from the
    original's minus the bias by that rounding (times 1 - momentum), not by float64 noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2, affine=False))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.7]))
    model = model.half().eval()
    result = check_drop(model, _sets((1,), torch.float16), {"0": "1"}, "fp16 linear-bn", inplace=True)
    assert [d.layer for d in result.dropped] == ["0"]


class _AddThenBatchStats(nn.Module):
    """``bn2(relu(bn1(a(x) + b(x))))``: an add-bn fold, then a norm on batch statistics after a
    ReLU (``batch_statistics=False``: the same norm on running statistics)."""

    def __init__(self, batch_statistics: bool = True) -> None:
        super().__init__()
        conv = dict(kernel_size=3, padding=2, dilation=2, bias=False)
        self.a, self.b = nn.Conv3d(3, 6, groups=3, **conv), nn.Conv3d(3, 6, **conv)
        self.bn1 = nn.BatchNorm3d(6, affine=False)
        self.bn2 = nn.BatchNorm3d(6, eps=0.1, affine=False, track_running_stats=not batch_statistics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.relu(self.bn1(self.a(x) + self.b(x))))


def _add_then_batch_stats(batch_statistics: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(65535)  # the shrunk example's weights and statistics, drawn as build() does
        model = _AddThenBatchStats(batch_statistics)
    gen = torch.Generator().manual_seed(65535)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(6, generator=gen, dtype=torch.float64) * 30)
        model.bn1.running_var.copy_(10 ** (-2.0 + 2.75 * torch.rand(6, generator=gen, dtype=torch.float64)))
    return model.eval()


def test_regression_batch_statistics_after_relu() -> None:
    """Fuzz seed 20261201, example ~2000 (fuzz generator bug, not an engine bug): bn1 folds into
    a and b (add-bn), and the pre-bn2 values of the folded model are as close to float64 as the
    original's (largest error 2.3e-4 in both). bn2 normalizes on batch statistics after a ReLU:
    channel 0 is nearly dead (batch std 0.07 against 40-300 elsewhere), so its few non-zero
    elements, amplified 3x, decide the output's error, and there the original's rounding was 10x
    smaller than the fold's by chance: 2.3e-4 > allowed 1.8e-4 on U(0, 255) inputs. The generator
    now puts only running-statistics norms after a ReLU (AfterAct); so does this test."""
    model = _add_then_batch_stats(batch_statistics=True)
    x = _sets((3, 5, 4, 3), torch.float32, 65535)["wide"][0]
    folded = normfold.fold(model, x).model
    pre_norm = {}
    for name, m in (("original", model), ("folded", folded), ("exact", copy.deepcopy(model).double())):
        hook = m.bn2.register_forward_pre_hook(lambda _, args, name=name: pre_norm.update({name: args[0]}))
        normfold.run_model(m, (x.double() if name == "exact" else x,))
        hook.remove()
    exact = pre_norm["exact"]
    errors = {k: float((pre_norm[k].double() - exact).abs().max()) for k in ("original", "folded")}
    assert errors["folded"] <= 1.5 * errors["original"], errors  # the fold adds no error of its own

    expect = {"bn1": Expect("fold"), "bn2": Expect("keep", frozenset({"after_activation"}))}
    sets = _sets((3, 5, 4, 3), torch.float32, 65535)
    check_fold(_add_then_batch_stats(batch_statistics=False), sets, expect, "add-bn, bn after relu")


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(block=block_specs((1, 2, 2, 2), low_precision=True))
def test_regression_half_avg_pool3d(block: Any) -> None:
    """Fuzz seed 20261201, second run (fuzz generator bug): a float16 model
    ``Conv3d(1->1, k=1) -> AvgPool3d(2)`` on a (1, 2, 2, 2) input could not run at all (CPU has
    no ``avg_pool3d`` for float16/bfloat16). In low precision a 3d block passes through max pooling
    only."""
    assert not (isinstance(block, ConvNorm) and block.through == "avgpool"), block


class _ThreeWaySum(nn.Module):
    """``bn(a(x) + b(x) + c(x))``: two nested adds in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(1, 1, 1, bias=False) for _ in range(3))
        self.bn = nn.BatchNorm2d(1, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x) + self.c(x))


def test_regression_three_way_sum() -> None:
    """Fuzz seed 20261201, third run (fuzz generator bug; an engine limitation, not a wrong
    result): the generator expected a norm after a 3-branch sum to fold (add-bn), but
    ``a + b + c`` is ``add(add(a, b), c)`` and the planner follows one merge level (add-bn of two
    layers, concat-bn of any number), so it keeps the norm with ``merge_inputs``. Parity and the
    other properties hold; the generator now expects a fold only for two-branch sums."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _ThreeWaySum().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(3.0)
    result = check_fold(model, _sets((1, 2, 2), torch.float32), {"bn": Expect("any")}, "3-way sum")
    assert [s.code for s in result.skipped if s.norm == "bn"] in (["merge_inputs"], [])


def test_regression_fp16_fold_measured_beyond_the_rule() -> None:
    """Fuzz seed 647855096 (NORMFOLD_FUZZ_EXAMPLES=10000; a fuzz oracle gap, not a wrong result):
    a float16 ConvTranspose1d -> BN (running mean ~5e3 stds from zero) -> ConvTranspose1d -> BN:
    the folded layers leave float16's range where the original, which normalizes in its own op,
    does not; the gate measured the folds beyond the parity rule. Judged together, both were kept
    (cancellation, overflow); judged one at a time (the review of session 9: one failing fold
    took an exact one down with it), the overflowing one stays and the cancelling one folds where
    it is exact alone. The fuzzer forces each refused fold alone and asserts that it fails."""
    spec = fuzz_pins.SEED_647855096
    result = recheck_fold(spec)
    overflowing = {s.norm: s for s in result.skipped}["blocks.1.norm.bn"]
    assert overflowing.code == "overflow", overflowing
    assert "beyond the margin a fold at risk must keep" in overflowing.reason
    _folded_or_measured(result, "blocks.0.norm.bn")  # judged alone: exact here, so folded


def test_regression_cancelling_fold_beyond_the_rule_at_another_batch_size() -> None:
    """Fuzz seed 934055385, chunk 6 (a wrong fold passed): a float32 ``Conv3d -> BN`` (running
    mean ~20 stds from zero) before a batch-statistics norm. The gate judged the fold on the
    example inputs (batch 4) and passed it; at batch 5 the folded model's error was 4.8x the
    original's own on every normal draw here. The gate now judges a second batch size too; the
    fuzzer's oracle (fold and pass on every set, or a refusal whose forced fold fails the rule)
    holds on any CPU."""
    result = recheck_fold(fuzz_pins.SEED_934055385_CHUNK_6)
    _folded_or_measured(result, "blocks.0.norm.bn")
    assert {s.norm: s.code for s in result.skipped}.get("blocks.1.norm.bn") == "batch_statistics"


def test_regression_float32_cancellation_refusal_is_measured() -> None:
    """Fuzz seed 934055385, chunk 7 (a fuzz oracle gap, not a wrong result): a float32 BN subclass
    with running mean ~1e3 stds from zero after a grouped reflect-padded conv; the gate measured
    the fold beyond the parity rule and kept it (``cancellation``, clarification of item 7). The
    generator expected refusals in float16/bfloat16 only; it now accepts a measured refusal in
    any dtype, and the fuzzer forces the fold and asserts that it fails the rule."""
    result = recheck_fold(fuzz_pins.SEED_934055385_CHUNK_7)
    _folded_or_measured(result, "blocks.2.norm.bn")
    assert "blocks.0.norm2" in {f.norm for f in result.folded}


def test_regression_fold_at_the_edge_of_the_rule_on_other_inputs() -> None:
    """Fuzz seed 934055385, chunk 9 (a wrong fold passed): a float32 ``Conv3d -> functional BN``
    (running mean ~1e3, variance 10^-3.35..1, eps 0.1) in a residual block, then a ``Linear`` over
    its 40 positions. The gate judged the fold with the rule's full noise factor and passed it on
    its draws; on the fuzz's own U(0, 255) draw the folded model's error was 8.4x the original's
    own (3.6e-4 > 2.9e-4 allowed), on 4 of 60 further U(0, 255) draws beyond the rule, on 0 of 60
    normal ones: a fold at the edge of the rule passes or fails by the draw. The gate now judges
    with half the noise factor (``gate.MARGIN``) and keeps this norm with code ``cancellation`` (here:
    its uniform draws reach 1.2-2.2x that), and the fuzzer forces the fold and sees it fail that rule."""
    result = recheck_fold(fuzz_pins.SEED_934055385_CHUNK_9)
    _folded_or_measured(result, "blocks.0.norm2")
    assert {"blocks.0.norm1.bn", "blocks.1.norm.bn"} <= {f.norm for f in result.folded}


def _folded_or_measured(result: normfold.FoldResult, name: str) -> None:
    """``name`` folded (where this CPU's rounding keeps the fold within the rule), or kept with
    code ``cancellation`` for a measured reason (recheck_fold has forced the fold and seen it fail)."""
    if name in {f.norm for f in result.folded}:
        return
    kept = {s.norm: s for s in result.skipped}[name]
    assert kept.code == "cancellation" and "beyond the margin a fold at risk must keep" in kept.reason, kept
