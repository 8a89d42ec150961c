"""Differential fuzzer of ``normfold.fold``, independent of normfold's pattern list: random small
programs (``diff_programs.py``) over one tensor, folded with ``reparameterize=False`` and, where the
program has a sum (the only op a merge starts from), ``reparameterize=True``.

For every program and fold, on the eager module ``result.model`` *and* the program
``result.program`` (:func:`check_program`):

a. **no wrong fold**: ``normfold.verify(original, candidate, inputs)`` passes, and its verdict
   agrees with this file's own float64 truth (:class:`Truth`, below): a candidate the truth judges
   clearly wrong must fail verify, one it judges clearly right must pass it ("exact fold refused"
   otherwise), and a check that cannot decide anything must not pass;
b. ``result.replan_folds == 0``;
c. the input model (state_dict bytes, every module's training flag), the inputs and global state
   (torch RNG, default dtype, grad mode, deterministic-algorithms flag, ``sys.path``, threads)
   are unchanged.

**The truth** judges a candidate on verify's own input sets (the given inputs, its seeded normal
and uniform[0, 255] sets from :func:`normfold.check.reference.parity_sets`; a set on which the original
is not finite is left out, as verify does), per output and per slice ``c`` along every axis (a
channel, a sample, a row, ...; verify too judges slices), with ``exact`` a float64 copy of the
original run on float64 inputs, ``own_c`` the original's own error against it, ``pert_c`` the
errors of float64 runs with every floating parameter and buffer multiplied by ``1 + d``, ``|d| <``
one unit roundoff of its dtype (this file's own seeds: 4 runs, 8 before calling anything wrong),
``floor_c = atol + rtol * max|exact_c|`` (the rule's per-dtype table) and ``err_c`` the
candidate's error:

* *wrong*: some slice has ``err_c > 10 * (floor_c + 4 * max(own_c, every pert_c))``, or the
  candidate is not finite where the original and the float64 run are;
* *vacuous*: for some output, on every input set, ``4 * own >= max|exact| > 0`` over the whole
  output: the rule's noise allowance reaches the output's own scale by the original's own error
  alone, so the check decides nothing and must fail (an output below the fixed floor, ``atol``,
  is only *undecidable*: verify does not treat the floor as noise);
* *undecidable*: every output identical on every input set (verify compares nothing), a channel
  (axis-1 slice) whose noise alone reaches its magnitude (``4 * max(own_c, pert_c) >=
  max|exact_c| > 0``), an output whose whole allowance (floor included) reaches its magnitude on
  some set: counted, verify's verdict not asserted;
* *right*: every slice has ``err_c <= floor_c + 4 * max(own_c, second largest pert_c)``: within
  the rule's factor by the original's own error or by two of four perturbations (one heavy-tailed
  perturbation alone does not make a candidate right); per slice implies per output, so verify
  must pass it;
* otherwise *ambiguous*: no verdict of the truth, but (a) still wants verify to pass.

A program whose original output is not finite on the given inputs ("overflows in its own dtype")
is excluded from (a) and counted; (b) and (c) still hold.

Profiles, by environment variable:

* ``NORMFOLD_DIFF_EXAMPLES``: programs (default 100, the CI run: about 30 s of CPU, 60-90 s on a
  loaded 2-core machine, single-threaded); a release runs 10000 from a fresh seed;
* ``NORMFOLD_DIFF_SEED``: hypothesis seed instead of the default derandomized run;
* ``NORMFOLD_DIFF_CHUNK``: with a seed, chunk ``k`` of a campaign on it (hypothesis cannot resume a
  run): ``NORMFOLD_DIFF_EXAMPLES`` programs drawn from hypothesis seed ``1000 * SEED + k``, so ten
  chunks of 1000 make a seed's 10,000 across sessions, each with its own verdict;
* ``NORMFOLD_DIFF_DTYPES``: dtypes drawn (default ``float32,float64,float16,bfloat16``);
* ``NORMFOLD_DIFF_COLLECT=file.jsonl``: campaign mode: each failing program is appended to the
  file (index, repr, problems) instead of stopping the run; the test fails at the end if any::

    NORMFOLD_DIFF_EXAMPLES=10000 NORMFOLD_DIFF_SEED=$RANDOM NORMFOLD_DIFF_COLLECT=diff.jsonl \\
        .venv/bin/python -m pytest -s tests/test_diff_fuzz.py

A failure prints (in the assertion message, with or without ``-s``) the seed, the program's repr
(the shrunk one: hypothesis shrinks before it re-raises) and two commands: one rebuilds and
rechecks that program (``diff_programs.recheck``), one reruns the whole run.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from diff_programs import Add, Program, build, programs
from fuzz_models import fixed_constants
from helpers import exported, state_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from torch import nn

import normfold
from normfold.check.reference import parity_sets

EXAMPLES = int(os.environ.get("NORMFOLD_DIFF_EXAMPLES", "100"))
SEED = os.environ.get("NORMFOLD_DIFF_SEED")
CHUNK = os.environ.get("NORMFOLD_DIFF_CHUNK")
if CHUNK is not None and SEED is None:
    raise RuntimeError("NORMFOLD_DIFF_CHUNK numbers a chunk of a seeded campaign: set NORMFOLD_DIFF_SEED too")
#: the hypothesis seed of this run, and how messages name it (and rerun it)
HYPOTHESIS_SEED: int | None = None
RUN = "the default derandomized run"
if SEED is not None:
    HYPOTHESIS_SEED = int(SEED) * 1000 + int(CHUNK) if CHUNK is not None else int(SEED)
    RUN = f"NORMFOLD_DIFF_SEED={SEED}" + (f" NORMFOLD_DIFF_CHUNK={CHUNK}" if CHUNK is not None else "")
DTYPES = tuple(os.environ.get("NORMFOLD_DIFF_DTYPES", "float32,float64,float16,bfloat16").split(","))
COLLECT = os.environ.get("NORMFOLD_DIFF_COLLECT")
FACTOR = 4.0  # the parity rule's noise factor
WRONG = 10.0  # "clearly wrong": this many times the generous allowed error


# --------------------------------------------------------------------------- the float64 truth


def _leaves(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.detach().double() for t in _leaves(normfold.run_model(model, inputs))]


def _finite(leaves: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in leaves)


def _perturbed(wide: nn.Module, model: nn.Module, seed: int) -> nn.Module:
    """``wide`` (a float64 copy of ``model``) with every floating tensor set to ``model``'s value
    times ``1 + d``, ``|d| <`` the unit roundoff of its dtype."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    tensors = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731
    with torch.no_grad():
        for w, t in zip(tensors(wide), tensors(model), strict=True):
            if t.is_floating_point():
                u = torch.finfo(t.dtype).eps / 2
                w.copy_(
                    t.double() * (1 + (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * u)
                )
    return wide


def _slices(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The max of ``diff`` where ``mask`` (0 elsewhere) over each slice along every axis, the
    channel axis (1) first: one entry per slice (verify, too, judges slices along every axis)."""
    d = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype))
    out = []
    for axis in (1, 0, *range(2, d.dim())):
        flat = d.transpose(0, axis).reshape(d.shape[axis], -1)
        out.append(flat.max(dim=1).values if flat.shape[1] else torch.zeros(d.shape[axis], dtype=d.dtype))
    return torch.cat(out)


class Truth:
    """The original's outputs, its float64 run and perturbed float64 runs on verify's input sets."""

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.model, self.dtype = model, inputs[0].dtype
        sets = parity_sets(inputs, normfold.ParityRule(), seed=0, given=True)
        self.sets = []
        self.wide = copy.deepcopy(model).double()
        for s in sets:
            orig = _run(model, s.inputs)
            if s.name != "given" and not _finite(orig):
                continue  # verify drops it too
            wide_in = tuple(t.double() for t in s.inputs)
            self.sets.append((s.name, s.inputs, wide_in, orig, _run(self.wide, wide_in)))
        self.overflow = not _finite(self.sets[0][3])
        self.constant = [  # per output: identical on every set (verify compares nothing there either)
            any(all(torch.equal(s[k][j], self.sets[0][k][j]) for s in self.sets) for k in (3, 4))
            for j in range(len(self.sets[0][4]))  # k: the original's outputs, or the float64 run's
        ]
        self.perts: dict[int, list[list[torch.Tensor]]] = {}  # per set: float64 perturbed runs

    def _pert(self, k: int) -> list[list[torch.Tensor]]:
        if k not in self.perts:
            wide = _perturbed(copy.deepcopy(self.wide), self.model, k)
            self.perts[k] = [_run(wide, w) for _, _, w, _, _ in self.sets]
        return self.perts[k]

    def judge(self, candidate: nn.Module) -> tuple[str, str]:
        """("right" | "wrong" | "undecidable" | "ambiguous", the worst numbers)."""
        verdicts, worst = [], ""
        if all(self.constant):
            return "undecidable", "no output depends on the inputs"
        per_output: dict[int, list[str]] = {}
        for i, (name, inputs, _, orig, exact) in enumerate(self.sets):
            cand = _run(candidate, inputs)
            if len(cand) != len(exact) or any(c.shape != e.shape for c, e in zip(cand, exact, strict=True)):
                return "wrong", f"output structure differs on {name} inputs"
            for j, (o, e, c) in enumerate(zip(orig, exact, cand, strict=True)):
                verdict, how = self._leaf(i, j, o, e, c)
                verdicts.append(verdict)
                per_output.setdefault(j, []).append(verdict)
                if verdict != "right" and not worst:
                    worst = f"output {j} on {name} inputs: {how}"
        if "wrong" in verdicts:
            return "wrong", worst
        if any(all(v == "vacuous" for v in vs) for vs in per_output.values()):
            return "vacuous", worst  # an output no input set can judge
        for v in ("vacuous", "undecidable", "ambiguous"):
            if v in verdicts:
                return "undecidable" if v == "vacuous" else v, worst
        return "right", ""

    def _leaf(self, i: int, j: int, o: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> tuple[str, str]:
        if e.dim() < 2:
            o, e, c = o.reshape(-1, 1), e.reshape(-1, 1), c.reshape(-1, 1)
        mask = torch.isfinite(o) & torch.isfinite(e)
        if bool((mask & ~torch.isfinite(c)).any()):
            return "wrong", "not finite where the original and the float64 run are"
        tol = normfold.ParityRule().floor(self.dtype)
        scale = _slices(e.abs(), mask)
        floor = tol.atol + tol.rtol * scale
        own = _slices((o - e).abs(), mask)
        err = _slices((c - e).abs(), mask)

        def perts(n: int) -> torch.Tensor:
            runs = [self._pert(k)[i][j] for k in range(n)]
            return torch.stack([_slices((p - e).abs(), mask & torch.isfinite(p)) for p in runs])

        four = perts(4).sort(dim=0, descending=True).values

        def wrong(n: int) -> torch.Tensor:
            return err > WRONG * (floor + FACTOR * torch.maximum(own, perts(n).max(dim=0).values))

        how = (f"error {float(err.max()):.3g}, own error {float(own.max()):.3g}, "
               f"perturbed {float(four[0].max()):.3g}, max|exact| {float(scale.max()):.3g}")  # fmt: skip
        noise = torch.maximum(own, four[0])
        top = float(scale.max())
        whole = tol.atol + tol.rtol * top + FACTOR * float(noise.max())
        if bool(wrong(4).any()) and bool(wrong(8).any()):  # 8 runs only where 4 say wrong
            return "wrong", how
        if top > 0 and FACTOR * float(own.max()) >= top:
            return "vacuous", how  # the noise allowance reaches the output's scale by the own error alone
        ch = slice(0, e.shape[1])  # a channel of pure noise: nothing to judge there
        if bool(((FACTOR * noise[ch] >= scale[ch]) & (scale[ch] > 0)).any()) or whole >= top:
            return "undecidable", how
        if bool((err <= floor + FACTOR * torch.maximum(own, four[1])).all()):
            return "right", how
        return "ambiguous", how


# --------------------------------------------------------------------------- the checks


def _global_state() -> dict[str, Any]:
    return {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "rng state": torch.get_rng_state().numpy().tobytes(),
        "sys.path": list(sys.path),
    }


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _bytes(inputs: tuple[torch.Tensor, ...]) -> list[bytes]:
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in inputs]


def check_program(program: Program) -> Counter[str]:
    """Fold ``program``'s model both ways and check (a)-(c) (module docstring); raise an
    ``AssertionError`` listing every problem, else return what was seen (outcome counts)."""
    built = build(program)
    model, inputs = built.model, built.inputs
    before = (state_bytes(model), _flags(model), _bytes(inputs), _global_state())
    seen: Counter[str] = Counter()
    problems: list[str] = []
    truth = Truth(model, inputs)
    seen["overflow" if truth.overflow else "judged"] += 1
    # a merge starts at a sum of branches: reparameterize=True only where the program adds
    for reparam in (False, True) if any(isinstance(op, Add) for op in program.ops) else (False,):
        how = f"fold(reparameterize={reparam})"
        try:
            result = normfold.fold(model, inputs, reparameterize=reparam)
        except Exception as e:  # any raise on a valid program is a finding
            problems.append(f"{how} raised {type(e).__name__}: {e}")
            continue
        if result.replan_folds:
            problems.append(
                f"{how}: replan_folds == {result.replan_folds} (planning the folded program again)"
            )
        if result.program is None:
            problems.append(f"{how}: captured in parts: {result.uncaptured}")
        candidates = [("result.model", result.model)]
        candidates += [("result.program", exported(result.program))] if result.program is not None else []
        for what, candidate in candidates:
            where = f"{how} {what}"
            try:
                report = normfold.verify(model, candidate, inputs)
            except Exception as e:
                problems.append(f"{where}: verify raised {type(e).__name__}: {e}")
                continue
            if truth.overflow:
                continue
            verdict, numbers = truth.judge(candidate)
            seen[verdict] += 1
            failures = "; ".join(report.failures()[:3])
            if verdict == "wrong":
                agree = "verify refuses it too" if not report.passed else "VERIFY PASSES IT (wrong verdict)"
                problems.append(f"{where}: wrong fold ({agree}): {numbers}")
            elif verdict == "vacuous" and report.passed:
                problems.append(f"{where}: a vacuous check passed (4x the original's own error reaches the "
                                f"output's scale on every input set: {numbers})")  # fmt: skip
            elif verdict in ("undecidable", "vacuous"):
                seen["undecidable, verify passed" if report.passed else "undecidable, verify failed"] += 1
            elif not report.passed and verdict == "right":
                problems.append(f"{where}: exact fold refused (truth: right; {numbers}): {failures}")
            elif not report.passed:
                problems.append(f"{where}: fold outside the rule (verify fails, truth ambiguous: {numbers}): "
                                f"{failures}")  # fmt: skip
    after = (state_bytes(model), _flags(model), _bytes(inputs), _global_state())
    for name, b, a in zip(
        ("state_dict", "training flags", "inputs", "global state"), before, after, strict=True
    ):
        if b != a:
            changed = [k for k in b if b[k] != a[k]] if isinstance(b, dict) else ""
            problems.append(f"fold/verify changed the {name} {changed}")
    if problems:
        raise AssertionError(_report(program, problems))
    return seen


def _quoted(text: str) -> str:
    """Double quotes where they need no escape (a repr of plain names and numbers), else shlex's."""
    return f'"{text}"' if not any(ch in text for ch in '"$`\\!') else shlex.quote(text)


def _report(program: Program, problems: list[str]) -> str:
    seed = RUN
    env = (f"{RUN} " if SEED else "") + f"NORMFOLD_DIFF_EXAMPLES={EXAMPLES} "
    one_liner = f"from diff_programs import *; recheck({program!r})"
    return "\n".join([
        "differential fuzz failure:", *(f"  - {p}" for p in problems),
        f"program: {program!r}",
        f"hypothesis seed: {seed} (dtypes {','.join(DTYPES)})",
        f"recheck this program: cd tests && ../.venv/bin/python -c {_quoted(one_liner)}",
        f"rerun the run: {env}.venv/bin/python -m pytest -p no:cacheprovider tests/test_diff_fuzz.py",
    ])  # fmt: skip


# --------------------------------------------------------------------------- the property test

_SEEN: Counter[str] = Counter()
_FAILED: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads (and lose a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(test: Callable[..., None]) -> Callable[..., None]:
    """The run's hypothesis settings; the programs drawn depend on the seed only, never on what the
    process imported before (:func:`fuzz_models.fixed_constants`)."""
    configured = settings(
        max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)  # fmt: skip
    configured = configured if HYPOTHESIS_SEED is None else hypothesis_seed(HYPOTHESIS_SEED)(configured)

    @functools.wraps(configured)
    def run() -> None:
        with fixed_constants():
            configured()

    return run


@_settings
@given(program=programs(DTYPES))
def _diff_fuzz(program: Program) -> None:
    _SEEN["examples"] += 1
    if _SEEN["examples"] % 250 == 0:
        print(
            f"[{time.strftime('%H:%M:%S')}] diff fuzz: {_SEEN['examples']} examples {dict(_SEEN)}", flush=True
        )
    try:
        _SEEN.update(check_program(program))
    except AssertionError as e:
        if not COLLECT:
            raise
        _FAILED.append(str(e))
        with open(COLLECT, "a") as f:
            f.write(
                json.dumps({"index": _SEEN["examples"] - 1, "program": repr(program), "message": str(e)})
                + "\n"
            )


@pytest.mark.timeout(max(300, 5 * EXAMPLES))  # pyproject's per-test 300 s, scaled to a campaign
def test_diff_fuzz(record_property: Callable[[str, object], None]) -> None:
    """(a)-(c) on ``NORMFOLD_DIFF_EXAMPLES`` random programs (deterministic by default)."""
    start, before = time.monotonic(), Counter(_SEEN)
    _diff_fuzz()
    seen = _SEEN - before
    for key, value in seen.items():
        record_property(f"diff_{key}", value)
    print(f"normfold diff fuzz: {dict(seen)} in {time.monotonic() - start:.0f}s ({RUN})")
    assert not _FAILED, f"{len(_FAILED)} failing programs (in {COLLECT}); the first:\n{_FAILED[0]}"
    assert seen["examples"] >= EXAMPLES
    assert seen["judged"] >= 0.7 * seen["examples"]  # overflowing originals stay rare
