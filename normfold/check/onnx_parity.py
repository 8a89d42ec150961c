"""Parity of a folded ONNX model against the original, per element, by the project's rule
(:mod:`normfold.check.parity`), on the seeded input sets of :func:`~normfold.check.input_sets.parity_sets`.

Per input set, every run the rule needs:

* ``orig`` and ``cand``: the original and the candidate in onnxruntime (CPU, graph optimizations
  off for both: they would refold a BatchNormalization and hide a wrong fold), one session each,
  opened once for all input sets (:func:`normfold.io.onnx_run.open_session`); the candidate from
  the file as written when there is one;
* ``exact``: the original in float64 in normfold's interpreter (:mod:`normfold.check.onnx_exact`:
  onnxruntime's CPU provider has no float64 ``Conv``), its initializers read and widened once;
* ``pert_k`` (``rule.perturbations`` runs, made only when the candidate is not within the rule by
  the original's own error alone, as :func:`normfold.check.reference.check` does): the original in
  float32 with every floating initializer rounded from ``t * (1 + d)``
  (:func:`~normfold.check.onnx_exact.perturbed_initializers`, one draw per ``k`` for every input
  set). For a model whose floating initializers and inputs are all float32 they run in an
  onnxruntime session of the original opened for them (``orig`` runs in one opened from its file,
  as it is: serializing a copy costs as much as a run on a large model): a copy that also lists
  those initializers as graph inputs (ONNX IR >= 4: an initializer listed as an input is a default
  the feed may override), fed all of them. Otherwise (a float16 model, whose perturbed runs the rule makes in
  float32, or a graph onnxruntime cannot run with those inputs fed) the interpreter makes them.

The runs of the original are independent: they run side by side
(:func:`normfold.check.workers.run_all`: each on one thread, as many at once as torch may use
threads; one after another under ``OMP_NUM_THREADS=1``).

Without an exact run (an op the interpreter lacks, or a float64 copy over
``rule.exact_limit_bytes``) there are no perturbed runs either: the floor alone applies against
the original's own run, and the report's notes say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from normfold.check.input_sets import InputSet, parity_sets
from normfold.check.onnx_exact import (
    exact_run,
    initializer_tensors,
    over_limit,
    perturbed_initializers,
    run_graph,
)
from normfold.check.parity import compare_outputs, report_of
from normfold.check.parity_report import ParityReport
from normfold.check.parity_rule import ParityRule
from normfold.check.workers import run_all
from normfold.errors import ExportError, first_line
from normfold.io.onnx_run import DEFAULT_PROVIDERS, Session, open_session, runtime_name

__all__ = ["onnx_sets", "parity_onnx"]

_Outputs = dict[str, torch.Tensor]


def parity_onnx(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto | bytes | str | Path,
    feeds: Mapping[str, torch.Tensor],
    rule: ParityRule,
    *,
    given: bool = False,
    source: Path | None = None,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> ParityReport:
    """``candidate`` (a model, serialized or not, or the file written) against ``original`` on
    every input set (module docstring). ``source``: the file ``original`` was read from, whose
    folder holds its external data (``original`` may then hold only their locations).
    ``providers``: the candidate runs on each (one session each; the reference runs stay on the
    CPU provider and normfold's interpreter); with more than one, each output is named after its
    provider (``onnxruntime-cuda: y``) and the report passes only when every provider's does."""
    names = list(feeds)
    sets = onnx_sets(feeds, rule, given=given)
    typed = [dict(zip(names, s.inputs, strict=True)) for s in sets]
    base_dir = source.parent if source is not None else None
    wide, too_large = _wide(original, rule, base_dir)
    count = rule.perturbations if wide is not None else 0
    ref = _session(original, source)  # fed its initializers only for perturbed runs (_fed_session)
    out_names = [o.name for o in ref.session.get_outputs()]
    n = len(typed)
    tasks: list[Callable[[], Any]] = [partial(_run, ref, out_names, feed) for feed in typed]
    if wide is not None:
        tasks += [partial(exact_run, original, feed, None, wide) for feed in typed]
    results = run_all(tasks)  # side by side where torch may use several threads (check.workers)
    origs, exact, notes = results[:n], None, [too_large] if too_large else []
    if wide is not None:
        why = next((why for run, why in results[n : 2 * n] if run is None), None)
        exact, notes = ([run for run, _ in results[n : 2 * n]], []) if why is None else (None, [why])
    del ref, tasks  # the session (the tasks hold it too) and its weights freed before the candidate opens
    written = candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else candidate
    candidates = {}
    for provider in providers:
        cand = open_session(written, provider, name="the folded model")
        candidates[provider] = [_run(cand, out_names, feed) for feed in typed]
        del cand

    def judged(perturbed: list[list[_Outputs]]) -> ParityReport:
        outputs, problems = [], []
        for provider, runs in candidates.items():
            label = f"{runtime_name(provider)}: " if len(providers) > 1 else ""
            for i, (s, c) in enumerate(zip(sets, runs, strict=True)):
                compared, found = compare_outputs(origs[i], c, None if exact is None else exact[i], rule,
                                                  s.name, perturbed[i] if perturbed else ())  # fmt: skip
                outputs.extend(dataclasses.replace(o, name=label + o.name) for o in compared)
                problems.extend(label + p for p in found if label + p not in problems)
        return report_of(outputs, problems, tuple(notes))

    # the perturbed runs only where the candidate needs them (as check.reference.check): within the
    # rule by the original's own error alone (and decided by it), it passes with them too
    own = judged([])
    if exact is None or not count or (own.passed and own.decided):
        return own
    fed = _fed_session(original, source) if _perturbable(original, feeds) else None  # ref was freed above
    try:
        perturbed = _perturbed(original, typed, count, fed, out_names, base_dir)
    except Exception as e:  # as check.exact: the original's own error alone then, and said so
        notes.append(f"no perturbed run ({first_line(e)}); the model's own error alone")
        return judged([])
    return judged(perturbed)


def onnx_sets(feeds: Mapping[str, torch.Tensor], rule: ParityRule, *, given: bool = False) -> list[InputSet]:
    """The input sets :func:`parity_onnx` judges on (:func:`~normfold.check.input_sets.parity_sets`
    of ``feeds``), each tensor in its graph input's dtype, in graph input order."""
    sets = parity_sets(list(feeds.values()), rule, given=given)
    dtypes = [t.dtype for t in feeds.values()]
    return [InputSet(s.name, tuple(t.to(d) for t, d in zip(s.inputs, dtypes, strict=True))) for s in sets]


def _perturbable(model: onnx.ModelProto, feeds: Mapping[str, torch.Tensor]) -> bool:
    """Whether onnxruntime makes the perturbed runs: every floating initializer and input float32."""
    tp = onnx.TensorProto
    floating = {tp.FLOAT, tp.DOUBLE, tp.FLOAT16, tp.BFLOAT16}
    inits = [t.data_type for t in model.graph.initializer if t.data_type in floating]
    ins = [t.dtype for t in feeds.values() if t.is_floating_point()]
    return all(t == tp.FLOAT for t in inits) and all(t == torch.float32 for t in ins)


def _session(model: onnx.ModelProto, source: Path | None) -> Session:
    """The original's session, from its file when it has one."""
    if source is not None:
        return open_session(source, name="the original model")
    return open_session(model.SerializeToString(), name="the original model")


def _fed_session(model: onnx.ModelProto, source: Path | None) -> Session | None:
    """A session of the original whose floating initializers can all be fed (module docstring),
    or None where onnxruntime cannot open one (an op whose float input must be constant): the
    interpreter then makes the perturbed runs."""
    floating = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    data_dir = source.parent if source is not None else None
    try:
        session = open_session(_with_initializer_inputs(model, floating), name="the original model",
                               data_dir=data_dir)  # fmt: skip
    except ExportError:
        return None
    fed = {i.name for i in session.session.get_overridable_initializers()}
    return session if fed >= set(floating) else None


def _with_initializer_inputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """``model`` serialized with the initializers ``names`` also listed as graph inputs. The proto
    is not copied (it may be large): the inputs are appended for the serialization and removed."""
    graph = model.graph
    declared = {i.name for i in graph.input}
    wanted = set(names) - declared
    added = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if t.name in wanted]  # fmt: skip
    graph.input.extend(added)
    try:
        return model.SerializeToString()
    finally:
        del graph.input[len(graph.input) - len(added) :]


def _run(session: Session, out_names: list[str], feed: Mapping[str, Any]) -> _Outputs:
    arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
    try:
        got = session.session.run(out_names, arrays)
    except Exception as e:
        raise ExportError(f"onnxruntime failed to run {session.name}: {str(e).splitlines()[0]}") from e
    return {k: torch.from_numpy(np.asarray(a)) for k, a in zip(out_names, got, strict=True)}


def _wide(model: onnx.ModelProto, rule: ParityRule, base_dir: Path | None) -> tuple[Any, str | None]:
    """The initializers in float64 for the exact runs, or None and why (over the rule's limit)."""
    over = over_limit(model, rule.exact_limit_bytes)
    if over is not None:
        return None, over
    return initializer_tensors(model, torch.float64, base_dir), None


def _perturbed_tasks(
    model: onnx.ModelProto, typed: list[dict[str, torch.Tensor]], count: int, session: Session | None,
    out_names: list[str], base_dir: Path | None,
) -> list[Callable[[], list[_Outputs]]]:  # fmt: skip
    """One task per perturbation ``k``: its runs of every input set, in ``session`` (the
    original's, its floating initializers overridable), else in the interpreter in float32
    (module docstring)."""
    if not count:
        return []
    own = initializer_tensors(model, base_dir=base_dir)

    def runs(k: int) -> list[_Outputs]:
        noisy = perturbed_initializers(own, k)
        if session is not None:
            return [_run(session, out_names, {**feed, **noisy}) for feed in typed]
        with torch.no_grad():
            return [run_graph(model, feed, torch.float32, initializers={**own, **noisy}) for feed in typed]

    return [partial(runs, k) for k in range(count)]


def _perturbed(
    model: onnx.ModelProto, typed: list[dict[str, torch.Tensor]], count: int, session: Session | None,
    out_names: list[str], base_dir: Path | None,
) -> list[list[_Outputs]]:  # fmt: skip
    """Per input set, the ``count`` perturbed runs (:func:`_perturbed_tasks`)."""
    runs = run_all(_perturbed_tasks(model, typed, count, session, out_names, base_dir))
    return [[r[i] for r in runs] for i in range(len(typed))]
