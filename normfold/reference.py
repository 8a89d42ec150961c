"""The original model as the reference of every parity check: its outputs on several input sets,
in its own dtype and in float64, and :func:`check`/:func:`verify` judging a candidate by the one
rule of :mod:`normfold.parity`.

**Input sets** (:func:`parity_sets`). Standard-normal inputs alone hide changes that only show at
other scales (a clamp inside a BN subclass never triggers on N(0, 1)), so every check runs on:

* ``given``: the caller's own inputs, when given (real data);
* ``normal``: seeded standard-normal inputs of the same shapes and dtypes;
* ``uniform[lo,hi]``: seeded uniform inputs over the rule's ``value_range`` (default 0..255, the
  range of raw image bytes), as polygraphy's ``--val-range``.

Only floating inputs are generated; integer and bool inputs are used as given in every set. A
generated set on which the *original* model's output is not finite (it overflows, e.g. fp16 on
0..255) tests nothing but the overflow and is dropped, with a note.

**Exact reference** (:func:`make_reference`, :mod:`normfold.exact`). Per input set: one run of
the original in its own dtype, one float64 run of a copy of it, and ``rule.perturbations``
(default 4) runs in its own dtype with its parameters perturbed by one rounding, which measure
its sensitivity to rounding (:mod:`normfold.parity`); a fixed count, made up front, so a failing
candidate is never judged twice. A model that already computes in float64 is its own exact
reference. Every forward runs on one intra-op thread, independent forwards side by side
(:mod:`normfold.workers`), so a busy core delays the check by its share only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from normfold.errors import TraceError, UsageError, first_line
from normfold.exact import exact_outputs
from normfold.limits import check_size
from normfold.parity import OutputParity, ParityReport, ParityRule, Tolerance, compare_outputs, report_of
from normfold.probe import isolated_rng
from normfold.workers import run_all

if TYPE_CHECKING:
    from normfold.fold_records import FoldResult

logger = logging.getLogger(__name__)

__all__ = [
    "InputSet",
    "Reference",
    "check",
    "make_reference",
    "parity_sets",
    "random_inputs",
    "run_model",
    "verify",
]

Inputs = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class InputSet:
    """One batch of positional inputs the models are compared on, and its name in reports."""

    name: str
    inputs: tuple[torch.Tensor, ...]


@dataclass
class Reference:
    """The original model's outputs on each input set: in its own dtype, and in float64 (``exact``,
    one tree per set, or None when there is no exact reference; ``notes`` say why); ``perturbed``
    holds, per set, the runs with perturbed parameters (:mod:`normfold.exact`)."""

    sets: list[InputSet]
    outputs: list[Any]
    exact: list[Any] | None
    notes: list[str] = field(default_factory=list)
    perturbed: list[list[Any]] = field(default_factory=list)
    cpu: bool = True  # False: the original lives on an accelerator (its forwards run one at a time)


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor], *, role: str = "model") -> Any:
    """Run ``model`` once in eval mode under ``torch.no_grad()``, restoring its training flags.

    Each input is cloned, so an in-place op inside the model cannot change the caller's tensors,
    and the global RNG state is restored afterwards (a forward that draws random numbers leaves
    a caller's seeded pipeline as it was). Raises :class:`TraceError` (naming ``role`` and the
    input shapes) when the forward raises.
    """
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    try:
        with _evaluating(model), torch.no_grad(), isolated_rng(device):
            return model(*(t.clone() for t in inputs))
    except Exception as e:
        raise TraceError(
            f"the {role} model ({type(model).__name__}) raised {type(e).__name__} during forward "
            f"on inputs of shape {describe_inputs(tuple(inputs))}: {first_line(e)}"
        ) from e


_running: dict[int, tuple[int, dict[nn.Module, bool]]] = {}  # id(model): (forwards in flight, flags)
_running_lock = threading.Lock()


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode; its training flags restored when the last of the forwards running
    it at once (:mod:`normfold.workers`) ends: the first one in saves them, the last one out
    restores them (each saving its own would restore the eval mode a sibling had set)."""
    with _running_lock:
        count, flags = _running.get(id(model), (0, {}))
        if count == 0:
            flags = {m: m.training for m in model.modules()}
            model.eval()
        _running[id(model)] = (count + 1, flags)
    try:
        yield
    finally:
        with _running_lock:
            count, flags = _running.pop(id(model))
            if count > 1:
                _running[id(model)] = (count - 1, flags)
            else:
                for module, training in flags.items():
                    module.training = training


def parity_sets(
    inputs: Sequence[torch.Tensor], rule: ParityRule, *, seed: int = 0, given: bool = True
) -> list[InputSet]:
    """The input sets of a check (module docstring). ``given=False`` says ``inputs`` are themselves
    the seeded standard-normal set (generated from shapes), so they are not repeated."""
    inputs = tuple(inputs)
    shapes = [tuple(t.shape) for t in inputs]
    check_size(shapes)
    sets = [InputSet("given" if given else "normal", inputs)]
    if not any(t.is_floating_point() for t in inputs):
        return sets
    gen = torch.Generator().manual_seed(seed + 7919)
    if given:
        sets.append(
            InputSet("normal", _like(inputs, lambda s: torch.randn(s, generator=gen, dtype=torch.float64)))
        )
    low, high = rule.value_range
    sets.append(
        InputSet(
            f"uniform[{low:g},{high:g}]",
            _like(inputs, lambda s: torch.rand(s, generator=gen, dtype=torch.float64) * (high - low) + low),
        )
    )
    return sets


def _like(
    inputs: tuple[torch.Tensor, ...], draw: Callable[[tuple[int, ...]], torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """New values for the floating inputs (same shape, dtype, device); the others as they are."""
    return tuple(
        draw(tuple(t.shape)).to(device=t.device, dtype=t.dtype) if t.is_floating_point() else t
        for t in inputs
    )


def make_reference(
    model: nn.Module, sets: Sequence[InputSet], rule: ParityRule, *, role: str = "original"
) -> Reference:
    """Run the original ``model`` on every set, and its float64 and perturbed copies where the rule
    allows (module docstring)."""
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
    exact, perturbed = exact_outputs(
        model, sets, rule, notes, lambda m, x, r: run_model(m, x, role=r), lambda t: run_all(t, cpu=cpu)
    )
    for note in notes:
        logger.info("parity: %s", note)
    return Reference(sets, outputs, exact, notes, perturbed, cpu)


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
    it, once. The sets run side by side, each on one intra-op thread (:mod:`normfold.workers`):
    ``run`` may be called from several threads at once."""
    candidates = run_all([lambda s=s: run(s.inputs) for s in reference.sets], cpu=reference.cpu)
    return _judge(reference, candidates, rule)


def _judge(reference: Reference, candidates: list[Any], rule: ParityRule) -> ParityReport:
    outputs: list[OutputParity] = []
    problems: list[str] = []
    for i, (s, candidate) in enumerate(zip(reference.sets, candidates, strict=True)):
        exact = reference.exact[i] if reference.exact is not None else None
        perturbed = reference.perturbed[i] if reference.perturbed else ()
        compared, found = compare_outputs(reference.outputs[i], candidate, exact, rule, s.name, perturbed)
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
    parity rule (:mod:`normfold.parity`): against a float64 run of ``reference``, allowing the
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
    args = _build_inputs(reference, inputs, input_shapes, input_dtype, seed)
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
    from normfold.fold_records import FoldResult

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


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def _default_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _build_inputs(
    reference: nn.Module,
    inputs: Inputs | None,
    input_shapes: Sequence[Sequence[int]] | None,
    input_dtype: torch.dtype | None,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    if inputs is not None and input_shapes is not None:
        raise UsageError("pass either inputs or input_shapes to verify(), not both")
    if inputs is None and input_shapes is None:
        raise UsageError(
            "verify() needs inputs to run the models on: pass `inputs` (a tensor or a sequence of "
            "tensors, one per forward argument) or `input_shapes` (e.g. input_shapes=[(1, 3, 224, 224)]) "
            "to generate seeded random inputs"
        )
    if inputs is not None:
        args = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise UsageError(f"inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
        out: list[torch.Tensor] = []
        for i, t in enumerate(args):
            if not isinstance(t, torch.Tensor):
                raise UsageError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if input_dtype is not None and (t.is_floating_point() or t.is_complex()):
                t = t.to(input_dtype)
            out.append(t)
        return tuple(out)

    first = _first_tensor(reference)
    return random_inputs(
        input_shapes,
        dtype=input_dtype if input_dtype is not None else _default_dtype(reference),
        seed=seed,
        device=first.device if first is not None else None,
    )


def random_inputs(
    input_shapes: Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs, one per shape, drawn on the CPU in float64 so the same seed
    gives the same values on every device, then cast to ``dtype`` and moved to ``device``."""
    shapes = _check_shapes(input_shapes)
    if not (dtype.is_floating_point or dtype.is_complex):
        raise UsageError(
            f"random inputs need a floating input dtype, got {dtype}; pass integer inputs explicitly"
        )
    draw_dtype = torch.complex128 if dtype.is_complex else torch.float64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=gen, dtype=draw_dtype).to(device=device or "cpu", dtype=dtype)
        for shape in shapes
    )


def _check_shapes(input_shapes: Any) -> list[tuple[int, ...]]:
    if isinstance(input_shapes, (str, bytes)) or not isinstance(input_shapes, Sequence):
        raise UsageError(f"input_shapes must be a sequence of shapes, got {type(input_shapes).__name__}")
    if input_shapes and all(isinstance(d, int) for d in input_shapes):
        raise UsageError(
            f"input_shapes is a sequence of shapes, one per input: wrap a single shape, e.g. "
            f"input_shapes=[{tuple(input_shapes)}]"
        )
    shapes: list[tuple[int, ...]] = []
    for i, shape in enumerate(input_shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise UsageError(f"input_shapes[{i}] must be a sequence of ints, got {shape!r}")
        dims = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise UsageError(f"input_shapes[{i}] must contain non-negative ints, got {dims!r}")
        shapes.append(dims)
    check_size(shapes)
    return shapes


def describe_inputs(args: tuple[torch.Tensor, ...]) -> str:
    return "[" + ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in args) + "]"
