"""What the commands print: tables, the before/after summary, the result line.

On a terminal the rows are tables; piped or redirected (a log, CI) the same rows are plain
``a | b | c`` lines that never wrap, so no cell is ever split. Every name that comes from a
user's file (a module path, a state-dict key, a file name) is escaped (:func:`~normfold.errors.printable`),
so it cannot start a line of its own. ``fold`` and ``inspect`` end with one line a pipeline can
grep: ``normfold: ok folded=8/8 kept=0 ...``. Nothing here computes: every number comes from the
library's result (:class:`~normfold.runs.FoldRun`, :class:`~normfold.runs.WriteRun`); fields a
result may not have yet are read with ``getattr(..., None)`` and left out when missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from normfold.cli.consoles import out_console
from normfold.cli.errors import cli_words
from rich.table import Table
from rich.text import Text

from normfold.errors import printable

if TYPE_CHECKING:
    from normfold.runs import FoldRun, WriteRun

Cell = str | Text


def line(text: str | Text) -> None:
    """One line of output, never wrapped (a pipe or a log keeps it whole), its names escaped."""
    out_console.print(_printable(text), soft_wrap=True, highlight=False, markup=False)


def _printable(cell: str | Text) -> Text:
    if isinstance(cell, Text):
        return cell if cell.plain.isprintable() else Text(printable(cell.plain), style=cell.style)
    return Text(printable(cell))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Cell]]) -> None:
    """A table on a terminal; elsewhere the title, the header and one ``a | b | c`` line per
    row, so no cell is ever split however narrow the log is."""
    rows = [[_printable(c) for c in row] for row in rows]
    title = printable(title)
    if out_console.is_terminal:
        shown = Table(title=title, title_justify="left")
        for col in columns:
            shown.add_column(col, overflow="fold")
        for row in rows:
            shown.add_row(*row)
        out_console.print(shown)
        return
    line(title)
    line(" | ".join(columns))
    for row in rows:
        line(" | ".join(c.plain for c in row))


def notes(texts: Iterable[str]) -> None:
    """The library's notes (how the model was taken: switched to eval mode, a dtype kept; how
    parity was judged), in the CLI's words like its errors."""
    for note in texts:
        line(f"note: {cli_words(note)}")


# fold and inspect ----------------------------------------------------------------------------------
def layers(run: FoldRun) -> None:
    """Every norm op: folded into what (pattern), or kept (code: reason); then merged blocks."""
    rows = []
    for r in run.layers:
        if r.action == "keep":
            action, detail = Text("keep", style="yellow"), f"{r.code}: {r.reason}"
        else:
            action = Text(r.action, style="green" if r.action == "fold" else "cyan")
            detail = f"{r.into} ({r.pattern})" + (f"; {r.reason}" if r.reason else "")
        rows.append((r.norm, r.norm_type, action, detail))
    table(f"Norm layers of {run.source}", ("norm", "type", "action", "into / reason"), rows)
    _merges(run)
    notes(run.notes)


def _merges(run: FoldRun) -> None:
    """Blocks of parallel branches: merged into one conv (where), or why they stay."""
    f = getattr(run, "fold", None)
    if f is None:
        return
    rows = [(m.block, " + ".join(m.branches), Text("merge", style="green"),
             m.into + (f"; {m.note}" if m.note else "")) for m in f.merged]  # fmt: skip
    rows += [(m.block, m.node, Text("keep", style="yellow"), f"{m.code}: {m.reason}") for m in f.not_merged]
    if rows:
        columns = ("block", "branches", "action", "into / reason")
        table("Parallel branches (reparameterization)", columns, rows)


def inspect_summary(run: FoldRun) -> None:
    s = run.summary()
    export_only = s["folded_in_export_only"]
    line(
        f"{s['folded']} of {s['norms']} norm ops would fold"
        + (f" ({export_only} in the export only)" if export_only else "")
    )


def _reports(run: FoldRun) -> dict[str, Any]:
    """Parity reports by runtime (PyTorch's, then the written file's; onnxruntime's for an ONNX model)."""
    return run.parity_reports()


def parity(run: FoldRun) -> None:
    rows = [
        (runtime, o.name, o.inputs, f"{o.max_abs_error:.2e}", f"{o.noise:.2e}", f"{o.exact_error:.2e}",
         f"{o.allowed_error:.2e}", Text("pass", style="green") if o.passed else Text("FAIL", style="red"))
        for runtime, rep in _reports(run).items()
        for o in rep.outputs
    ]  # fmt: skip
    columns = ("runtime", "output", "inputs", "vs original", "model noise", "vs float64", "allowed", "result")
    table("Parity with the original model", columns, rows)
    notes(run.parity.notes if run.parity is not None else ())


def _num(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # the JSON form of a non-finite float
        return value
    return f"{value:{spec}}" if math.isfinite(value) else str(value)


_STATS = (
    "mean_abs", "median_abs", "p99_abs", "max_abs", "p99_rel", "max_rel", "min_noise_factor", "min_atol"
)  # fmt: skip


def error_stats(run: FoldRun) -> None:
    """Polygraphy-style statistics per output (the input set where it came closest to failing):
    mean/median/p99/max absolute and relative error, and the smallest tolerances that pass."""
    try:
        from normfold.check.errstats import worst_per_output
    except ImportError:  # an older library: no statistics to show
        return
    rows = []
    for runtime, rep in _reports(run).items():
        for name, s in worst_per_output(rep.outputs).items():
            numbers = (_num(s.get(k), ".3g" if k == "min_noise_factor" else ".2e") for k in _STATS)
            rows.append((runtime, name, s.get("inputs", "-"), s.get("against", "-"), *numbers))
    if rows:
        columns = ("runtime", "output", "inputs", "vs", "mean abs", "median abs", "p99 abs", "max abs",
                   "p99 rel", "max rel", "min noise factor", "min atol")  # fmt: skip
        table("Error per output (worst input set; the smallest tolerances that would pass)", columns, rows)


#: Ops the before/after table shows (the ones folding changes), when any column has them
_SHOWN_OPS = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div")


def written(run: FoldRun, elapsed: float | None = None) -> None:
    """onnxsim-style before/after: ops, parameters (and MACs where the library counts them), the
    written file (size, opset, IR version, each input and output with dtype and shape), who did
    what (normfold's folds, the norms kept, the exporter's own changes), the steps' timings and
    the command's own elapsed time."""
    summary, e = run.summary(), run.export
    columns = {"original": summary["ops_original"], "folded": summary["ops_folded"]}
    if summary["ops_written"] is not None:
        columns["written (onnx)"] = summary["ops_written"]
    ops = [op for op in _SHOWN_OPS if any(op in c for c in columns.values())]
    rows = [(op, *(str(c.get(op, 0)) for c in columns.values())) for op in ops]
    if rows:
        aten = summary.get("source_format") != "onnx"
        how = " (ATen ops counted as the ONNX ops they become)" if aten else ""
        table(f"Ops before and after{how}", ("op", *columns), rows)
    params = f"parameters {summary['params_before']:,} -> {summary['params_after']:,}"
    if e is not None and e.parameters is not None:
        params += f" (written file: {e.parameters:,} initializer elements)"
    line(params)
    macs = (summary.get("macs_before"), summary.get("macs_after"))
    if None not in macs:
        line(f"MACs {macs[0]:,} -> {macs[1]:,}")
    if e is not None:
        extra = f", opset {e.opset}" if e.opset is not None else ""
        extra += f", IR version {e.ir_version}" if getattr(e, "ir_version", None) is not None else ""
        line(f"wrote {e.path} ({e.format}, {size(e.size_bytes)}{extra})")
        tensors(e)
    folded = f"normfold folded {summary['folded']} of {summary['norms']} norm ops"
    if summary["folded_in_export_only"]:
        folded += f" ({summary['folded_in_export_only']} in the export only)"
    kept = f"{summary['kept']} kept (reasons above)" if summary["kept"] else "none kept"
    removed = summary["exporter_removed_batchnorms"]
    exporter = ""
    if removed is not None:
        exporter = (
            f"; the ONNX exporter removed {removed} more BatchNormalization on its own"
            if removed else "; the ONNX exporter removed no BatchNormalization on its own"
        )  # fmt: skip
    line(f"{folded}; {kept}{exporter}")
    if e is not None and e.lowered:
        forms = ", ".join(sorted({low.into for low in e.lowered}))
        left = f"{e.batchnorm_nodes} left (notes say why)" if e.batchnorm_nodes else "none left"
        line(f"lowered {len(e.lowered)} kept BatchNormalization(s) to {forms}; {left} in the file")
    notes(e.notes if e is not None else ())
    timings(run.timings, elapsed)


def tensors(e: Any) -> None:
    """The written graph's inputs and outputs: ``inputs: x float [batch, 3, 32, 32]``."""
    for role in ("inputs", "outputs"):
        shown = getattr(e, role, None)
        if shown:
            described = ", ".join(f"{t.name} {t.dtype} [{', '.join(map(str, t.shape))}]" for t in shown)
            line(f"{role}: {described}")


def timings(steps: Mapping[str, float], elapsed: float | None) -> None:
    text = "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items())
    if elapsed is not None:
        text += f"; elapsed {elapsed:.2f}s in all (imports included)"
    line(text)


def result_line(run: FoldRun) -> str:
    """The last line, for pipelines to grep: ``normfold: ok folded=F/N kept=K ...``."""
    s = run.summary()
    parts = [f"normfold: ok folded={s['folded']}/{s['norms']}", f"kept={s['kept']}"]
    if s["blocks_merged"] or s["blocks_not_merged"]:
        parts.append(f"merged={s['blocks_merged']}/{s['blocks_merged'] + s['blocks_not_merged']}")
    if s["exporter_removed_batchnorms"] is not None:
        parts.append(f"exporter_removed_bn={s['exporter_removed_batchnorms']}")
    runtimes = list(run.parity_reports())
    if runtimes:
        parts.append(f"parity=pass({','.join(runtimes)})")
    parts.append(f"out={run.export.path}" if run.export is not None else "out=none")
    return " ".join(parts)


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# recalibrate, drop-bias, swap ----------------------------------------------------------------------
def recalibrated(run: WriteRun) -> None:
    notes(run.notes)
    rows = [
        (r.norm, str(r.level), f"{r.values:,}", f"{r.mean_drift:.3g}", f"{r.std_drift:.3g}")
        for r in run.result.norms
    ]
    columns = ("norm", "level", "values", "mean drift (std)", "std drift")
    table(f"Recalibrated norms of {run.source}", columns, rows)
    for norm, reason in run.result.skipped.items():
        line(f"kept {norm}: {reason}")
    line(f"recalibrated {len(run.result.norms)} norms in {run.result.passes} passes; wrote {run.out}")


def dropped(run: WriteRun) -> None:
    notes(run.notes)
    r = run.result
    for d in r.dropped:
        line(f"dropped {d.layer}.bias ({d.params:,} params) into {d.norm}")
    for k in r.kept:
        line(f"kept {k.layer or '-'} -> {k.norm}: {k.code}: {k.reason}")
    _export(run)
    line(f"dropped {len(r.dropped)} biases, {r.params_saved:,} parameters; wrote {run.out}")


def swapped(run: WriteRun, to: str) -> None:
    notes(run.notes)
    r = run.result
    for sw in r.swapped:
        groups = f" ({sw.num_groups} groups)" if sw.num_groups else ""
        line(f"swapped {sw.module}: {sw.from_type} -> {sw.to_type}{groups}")
    for k in r.skipped:
        line(f"kept {k.module}: {k.code}: {k.reason}")
    if r.drift is not None:
        line(
            f"output drift (by design): max rel error {r.drift.max_rel_error:.3g}, "
            f"cosine {r.drift.cosine_similarity:.4f}"
        )
    _export(run)
    line(f"swapped {len(r.swapped)} norms to {to}; wrote {run.out}")


def norms_folded(run: WriteRun) -> None:
    notes(run.notes)
    r = run.result
    _norm_records(r.folded, r.kept)
    line(f"proved against the loaded model: {'pass' if r.parity.passed else 'FAIL'}")
    _export(run)
    line(f"folded {len(r.folded)} norms, kept {len(r.kept)}; wrote {run.out}")


def checkpoint_folded(r: Any) -> None:
    """A checkpoint folder folded shard by shard (a ``NormAffineCheckpointResult``)."""
    notes(r.notes)
    _norm_records(r.folded, r.kept)
    line(f"proved norm by norm (each with its consumers): {'pass' if r.passed else 'FAIL'} ({len(r.proofs)})")
    line(f"folded {len(r.folded)} norms, kept {len(r.kept)}; wrote {len(r.files)} files into {r.out}")


def _export(run: WriteRun) -> None:
    """A ``.pt2``/``.onnx`` a write command exported: its file, inputs and outputs, its check."""
    e = run.export
    if e is None:
        return
    extra = f", opset {e.opset}" if e.opset is not None else ""
    line(f"exported {e.path} ({e.format}, {size(e.size_bytes)}{extra})")
    tensors(e)
    for runtime, rep in e.parity.items():
        n = len(rep.outputs)
        line(f"checked in {runtime}: {'pass' if rep.passed else 'FAIL'} ({n} comparison{'s' * (n != 1)})")


def _norm_records(folded: Any, kept: Any) -> None:
    """One line per folded norm (``NormFolded``) and per kept one (``NormKept``)."""
    for f in folded:
        changed = (("new bias", f.new_biases), ("untied", f.untied))
        extra = "".join(f"; {what} {', '.join(names)}" for what, names in changed if names)
        shift = f" ({f.code}: {f.reason})" if f.code else ""
        line(f"folded {f.norm} ({f.norm_type}) into {', '.join(f.into)}{extra}{shift}")
    for k in kept:
        line(f"kept {k.norm}: {k.code}: {k.reason}")
