"""``fold_onnx``: fold the norms of an existing ``.onnx`` file; no PyTorch model needed.

1. **Load** the file (or a ``ModelProto``) into ``onnx_ir``, its external data (a model over
   2 GB) left on disk and mapped only where a value is read (each weight is unmapped once copied:
   :func:`normfold.engine.onnx_ops.as_tensor`); make every input dim concrete (the example inputs'
   sizes: given ``inputs``, ``input_shapes``, or :data:`DEFAULT_DIM` for a symbolic dim) and run
   ONNX shape inference for the shapes the rules read (the written model keeps its symbolic dims).
2. **Plan** with the engine's planner and rule table over :class:`~normfold.engine.onnx_view.OnnxView`
   (the same rules as the PyTorch path); initializers several layers share are split first, one
   copy per layer, and joined again where no fold changed them.
3. **Apply** (:mod:`normfold.engine.onnx_apply`): a weight folded on its output side is computed
   only when the model is written (:func:`~normfold.engine.onnx_apply.folded_values`), so the
   folded weights are never all in memory at once. Check the result with ``onnx.checker``
   (``full_check``: types and shapes too); with ``out``, **write** it first into the run's
   staging folder (:func:`normfold.io.onnx_file.write_onnx`: checked as written; weights over
   protobuf's 2 GB in ``<out>.<hash>.data`` beside it).
4. **Parity** (:mod:`normfold.check.onnx_parity`) of the folded model, the file as written when
   there is one, against the ORIGINAL, per element, by the project's rule
   (:mod:`normfold.check.parity`): both in onnxruntime with graph optimizations off, the exact
   reference a float64 run of the original in normfold's interpreter, the perturbed runs in
   onnxruntime.
5. **Commit** ``out`` by normfold's file rules (:mod:`normfold.io.files`: staged, never partial, no
   overwrite without ``force``, never over the input), only once parity passed.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from normfold.check.onnx_parity import parity_onnx
from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.engine import planner
from normfold.engine.branches import Merge, Unmerged
from normfold.engine.fold_records import Folded, Merged, NotMerged, Skipped
from normfold.engine.onnx_apply import rejoin_unchanged, split_shared
from normfold.engine.onnx_lower import Lowered, lower_kept
from normfold.engine.onnx_merge import merge_records, plan_merges
from normfold.engine.onnx_rounds import apply_rounds
from normfold.engine.onnx_shapes import concrete_shapes, run_shapes
from normfold.engine.onnx_values import OnnxValues
from normfold.engine.onnx_view import OnnxView
from normfold.engine.records import Keep, Plan
from normfold.errors import ExportError, LoadError, ParityError, UsageError, first_line
from normfold.io.export import commit_export, onnx_inline_limit
from normfold.io.files import OutputSet
from normfold.io.onnx_file import write_onnx
from normfold.io.onnx_run import DEFAULT_PROVIDERS, check_providers
from normfold.io.sniff import check_regular_file, sniff
from normfold.onnx_inputs import DEFAULT_DIM, Shapes
from normfold.onnx_inputs import example_feeds as _example_inputs
from normfold.options import check_lower_kept

__all__ = ["DEFAULT_DIM", "OnnxFoldResult", "fold_onnx", "load_onnx", "parity_onnx", "plan_onnx"]

@dataclass
class OnnxFoldResult:
    """What :func:`fold_onnx` produced: the folded model, one record per norm (the PyTorch path's
    :class:`~normfold.engine.fold_records.Folded`/:class:`~normfold.engine.fold_records.Skipped`),
    the parity report against the original, and op counts before and after."""

    model: onnx.ModelProto
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    parity: ParityReport | None = None
    out: Path | None = None
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the example inputs
    plan: Plan | None = field(default=None, repr=False)
    lowered: list[Lowered] = field(default_factory=list)  # kept BatchNormalizations written as other ops
    merged: list[Merged] = field(default_factory=list)  # blocks of parallel branches made one Conv
    not_merged: list[NotMerged] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, with the keys of :meth:`FoldResult.to_dict` where they mean the same."""
        return {
            "model_type": "onnx",
            "out": None if self.out is None else str(self.out),
            "folded": [asdict(f) for f in self.folded],
            "skipped": [asdict(s) for s in self.skipped],
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "lowered": [asdict(low) for low in self.lowered],
            "merged": [asdict(m) for m in self.merged],
            "not_merged": [asdict(m) for m in self.not_merged],
            "notes": list(self.notes),
            "parity": None if self.parity is None else self.parity.to_dict(),
        }


def fold_onnx(
    source: str | Path | onnx.ModelProto,
    out: str | Path | None = None,
    *,
    inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    input_shapes: Shapes | None = None,
    rule: ParityRule | None = None,
    force: bool = False,
    lower_kept: str | None = None,
    providers: Sequence[str] | None = None,
    reparameterize: bool = True,
) -> OnnxFoldResult:
    """Fold every norm of an ONNX model that folds exactly (module docstring); write ``out`` if
    given. ``inputs``: example inputs (in graph input order, or by input name); ``input_shapes``:
    shapes for generated inputs (input name -> shape, or one shape per graph input in order).
    ``lower_kept``: ``"mul-add"`` or ``"conv"`` writes every BatchNormalization that stays as
    those ops (:mod:`normfold.engine.onnx_lower`), for runtimes without it; checked with the rest.
    ``providers``: the onnxruntime execution providers the folded model is checked on, each against
    the original (default: the CPU one). ``reparameterize``: merge parallel conv branches of one
    tensor, summed, into one Conv (:mod:`normfold.engine.onnx_merge`). Raises ParityError
    (nothing written) when the folded model does not match the original."""
    check_lower_kept(lower_kept)
    providers = check_providers(providers)
    original, path = load_onnx(source)
    files = OutputSet({"out": out}, inputs=[path], force=force, formats={"out": (".onnx",)}) if out else None
    try:
        planned = prepare(original, inputs, input_shapes, path, reparameterize=reparameterize)
        staged = files.staged("out") if files is not None else None
        result = fold_planned(original, planned, rule, given=inputs is not None, staged=staged,
                              lower=lower_kept, providers=providers)  # fmt: skip
        if files is not None:
            commit_export(files)  # and the external data a replaced file of normfold's used, if unused now
            result.out = Path(out) if out is not None else None
        return result
    finally:
        if files is not None:
            files.close()


def fold_planned(
    original: onnx.ModelProto, planned: Planned, rule: ParityRule | None = None, *, given: bool = False,
    staged: Path | None = None, lower: str | None = None, providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> OnnxFoldResult:  # fmt: skip
    """Apply ``planned``'s plan (:func:`prepare`), lower what stays when ``lower`` names a form
    (:func:`~normfold.engine.onnx_lower.lower_kept`), check the folded model with ``onnx.checker``,
    write it to ``staged`` when given (:func:`normfold.io.onnx_file.write_onnx`: checked as
    written, weights over protobuf's 2 GB in a sibling external-data file; the caller commits it),
    and prove parity against ``original`` on that file (in memory without ``staged``), on each of
    ``providers``."""
    rule = rule if rule is not None else ParityRule()
    model = planned.model
    applied = apply_rounds(planned.view, planned.values, planned.plan, planned.merges,
                           reparameterize=planned.reparameterize)  # fmt: skip
    view = planned.view = applied.view  # of the graph as written
    planned.later, planned.final_kept = applied.later, applied.kept
    rejoin_unchanged(model, planned.copies, applied.changed)
    lowered, lower_notes = lower_kept(view, lower) if lower is not None else ([], [])
    candidate: bytes | Path
    if staged is None:
        folded = ir.serde.serialize_model(ir.external_data.load_to_model(model))  # a whole ModelProto
        try:
            candidate = folded.SerializeToString()  # serialized once: for the checker and onnxruntime
            onnx.checker.check_model(candidate, full_check=True)
        except Exception as e:
            raise ExportError(f"the folded model fails onnx.checker: {first_line(e)}") from e
    else:
        try:
            folded = write_onnx(model, staged, inline_limit=onnx_inline_limit())
        except ValueError as e:  # a graph over protobuf's 2 GB even without its weights
            raise ExportError(f"writing {staged.name} failed: {first_line(e)}; nothing was written") from e
        candidate = staged
    result = _result(original, folded, planned)
    result.lowered = lowered
    result.notes.extend(lower_notes)
    del applied, model, view  # the folded weights live in the model now, or in the file written
    if staged is not None:
        _release(planned)
    result.parity = parity_onnx(original, candidate, planned.feeds, rule, given=given, source=planned.source,
                                providers=providers)  # fmt: skip
    result.notes.extend(result.parity.notes)
    if not result.parity.passed:
        failed = ParityError(result.parity.verdict())
        failed.result = result  # the records and the parity report, for a failed run's report
        raise failed
    return result


def plan_onnx(
    source: str | Path | onnx.ModelProto,
    *,
    inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    input_shapes: Shapes | None = None,
    reparameterize: bool = True,
) -> OnnxFoldResult:
    """What :func:`fold_onnx` would fold and keep, decided by the same planner on the same example
    inputs, with nothing applied, run or written: ``model`` is the original, ``parity`` None and
    ``ops_after`` empty."""
    original, path = load_onnx(source)
    planned = prepare(original, inputs, input_shapes, path, reparameterize=reparameterize)
    return _result(original, None, planned)


@dataclass
class Planned:
    """The steps up to the plan: example inputs, the IR model (shared initializers split), its view."""

    feeds: dict[str, torch.Tensor]
    model: ir.Model
    copies: Any
    view: OnnxView
    values: OnnxValues
    plan: Plan
    source: Path | None = None  # the original's file: its external data lie beside it
    merges: list[Merge] = field(default_factory=list)
    unmerged: list[Unmerged] = field(default_factory=list)
    reparameterize: bool = True
    #: written by fold_planned: the rounds after the first (:mod:`normfold.engine.onnx_rounds`),
    #: and the last round's keeps (None: one round)
    later: list[tuple[Plan, list[Merge]]] = field(default_factory=list)
    final_kept: list[Keep] | None = None


def prepare(
    original: onnx.ModelProto,
    inputs: Sequence[Any] | Mapping[str, Any] | None,
    input_shapes: Shapes | None,
    source: Path | None = None,
    *,
    reparameterize: bool = True,
) -> Planned:
    """Steps 1 and 2 (module docstring): the example inputs, the IR model and its plan; the
    records of the plan are :func:`records`. ``source``: the file ``original`` was read from
    (:func:`load_onnx`), whose folder holds its external data; ``reparameterize``: the blocks of
    parallel branches are planned too (:func:`~normfold.engine.onnx_merge.plan_merges`)."""
    feeds = _example_inputs(original, inputs, input_shapes)
    shapes, types = concrete_shapes(original, {k: tuple(v.shape) for k, v in feeds.items()})
    run_shapes(original, feeds, shapes, source)
    # a copy: onnx_ir wraps the proto's tensors, and renaming a value renames its TensorProto
    model = ir.serde.deserialize_model(copy.deepcopy(original))
    if source is not None:
        ir.external_data.set_base_dir(model.graph, source.parent)
    copies = split_shared(model)
    view = OnnxView(model, shapes, types)
    values = OnnxValues(view)
    plan = planner.plan(view, values)
    merges, unmerged = plan_merges(view, values, plan) if reparameterize else ([], [])
    return Planned(feeds, model, copies, view, values, plan, source, merges, unmerged, reparameterize)


def _release(planned: Planned) -> None:
    """Drop the IR model once written: its weights (the folded ones in memory, the others mapped
    from the original's external data) are not needed by the parity runs, which read both files."""
    for value in planned.model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()
    planned.model = planned.view = planned.values = None  # type: ignore[assignment]


def records(original: onnx.ModelProto, planned: Planned) -> OnnxFoldResult:
    """What :func:`plan_onnx` returns for ``planned``: the records of its plan, nothing applied."""
    return _result(original, None, planned)


def _result(original: onnx.ModelProto, folded: onnx.ModelProto | None, planned: Planned) -> OnnxFoldResult:
    """The records of ``planned``'s plan; ``folded`` None for a plan only."""
    plan = planned.plan
    result = OnnxFoldResult(
        original if folded is None else folded, plan=plan, ops_before=_ops(original),
        ops_after={} if folded is None else _ops(folded),
        input_shapes={k: tuple(v.shape) for k, v in planned.feeds.items()},
    )  # fmt: skip
    result.folded = [_folded(planned.view, f) for f in plan.folds if not f.identity]
    result.skipped = [_skipped(k) for k in plan.kept]
    for where, name in _subgraph_norms(original.graph):  # kept, so --require-all sees them
        reason = f"{name} is inside the body {where}: control-flow bodies are not folded yet"
        result.skipped.append(Skipped(f"{where}/{name}", "BatchNormalization", "in_subgraph", reason, name))
    result.merged, result.not_merged, taken = merge_records(planned.merges, planned.unmerged)
    result.folded += taken
    for later, merges in planned.later:  # the rounds after merges
        result.folded += [_folded(planned.view, f) for f in later.folds if not f.identity]
        merged, _, taken = merge_records(merges, [])
        result.merged += merged
        result.folded += taken
    gone = {f.node for f in result.folded}
    final = {k.unit.nodes[0]: k for k in planned.final_kept or ()}  # the last round's reasons
    result.skipped = [_skipped(final[s.node]) if s.node in final else s
                      for s in result.skipped if s.node not in gone]  # fmt: skip
    return result


def load_onnx(source: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """A ``ModelProto`` as is, or a file: a regular file whose first bytes say ONNX
    (:func:`normfold.io.sniff.sniff`, as every input is checked before it is parsed), then parsed,
    its external data (a model over 2 GB) left in its files, next to ``path``."""
    if isinstance(source, onnx.ModelProto):
        return source, None
    if not isinstance(source, (str, Path)):
        raise UsageError(f"fold_onnx() expects a path or an onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    check_regular_file(path, "ONNX file")
    if sniff(path) != "onnx":
        raise LoadError(f"{path} is not an ONNX model: its first bytes are not those of an ONNX protobuf")
    try:  # external data stays on disk: read lazily (onnx_ir, mmap) where a value is needed
        return onnx.load(str(path), load_external_data=False), path
    except Exception as e:
        raise LoadError(f"cannot read {path} as ONNX: {first_line(e)}") from e


def _subgraph_norms(graph: onnx.GraphProto, where: str = "") -> list[tuple[str, str]]:
    """``(body path, node name)`` of every BatchNormalization in the bodies of ``graph``'s
    control-flow nodes, at any depth (a body path: ``<node>.<attribute>``, nested with ``/``)."""
    found = []
    for i, node in enumerate(graph.node):
        if where and node.op_type == "BatchNormalization":
            found.append((where, node.name or node.output[0]))
        for a in node.attribute:
            for body in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                inner = f"{node.name or f'{node.op_type}_{i}'}.{a.name}"
                found += _subgraph_norms(body, f"{where}/{inner}" if where else inner)
    return found


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def _skipped(keep: Keep) -> Skipped:
    unit = keep.unit
    return Skipped(unit.name, unit.module_type, keep.code, keep.reason, unit.nodes[0])


def _folded(view: OnnxView, fold: Any) -> Folded:
    into = ", ".join(dict.fromkeys(u.module for u in fold.updates))
    kinds = ", ".join(dict.fromkeys(u.module_type for u in fold.updates))
    unit = fold.unit
    return Folded(unit.name, unit.module_type, into, kinds, fold.pattern, "onnx", unit.nodes[0], fold.through)
