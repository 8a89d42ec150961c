"""``fold_norm_affine``: move every LayerNorm / RMSNorm / GroupNorm scale and shift into the Linear
layers the norm feeds, and prove the result against the original.

1. **Capture** the model once (``torch.export``, in float32 for a float16/bfloat16 model);
2. **plan** (:mod:`normfold.engine.norm_affine`, pure data): every norm found by its pattern
   (never by its module type) is folded, or kept with a stable code and a reason;
3. **values** in float64 from the original's parameters, written into a float32 (or the model's
   own dtype) copy, which is **proved** against the original: every output on the rule's input
   sets, with the original's captured graph widened to float64 as the exact reference
   (:mod:`normfold.check.widened_parity`); a failure raises :class:`~normfold.errors.ParityError`
   and changes nothing;
4. the proved float64 values are cast to the model's dtype **once** into the returned model (a
   deep copy unless ``inplace=True``); **re-planning** the folded model finds nothing more to fold
   (:attr:`NormAffineResult.replan_folds`).

The norm modules stay, parameter-free (scale 1, or 0 in the ``(1 + w)`` form; shift 0), so the
model's class, module paths and state-dict keys do not change; a consumer without a bias gets
one only with ``new_biases=True`` (``nn.Linear`` modules).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.check.widened_parity import widened_parity
from normfold.dtypes import LOW_PRECISION
from normfold.engine.capture import capture
from normfold.engine.norm_affine.apply import apply_plan, tensor_of
from normfold.engine.norm_affine.mapping import FORMATS, to_format
from normfold.engine.norm_affine.planner import ModuleFacts, keep_overflowing, plan
from normfold.engine.norm_affine.records import NormKept, NormPlan
from normfold.engine.norm_affine.torch_norms import TorchNormView
from normfold.errors import ParityError, UsageError
from normfold.prepare import ExampleInputs, as_inputs, capture_options, check_materialized, working_copy

logger = logging.getLogger(__name__)

__all__ = ["NormAffineResult", "NormFolded", "NormKept", "fold_norm_affine"]


@dataclass(frozen=True)
class NormFolded:
    """A norm whose scale (and shift, unless ``code`` says it stays) moved into ``into``.

    ``into``: the consumer weights (FQNs); ``new_biases``: biases created for the shift;
    ``code``/``reason``: set when the shift stays in the norm (``new_bias_needed``); ``untied``:
    consumer parameters that were shared (a tied LM head) and now are the consumer's own copy."""

    norm: str
    kind: str
    pattern: str
    norm_type: str
    into: tuple[str, ...]
    new_biases: tuple[str, ...] = ()
    code: str | None = None
    reason: str | None = None
    untied: tuple[str, ...] = ()  # consumer weights given their own copy (``untie=True``)


@dataclass
class NormAffineResult:
    """What :func:`fold_norm_affine` produced: the folded model, one record per norm, the proof."""

    model: nn.Module
    folded: list[NormFolded] = field(default_factory=list)
    kept: list[NormKept] = field(default_factory=list)
    parity: ParityReport | None = None
    replan_folds: int = 0  # folds found when planning the folded model again (0 expected)
    notes: list[str] = field(default_factory=list)  # what the caller must know (untied weights)
    plan: NormPlan = field(default_factory=NormPlan, repr=False)
    #: the folded model as captured for the re-plan (in float32 for a float16/bfloat16 model: the
    #: model that was proved)
    program: ExportedProgram | None = field(default=None, repr=False)

    def norm_mappings(self) -> list[dict[str, Any]]:
        """Each folded norm's module and the modules of the Linear layers it feeds, as llm-compressor's
        ``NormMapping(norm=..., linears=[...])`` takes them (exact module names; a layer written in a
        ``forward`` is named by its weight): normfold's discovery in place of a per-model table."""
        return to_format(self.plan, "llm-compressor")

    def mapping(self, format: str = "llm-compressor") -> list[Any]:
        """The norm -> consumers map as ``format`` takes it: ``"llm-compressor"`` (``NormMapping``
        fields), ``"aimet"`` (``RMSNORM_LINEAR_PAIRS`` pairs of names) or ``"autoround"``
        (``AWQConfig(mappings=...)`` entries); plain data (:mod:`normfold.engine.norm_affine.mapping`
        cites each tool's source)."""
        return to_format(self.plan, format)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": type(self.model).__name__,
            "folded": [asdict(f) for f in self.folded],
            "kept": [asdict(k) for k in self.kept],
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "replan_folds": self.replan_folds,
            "notes": list(self.notes),
            "mappings": {name: self.mapping(name) for name in FORMATS},
        }


def fold_norm_affine(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    inplace: bool = False,
    new_biases: bool = False,
    untie: bool = False,
    dynamic_batch: bool = True,
    rule: ParityRule | None = None,
) -> NormAffineResult:
    """Fold the scale and shift of every LayerNorm / RMSNorm / GroupNorm into the Linear layers it
    feeds, where every reader of its output is such a Linear (module docstring).

    ``example_inputs``: what ``torch.export`` runs the model on (and the first parity set). The
    caller's model is left untouched unless ``inplace=True``; the returned model is in eval mode.
    ``new_biases``: give an ``nn.Linear`` without bias a new one where a LayerNorm's shift must go
    (a state-dict key the user's class may not load back: off by default, the shift then stays in
    the norm as ``beta / gamma``, code ``new_bias_needed``). ``untie``: a consumer weight shared with
    another reader (a tied LM head and its embedding) becomes the consumer's own copy and folds
    (``NormFolded.untied``; a Hugging Face ``config.tie_word_embeddings`` is set to False, since
    ``tie_weights()`` on save or load would tie it back to the unscaled embedding, and every other
    tensor the model registers under several names becomes a copy per name, since such a config
    no longer ties them on load and the checkpoint holds one of the names); by default such
    a norm stays (``tied_weight``). ``dynamic_batch``: capture with a dynamic batch axis, as
    :func:`normfold.fold` does (:attr:`NormAffineResult.program`). ``rule``: the parity rule of the
    proof (default :class:`~normfold.ParityRule`).
    Raises :class:`~normfold.errors.ParityError` when the folded model does not pass it (nothing is
    changed then), :class:`~normfold.errors.TraceError` when the model cannot be captured.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"fold_norm_affine() expects a torch.nn.Module, got {type(model).__name__}")
    check_materialized(model)
    rule = ParityRule.of(rule)
    inputs = as_inputs(example_inputs, "fold_norm_affine")
    low = any(p.dtype in LOW_PRECISION for p in [*model.parameters(), *model.buffers()])
    original = working_copy(model, "fold_norm_affine", inplace=False).eval()
    if low:  # folded and proved in float32; cast back once at the end
        original.float()
        inputs = tuple(t.float() if t.dtype in LOW_PRECISION else t for t in inputs)
    options = capture_options(inputs, dynamic_batch)
    cap = capture(original, inputs, options)
    view = TorchNormView.of(cap)
    dtype_of = functools.partial(_dtype_of, model)
    the_plan = _plan(view, original, dtype_of, new_biases, untie)
    values = the_plan.values(functools.partial(tensor_of, original))
    proved = copy.deepcopy(original)
    apply_plan(proved, the_plan, values)
    report = widened_parity(original, cap.program, proved, inputs, rule)
    if not report.passed:
        raise ParityError(f"{report.verdict('the model with its norms folded')} ({len(the_plan.folds)} "
                          "norm(s) folded); nothing was changed")  # fmt: skip
    if low or inplace:
        target = working_copy(model, "fold_norm_affine", inplace=inplace).eval()
        apply_plan(target, the_plan, values)
    else:
        target = proved
    result = NormAffineResult(target, *records_of(the_plan), parity=report, plan=the_plan)
    _untie_config(result)
    again = capture(proved, inputs, options)
    replan = _plan(TorchNormView.of(again), proved, dtype_of, new_biases, untie)
    result.replan_folds, result.program = len(replan.folds), again.program
    logger.info("norm affine: folded %d norm(s), kept %d", len(result.folded), len(result.kept))
    return result


def _plan(
    view: TorchNormView,
    model: nn.Module,
    dtype_of: Callable[[str], torch.dtype],
    new_biases: bool,
    untie: bool,
) -> NormPlan:
    """The plan of ``view`` with values read from ``model`` (float32 for a float16 model: the same
    values), folds whose values overflow ``dtype_of`` (the caller's dtypes) kept."""
    value = functools.partial(tensor_of, model)
    return keep_overflowing(plan(view, module_facts(model, new_biases, untie), value), value, dtype_of)


def _dtype_of(model: nn.Module, fqn: str) -> torch.dtype:
    return tensor_of(model, fqn).dtype


def module_facts(model: nn.Module, new_biases: bool, untie: bool = False) -> ModuleFacts:
    """:class:`ModuleFacts` of ``model``: tensors under several names, Linear modules without bias,
    the modules registering each parameter."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    aliases: Mapping[str, tuple[str, ...]] = {
        n: tuple(o for o in group if o != n) for group in names.values() if len(group) > 1 for n in group
    }
    slots = {
        f"{path}.weight" if path else "weight": f"{path}.bias" if path else "bias"
        for path, m in model.named_modules()
        if type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear) and m.bias is None
    }
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    registered: dict[int, dict[str, str]] = {}
    for path, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if len(paths[id(m)]) == 1:  # a module at two paths is one object: no copy for one of them
                registered.setdefault(id(p), {})[path] = attr
    owners = {name: registered.get(i, {}) for i, group in names.items() for name in group}
    return ModuleFacts(aliases, slots, new_biases, owners, untie)


def _untie_config(result: NormAffineResult) -> None:
    """A Hugging Face config would tie an untied head back on save or load: say it is untied."""
    untied = [u for f in result.folded for u in f.untied]
    if not untied:
        return
    config = getattr(result.model, "config", None)
    if getattr(config, "tie_word_embeddings", None):
        config.tie_word_embeddings = False
        result.notes.append(f"untied {', '.join(untied)}: config.tie_word_embeddings set to False")
        copied = _copy_shared(result.model)
        if copied:
            result.notes.append(f"{', '.join(copied)}: each a copy of its own now (a tensor shared under "
                                "several names is saved under one, and an untied config no longer ties the "
                                "others back on load)")  # fmt: skip
    else:
        result.notes.append(f"untied {', '.join(untied)}: each is now a parameter of its own; code that "
                            "ties weights on load would tie it back to the unscaled original")  # fmt: skip


def _copy_shared(model: nn.Module) -> list[str]:
    """Give every other module registering a parameter already registered elsewhere its own copy
    (same value): with ``tie_word_embeddings`` False, Hugging Face's ``save_pretrained`` writes a
    shared tensor under one of its names and ``from_pretrained`` re-ties none of its other names
    (BERT's ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``: left at its init). The
    names copied."""
    first: dict[int, str] = {}
    copied = []
    with torch.no_grad():
        for path, module in model.named_modules():
            for attr, p in list(module.named_parameters(recurse=False)):
                name = f"{path}.{attr}" if path else attr
                if id(p) not in first:
                    first[id(p)] = name
                    continue
                setattr(module, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                copied.append(f"{name} (was {first[id(p)]})")
    return copied


def records_of(the_plan: NormPlan) -> tuple[list[NormFolded], list[NormKept]]:
    """The records of a plan: one :class:`NormFolded` per fold, its kept norms as they are."""
    folded = []
    for f in the_plan.folds:
        n = f.norm
        code, reason = f.shift_kept or (None, None)
        new = tuple(c.new_bias for c in f.consumers if c.new_bias is not None)
        untied = tuple(u for c in f.consumers for u in c.untie)
        into = tuple(c.weight for c in f.consumers)
        folded.append(NormFolded(n.name, n.kind, n.pattern, n.module_type, into, new, code, reason, untied))
    return folded, list(the_plan.kept)
