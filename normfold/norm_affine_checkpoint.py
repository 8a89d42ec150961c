"""``fold_norm_affine_checkpoint``: :func:`normfold.fold_norm_affine` applied to a sharded
safetensors checkpoint shard by shard, without ever loading the whole model.

1. **Structure** from a model instance whose module paths and parameter shapes are the
   checkpoint's, built without its weights (under ``torch.device("meta")``, or a random-init
   instance): captured once and planned exactly as the in-memory fold plans
   (:mod:`normfold.engine.norm_affine`); the planner reads the only values it needs (each norm's
   scale and shift) from the checkpoint. Every parameter of the instance must be in the checkpoint
   (under one of its names) with its shape, or nothing is done.
2. **Proof, fold by fold** (:mod:`normfold.check.group_parity`): a full-model float64 proof would
   need the whole model several times over, so each folded norm is proved *locally*: its affine
   tail and every consumer, original against folded, on seeded normalized rows, by the parity rule.
   A fold whose new values do not fit the stored dtype stays (``overflow``), as in memory.
3. **Write, shard by shard**: a plan (:mod:`normfold.norm_checkpoint_plan`, pure data) says which
   tensor goes under which name in which shard (raw bytes, or a folded value), what ``config.json``
   says (``tie_word_embeddings`` false whenever a tied head was untied), which files are copied
   (``config.json``, tokenizer files; weight files the fold did not read are skipped with a note);
   it is checked first (every parameter name of the model resolves in the output, every folded
   value was proved). The writer (:mod:`normfold.io.fold_shards`) applies it: each consumer weight
   is read, changed in float64 by the in-memory fold's own functions
   (:func:`~normfold.engine.norm_affine.records.consumer_weight`, ``consumer_bias``), cast to its
   stored dtype once, and written only when its SHA-256 is that of the value its proof ran on;
   every other tensor is copied as raw bytes. Output shards have the input's names and tensor order
   (new tensors last in their shard), with the index. Files follow :mod:`normfold.io.files`: the
   out folder checked before any work, files staged, committed together (the index last), never
   over an existing file without ``force``.

**What is proved**: for every folded norm, that the folded (norm, consumers) group computes the
original group's function on its normalized input, within the parity rule, with the exact values
that are written (cast to the stored dtype, float16/bfloat16 included: the candidate runs on the
cast values, in float32, as in memory; the writer checks their digests); that the planner found
these consumers as the only readers of the norm's output in the captured graph of the structure
instance. **What is not**: the whole model's output (no forward runs on the real weights), nor
that the structure instance computes what the checkpoint's model computes beyond its module paths
and shapes (a wrong class with the same names would be planned wrongly: run
:func:`normfold.fold_norm_affine` on a small config of the same class to check the plan end to
end).

**Memory**: one consumer weight at a time, held twice in its stored dtype (read, and folded),
with the float64 math and the proof's float32/float64 runs done in blocks of 32 MB
(:data:`~normfold.engine.norm_affine.records.BLOCK`) and the heap's free pages handed back between
blocks (:mod:`normfold.heap`); the small tensors of the folds (norm scales, new biases) are kept
from the proof to the write. Tensors copied unchanged move as raw bytes in 16 MB chunks. Measured
(``benchmarks/norm_affine_shards.py``): a 4.37 GB bfloat16 checkpoint, peak RSS growth 0.11x its
parameter bytes, most of it the 131 MB LM head twice and the capture of the structure.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.check.group_parity import GroupSide, prove_group
from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.dtypes import LOW_PRECISION
from normfold.engine.capture import capture
from normfold.engine.norm_affine.mapping import FORMATS, to_format
from normfold.engine.norm_affine.planner import ModuleFacts, plan
from normfold.engine.norm_affine.records import (
    NormFold,
    NormKept,
    NormPlan,
    blocks,
    consumer_bias,
    consumer_weight,
    consumer_weight_max,
    norm_values,
    overflow_reason,
    overflow_value,
    overflowing,
    scale_of,
    shift_of,
)
from normfold.engine.norm_affine.torch_norms import TorchNormView
from normfold.errors import LoadError, ParityError, UsageError
from normfold.heap import release
from normfold.io.fold_shards import check_out_folder, digest, write_folded
from normfold.io.sharded import ShardedCheckpoint
from normfold.norm_affine import NormFolded, module_facts, records_of
from normfold.norm_checkpoint_plan import make_shard_plan, output_files
from normfold.prepare import ExampleInputs, as_inputs, capture_options, working_copy

logger = logging.getLogger(__name__)

__all__ = ["NormAffineCheckpointResult", "fold_norm_affine_checkpoint"]


@dataclass
class NormAffineCheckpointResult:
    """What :func:`fold_norm_affine_checkpoint` wrote: the records of the in-memory fold, one
    local proof per folded norm (:attr:`proofs`, by norm name), the files placed."""

    out: Path
    files: list[Path] = field(default_factory=list)
    folded: list[NormFolded] = field(default_factory=list)
    kept: list[NormKept] = field(default_factory=list)
    proofs: dict[str, ParityReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parameter_bytes: int = 0  # the input checkpoint's tensor bytes
    plan: NormPlan = field(default_factory=NormPlan, repr=False)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.proofs.values())

    def norm_mappings(self) -> list[dict[str, Any]]:
        return to_format(self.plan, "llm-compressor")

    def mapping(self, format: str = "llm-compressor") -> list[Any]:
        """As :meth:`normfold.NormAffineResult.mapping`."""
        return to_format(self.plan, format)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "files": [str(f) for f in self.files],
            "folded": [asdict(f) for f in self.folded],
            "kept": [asdict(k) for k in self.kept],
            "proofs": {k: p.to_dict() for k, p in self.proofs.items()},
            "notes": list(self.notes),
            "parameter_bytes": self.parameter_bytes,
            "mappings": {name: self.mapping(name) for name in FORMATS},
        }


def fold_norm_affine_checkpoint(
    model: nn.Module,
    example_inputs: ExampleInputs,
    checkpoint: str | Path,
    out: str | Path,
    *,
    new_biases: bool = False,
    untie: bool = False,
    rule: ParityRule | None = None,
    force: bool = False,
) -> NormAffineCheckpointResult:
    """Fold every LayerNorm / RMSNorm / GroupNorm scale and shift of the checkpoint folder
    ``checkpoint`` into the Linear layers it feeds, writing the folded checkpoint to the folder
    ``out`` (created if missing; its parent must exist) shard by shard (module docstring).

    ``model``: an instance with the checkpoint's module paths and parameter shapes whose values
    are not used (build it under ``torch.device("meta")``: no memory); ``example_inputs``: what
    ``torch.export`` runs it on (moved to the meta device with a meta model). ``new_biases``,
    ``untie``: as :func:`normfold.fold_norm_affine`; ``rule``: the parity rule of each local proof;
    ``force``: replace files already in ``out``. Raises :class:`~normfold.errors.LoadError` when
    the checkpoint is no safetensors checkpoint folder or does not match ``model``,
    :class:`~normfold.errors.ParityError` when a fold's local proof fails (nothing is written),
    :class:`~normfold.errors.UsageError` for an ``out`` that may not be written.
    """
    if not isinstance(model, nn.Module):
        got = type(model).__name__
        raise UsageError(f"fold_norm_affine_checkpoint() expects a torch.nn.Module, got {got}")
    rule = ParityRule.of(rule)
    ckpt = ShardedCheckpoint.open(checkpoint)
    check_out_folder(ckpt, Path(out), output_files(ckpt)[0], force=force)  # before any work
    structure = working_copy(model, "fold_norm_affine_checkpoint", inplace=False).eval()
    inputs = as_inputs(example_inputs, "fold_norm_affine_checkpoint")
    tensors = [*structure.parameters(), *structure.buffers()]
    if any(t.dtype in LOW_PRECISION for t in tensors):  # planned in float32, as in memory
        structure.float()
        inputs = tuple(t.float() if t.dtype in LOW_PRECISION else t for t in inputs)
    if any(t.is_meta for t in tensors):
        inputs = tuple(t.to("meta") for t in inputs)
    facts = module_facts(structure, new_biases, untie)
    store = _Store(ckpt, facts)
    store.check_shapes(structure)
    cap = capture(structure, inputs, capture_options(inputs, True))
    the_plan = plan(TorchNormView.of(cap), facts, store.read)
    kept, proofs, extra, digests = list(the_plan.kept), {}, {}, {}
    folds = []
    for fold in the_plan.folds:
        try:
            proofs[fold.norm.name], small, proved = _prove(fold, store, rule)
        except _Overflow as e:
            kept.append(NormKept.of(fold.norm, "overflow", overflow_reason(fold.norm.name, str(e))))
            continue
        if not proofs[fold.norm.name].passed:
            verdict = proofs[fold.norm.name].verdict(f"the folded {fold.norm.name} and its consumers")
            raise ParityError(f"{verdict}; nothing was written")
        folds.append(fold)
        extra.update(small)
        digests.update(proved)
    final = NormPlan(folds=folds, kept=kept)
    folded, kept_records = records_of(final)
    result = NormAffineCheckpointResult(Path(out), folded=folded, kept=kept_records, proofs=proofs,
                                        parameter_bytes=ckpt.parameter_bytes(), plan=final)  # fmt: skip
    weights = {c.weight: (f, c) for f in folds for c in f.consumers}
    specs = {n: _entry_spec(store, n) for n in weights}
    specs.update({n: (store.dtype_of(n), tuple(t.shape)) for n, t in extra.items()})
    untied = {u for fold in folds for c in fold.consumers for u in c.untie}
    names = [n for n, _ in structure.named_parameters(remove_duplicate=False)]
    shard_plan = make_shard_plan(ckpt, names, facts.aliases, untied, specs, digests)

    def value(fqn: str, dtype: torch.dtype) -> torch.Tensor:
        if fqn in weights:
            return _weight(*weights[fqn], store)
        return extra[fqn].to(dtype)

    result.files = write_folded(ckpt, Path(out), shard_plan, value, force=force)
    notes = list(shard_plan.notes)
    result.notes.extend(notes)
    logger.info("norm affine (checkpoint): folded %d norm(s), kept %d", len(folded), len(kept_records))
    return result


class _Overflow(Exception):
    pass


class _Store:
    """Tensors of the checkpoint by the model's names (any name of a tied tensor)."""

    def __init__(self, ckpt: ShardedCheckpoint, facts: ModuleFacts) -> None:
        self.ckpt, self.facts = ckpt, facts

    def stored_name(self, fqn: str) -> str | None:
        for name in (fqn, *self.facts.aliases.get(fqn, ())):
            if self.ckpt.where(name) is not None:
                return name
        return None

    def read(self, fqn: str) -> torch.Tensor:
        name = self.stored_name(fqn)
        if name is None:
            raise LoadError(f"{fqn} is not in the checkpoint {self.ckpt.folder} (under any of its names)")
        return self.ckpt.read(name)

    def dtype_of(self, fqn: str) -> torch.dtype:
        name = self.stored_name(fqn)
        if name is not None:
            return self.ckpt.entry(name).torch_dtype
        layer, _, attr = fqn.rpartition(".")
        weight = f"{layer}.weight" if layer else "weight"  # a new bias takes its layer's weight dtype
        if attr != "bias" or self.stored_name(weight) is None:
            raise LoadError(f"{fqn} is not in the checkpoint {self.ckpt.folder} (under any of its names), "
                            f"nor the weight {weight} of its layer")  # fmt: skip
        return self.dtype_of(weight)

    def check_shapes(self, model: nn.Module) -> None:
        for fqn, p in model.named_parameters(remove_duplicate=False):
            name = self.stored_name(fqn)
            if name is None:
                raise LoadError(f"the model's parameter {fqn} is not in the checkpoint {self.ckpt.folder}: "
                                "the model instance does not match it")  # fmt: skip
            shape = self.ckpt.entry(name).shape
            if tuple(p.shape) != shape:
                raise LoadError(f"{fqn} has shape {tuple(p.shape)} in the model and {shape} in the "
                                f"checkpoint ({name}): the model instance must have the checkpoint's "
                                "shapes")  # fmt: skip


def _prove(
    fold: NormFold, store: _Store, rule: ParityRule
) -> tuple[ParityReport, dict[str, torch.Tensor], dict[str, str]]:
    """The local proof of ``fold``, its small new values (biases, the norm's own), float64, and
    the digest of every value the proof ran on (as stored: what the writer must write)."""
    norm = fold.norm
    gamma, beta = scale_of(norm, store.read), shift_of(norm, store.read)
    small = norm_values(fold, gamma, beta, store.read)
    w = store.read(norm.weight) if norm.weight is not None else None
    b = store.read(norm.bias) if norm.bias is not None else None
    fw = small[norm.weight].to(w.dtype) if w is not None and norm.weight is not None else None
    fb = small[norm.bias].to(b.dtype) if b is not None and norm.bias is not None else None
    pairs = ((norm.weight, fw), (norm.bias, fb))
    proved = {n: digest(t) for n, t in pairs if n is not None and t is not None}

    def sides() -> Iterator[GroupSide]:
        for c in fold.consumers:
            weight = store.read(c.weight)
            dtype = store.dtype_of(c.weight)
            folded = consumer_weight(c, gamma, weight, dtype)
            if not _finite(folded):  # the in-memory fold's wording, its largest value block by block
                raise _Overflow(overflow_value(c.weight, consumer_weight_max(c, gamma, weight), dtype))
            bias = store.read(c.bias) if c.bias is not None else None
            new_bias = c.bias or c.new_bias
            folded_bias = bias
            if beta is not None and fold.shift_kept is None and new_bias is not None:
                wide = consumer_bias(c, beta, weight, bias)
                folded_bias = wide.to(store.dtype_of(new_bias))
                if not bool(folded_bias.isfinite().all()):
                    raise _Overflow(overflow_value(new_bias, wide.abs().max().item(), folded_bias.dtype))
                small[new_bias] = wide
                proved[new_bias] = digest(folded_bias)
            proved[c.weight] = digest(folded)
            yield GroupSide(c.weight, weight, bias, c.in_axis, c.channels, folded, folded_bias)
            del weight, folded
            release()

    report = prove_group(norm.kind, (w, norm.weight_offset, b), (fw, fb), sides, rule,
                         channels=norm.channels, label=norm.name)  # fmt: skip
    bad = overflowing(dataclasses.replace(fold, consumers=()), small, store.dtype_of)
    if bad is not None:  # the shift kept in the norm, beta / gamma
        raise _Overflow(bad)
    return report, small, proved


def _finite(t: torch.Tensor) -> bool:
    """Every element finite, checked block by block (``isfinite`` of a whole bfloat16 weight
    widens it to float32 first)."""
    return all(bool(t[s].isfinite().all()) for s in blocks(t.shape))


def _entry_spec(store: _Store, fqn: str) -> tuple[torch.dtype, tuple[int, ...]]:
    entry = store.ckpt.entry(store.stored_name(fqn) or fqn)
    return entry.torch_dtype, entry.shape


def _weight(fold: NormFold, c: Any, store: _Store) -> torch.Tensor:
    """The folded weight of consumer ``c`` in its stored dtype (recomputed: the same function, the
    same bits as the proved one)."""
    return consumer_weight(c, scale_of(fold.norm, store.read), store.read(c.weight), store.dtype_of(c.weight))
