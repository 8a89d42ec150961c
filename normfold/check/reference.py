"""The original model as the reference of every parity check: its outputs on several input sets,
in its own dtype and in float64, and :func:`check`/:func:`verify` judging a candidate by the one
rule of :mod:`normfold.check.parity`.

**Input sets** (:func:`~normfold.check.input_sets.parity_sets`): the caller's inputs, seeded
standard-normal ones and seeded uniform ones over the rule's ``value_range``. A generated set on
which the *original* model's output is not finite (it overflows, e.g. fp16 on 0..255) tests
nothing but the overflow and is dropped, with a note.

**Exact reference** (:func:`make_reference`, :mod:`normfold.check.exact`). Per input set: one run of
the original in its own dtype, one float64 run of a copy of it, and ``rule.perturbations`` (default
4) runs in its own dtype with its parameters perturbed by one rounding, which measure its
sensitivity to rounding (:mod:`normfold.check.parity`); a fixed count, made once, when a candidate
first needs them (:func:`check`: a candidate within the rule by the original's own error alone
passes with them too, so they are not made for it). A model that already computes in float64 is its
own exact reference. Every forward (:func:`~normfold.check.model_run.run_model`) runs on one
intra-op thread, independent forwards side by side (:mod:`normfold.check.workers`), so a busy core
delays the check by
its share only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from normfold.check.exact import exact_outputs
from normfold.check.input_sets import Inputs, InputSet, parity_sets, random_inputs, verify_inputs
from normfold.check.model_run import describe_inputs, run_model
from normfold.check.parity import compare_outputs
from normfold.check.parity_report import OutputParity, ParityReport, report_of
from normfold.check.parity_rule import ParityRule, Tolerance
from normfold.check.workers import run_all
from normfold.errors import UsageError

if TYPE_CHECKING:
    from normfold.engine.fold_records import FoldResult

logger = logging.getLogger(__name__)

__all__ = [  # input sets and model runs keep their import path here
    "InputSet",
    "Reference",
    "check",
    "describe_inputs",
    "make_reference",
    "parity_sets",
    "random_inputs",
    "run_model",
    "verify",
]


@dataclass
class Reference:
    """The original model's outputs on each input set: in its own dtype, and in float64 (``exact``,
    one tree per set, or None when there is no exact reference; ``notes`` say why); ``perturbed``
    holds, per set, the runs with perturbed parameters (:mod:`normfold.check.exact`), made by
    ``make_perturbed`` the first time a candidate needs them (:func:`check`)."""

    sets: list[InputSet]
    outputs: list[Any]
    exact: list[Any] | None
    notes: list[str] = field(default_factory=list)
    make_perturbed: Callable[[], list[list[Any]]] | None = field(default=None, repr=False)
    cpu: bool = True  # False: the original lives on an accelerator (its forwards run one at a time)
    _perturbed: list[list[Any]] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def perturbed(self) -> list[list[Any]]:
        """Per set, the perturbed runs (made once, on first use; empty without them)."""
        with self._lock:
            if self._perturbed is None:
                self._perturbed = self.make_perturbed() if self.make_perturbed is not None else []
            return self._perturbed


def make_reference(
    model: nn.Module,
    sets: Sequence[InputSet],
    rule: ParityRule,
    *,
    role: str = "original",
    exact: Callable[[], Callable[[tuple[torch.Tensor, ...]], Any]] | None = None,
) -> Reference:
    """Run the original ``model`` on every set, and its float64 and perturbed copies where the rule
    allows (module docstring); ``exact()``, when given, builds the float64 reference's runner in
    place of a float64 copy of ``model`` (a widened captured graph: :mod:`normfold.check.exact`)."""
    sets, notes = list(sets), []
    cpu = _on_cpu(model, sets)
    runs = run_all([lambda s=s: run_model(model, s.inputs, role=role) for s in sets], cpu=cpu)
    kept = [(s, out) for i, (s, out) in enumerate(zip(sets, runs, strict=True)) if i == 0 or _all_finite(out)]
    notes.extend(
        f"input set {s.name} dropped: the original model's output is not finite on it"
        for s in sets
        if all(s is not k for k, _ in kept)
    )
    sets, outputs = [s for s, _ in kept], [out for _, out in kept]
    exact_out, perturbed = exact_outputs(
        model, sets, rule, notes, lambda m, x, r: run_model(m, x, role=r), lambda t: run_all(t, cpu=cpu),
        exact,
    )
    for note in notes:
        logger.info("parity: %s", note)
    return Reference(sets, outputs, exact_out, notes, perturbed, cpu)


def _on_cpu(model: nn.Module, sets: Sequence[InputSet]) -> bool:
    tensors = [*model.parameters(), *model.buffers(), *(t for s in sets for t in s.inputs)]
    return all(t.device.type == "cpu" for t in tensors)


def _all_finite(tree: Any) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def check(
    reference: Reference, run: Callable[[tuple[torch.Tensor, ...]], Any], rule: ParityRule
) -> ParityReport:
    """Run a candidate (``run(inputs) -> outputs``) on every input set of ``reference`` and judge
    it. The sets run side by side, each on one intra-op thread (:mod:`normfold.check.workers`):
    ``run`` may be called from several threads at once.

    The perturbed runs are made only for a candidate that needs them: one within the rule by the
    original's own error alone (and decided by it) passes the rule with any perturbed runs too,
    since they only add noise, so it is judged by its own error alone and the perturbed runs are
    not made; any other candidate is judged by the whole rule, perturbed runs included."""
    candidates = run_all([lambda s=s: run(s.inputs) for s in reference.sets], cpu=reference.cpu)
    if reference.exact is not None and rule.perturbations:  # whether or not another candidate made them
        own = _judge(reference, candidates, rule, perturbed=False)
        if own.passed and own.decided:
            return own
    return _judge(reference, candidates, rule)


def _judge(
    reference: Reference, candidates: list[Any], rule: ParityRule, *, perturbed: bool = True
) -> ParityReport:
    outputs: list[OutputParity] = []
    problems: list[str] = []
    runs = reference.perturbed if perturbed else []
    for i, (s, candidate) in enumerate(zip(reference.sets, candidates, strict=True)):
        exact = reference.exact[i] if reference.exact is not None else None
        perturbed_i = runs[i] if runs else ()
        compared, found = compare_outputs(reference.outputs[i], candidate, exact, rule, s.name, perturbed_i)
        outputs.extend(compared)
        problems.extend(p for p in found if p not in problems)  # structural: the same on every set
    constant = _input_independent(reference)
    if constant:
        problems.append(constant)
    return report_of(outputs, problems, tuple(reference.notes), decided=not constant)


def _input_independent(reference: Reference) -> str | None:
    """A problem when the original gives bit-identical outputs on every input set (at least two
    sets with different inputs): its output does not depend on its input (constant, all zeros,
    a dead ReLU chain), so no fold before it can show."""
    if len(reference.sets) < 2:
        return None
    first = pytree.tree_leaves(reference.outputs[0])
    if not first or not all(isinstance(t, torch.Tensor) for t in first):
        return None
    for outputs in reference.outputs[1:]:
        leaves = pytree.tree_leaves(outputs)
        if len(leaves) != len(first) or not all(
            isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(first, leaves, strict=True)
        ):
            return None
    return (
        f"nothing was compared: the original's outputs are identical on all {len(reference.sets)} input "
        "sets (constant, all zeros or a saturated chain): they do not depend on the input, so they say "
        "nothing about the layers before them; give inputs that exercise the model (inputs=)"
    )


def verify(
    reference: nn.Module,
    candidate: nn.Module | ExportedProgram | FoldResult,
    inputs: Inputs | None = None,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    input_dtype: torch.dtype | None = None,
    seed: int = 0,
    rule: ParityRule | None = None,
    tolerances: Mapping[torch.dtype, Tolerance] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` on the same input sets and judge every output by the
    parity rule (:mod:`normfold.check.parity`): against a float64 run of ``reference``, allowing the
    fixed floor plus ``noise_factor`` times ``reference``'s own rounding error.

    ``inputs`` is one tensor (one positional argument) or a sequence of tensors (one argument
    each). Without ``inputs``, ``input_shapes`` (one shape per argument) builds seeded standard
    normal inputs: drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (so the same
    seed gives the same inputs on every device), in ``input_dtype``, then moved to the device of
    the reference's first parameter or buffer (CPU if it has none). ``input_dtype`` defaults to
    the dtype of the reference's first floating parameter, else float32; passed explicitly, it
    also casts user-given floating inputs (integer and bool inputs are never touched). Either way
    the check also runs on the generated sets of :func:`parity_sets`.

    ``rule`` (default :class:`ParityRule`) with ``tolerances``/``rtol``/``atol`` applied as in
    :meth:`ParityRule.of`. Both models run in eval mode under ``torch.no_grad()``; each
    submodule's ``training`` flag is restored afterwards.

    ``candidate`` is a module, an ``ExportedProgram`` (run through ``.module()``), or a
    :class:`~normfold.folding.FoldResult`: then every artifact it hands out is judged, the eager
    module (outputs named ``module: output...``) and the exported program (``program:
    output...``), against one reference, and the report passes only if both do.

    Raises :class:`UsageError` for inconsistent arguments and :class:`TraceError` when either
    model raises during its forward. A parity failure is not an exception: check
    :attr:`ParityReport.passed`.
    """
    if not isinstance(reference, nn.Module):
        raise UsageError(
            f"verify() expects the reference to be a torch.nn.Module, got {type(reference).__name__}"
        )
    artifacts = _artifacts(candidate)
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise UsageError(f"input_dtype must be a torch.dtype, got {input_dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an int, got {seed!r}")
    rule = ParityRule.of(rule, tolerances=tolerances, rtol=rtol, atol=atol)
    args = verify_inputs(reference, inputs, input_shapes, input_dtype, seed)
    logger.debug("verify: %d input(s) %s", len(args), describe_inputs(args))
    sets = parity_sets(args, rule, seed=seed, given=inputs is not None)
    ref = make_reference(reference, sets, rule, role="reference")
    if len(artifacts) == 1:
        ((_, only),) = artifacts
        return check(ref, lambda x: run_model(only, x, role="candidate"), rule)
    reports = {
        label: check(ref, lambda x, m=module, r=f"candidate {label}": run_model(m, x, role=r), rule)
        for label, module in artifacts
    }
    outputs = [
        dataclasses.replace(o, name=f"{label}: {o.name}") for label, r in reports.items() for o in r.outputs
    ]
    problems = [f"{label}: {p}" for label, r in reports.items() for p in r.problems]
    return ParityReport(
        outputs=tuple(outputs),
        problems=tuple(problems),
        notes=tuple(dict.fromkeys(n for r in reports.values() for n in r.notes)),
        decided=all(r.decided or r.passed for r in reports.values()),
    )


class _ProgramModule(nn.Module):
    """An exported program as a module :func:`run_model` can run: ``program.module()`` refuses
    ``eval()``/``train()``, and a program has no train mode to switch anyway."""

    def __init__(self, program: ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()

    def forward(self, *args: Any) -> Any:
        return self.program(*args)

    def train(self, mode: bool = True) -> _ProgramModule:
        return self


def _artifacts(candidate: Any) -> list[tuple[str, nn.Module]]:
    """The modules to judge: the candidate, a program's module, or a fold result's module and program."""
    from normfold.engine.fold_records import FoldResult

    if isinstance(candidate, FoldResult):
        found = [("module", candidate.model)]
        if candidate.program is not None:
            found.append(("program", _ProgramModule(candidate.program)))
        return found
    if isinstance(candidate, ExportedProgram):
        return [("program", _ProgramModule(candidate))]
    if isinstance(candidate, nn.Module):
        return [("candidate", candidate)]
    raise UsageError(
        "verify() expects the candidate to be a torch.nn.Module, an ExportedProgram or a FoldResult, "
        f"got {type(candidate).__name__}"
    )
