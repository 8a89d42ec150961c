"""The ``normfold`` command line: parse options, make one library call, render the result.

torch, onnx and onnxruntime are imported inside the commands, never at module level, so
``normfold --help`` and ``normfold --version`` stay instant. Library errors become exit codes in
one place (:func:`_guard`); the codes are listed in the README and in ``normfold --help``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from normfold import __version__
from normfold.errors import NormfoldError, UsageError

if TYPE_CHECKING:
    from normfold.pipeline import FoldRun

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it; SIGTERM 143, SIGHUP 129
EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 internal error, 2 usage error, 3 load error, "
    "4 trace error (model cannot be traced or run), 5 parity failure, 6 export failure, "
    "129/130/143 stopped by SIGHUP/SIGINT/SIGTERM (nothing written)."
)
_DEBUG = [False]  # set by --debug

app = typer.Typer(
    help="Fold eval-mode BatchNorm into Conv/ConvTranspose/Linear layers, prove parity, export ONNX.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


def _version(value: bool) -> None:
    if value:
        out_console.print(f"normfold {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an unexpected error.")
    ] = False,
) -> None:
    """normfold: fold BatchNorm, check parity, export ONNX."""
    _DEBUG[0] = debug


# Options shared by both commands -----------------------------------------------------------------
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A factory spec package.module:callable (e.g. normfold.models:resnet), a state_dict file "
        "(.pt/.pth/.bin/.safetensors, needs --model), or a pickled nn.Module (needs --trust).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--model", help="Factory spec that builds the architecture for a weights file."),
]
ArgsOpt = Annotated[
    str | None, typer.Option("--model-args", help="JSON object of factory keyword arguments.")
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust", help="Allow unpickling a whole nn.Module: this runs code from the file."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option("--input-shape", help="Input shape like 1,3,224,224; repeat for several inputs."),
]
DtypeOpt = Annotated[str | None, typer.Option("--input-dtype", help=f"Input dtype: {', '.join(_DTYPES)}.")]
InputsOpt = Annotated[
    Path | None,
    typer.Option("--inputs", help="torch.save file with a tensor or tuple of tensors (weights_only load)."),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", help="Write a JSON report to this path (with the output, as one set)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


@app.command("fold")
def fold_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .onnx or .pt2.")],
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="Export a fixed batch size.")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: exporter's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Override the relative tolerance.")] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="Override the absolute tolerance.")] = None,
    noise_factor: Annotated[
        float,
        typer.Option(
            "--noise-factor",
            help="Allowed fold error, in multiples of the model's own rounding error (vs float64).",
        ),
    ] = 4.0,
    value_range: Annotated[
        str | None,
        typer.Option("--value-range", help="Range of the uniform parity inputs, like 0,255 or -1,1."),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option("--calibrate", help="Recalibrate BatchNorm statistics on these batches first (.pt)."),
    ] = None,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Load -> fold -> verify in PyTorch -> export -> verify in onnxruntime -> write OUT."""
    with _guard():
        from normfold import pipeline

        run = pipeline.fold_and_export(
            model,
            out,
            static_batch=static_batch,
            opset=opset,
            force=force,
            report=report,
            rule=_parity_rule(rtol, atol, noise_factor, value_range),
            calibrate=calibrate,
            **_source_options(arch, model_args, trust, input_shape, input_dtype, inputs, quiet),
        )
        if not quiet:
            _render_layers(run)
            _render_parity(run)
            _render_summary(run)


@app.command("inspect")
def inspect_cmd(
    model: ModelArg,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    report: ReportOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Dry run: show every norm layer, what it would fold into or why it stays. Writes no model."""
    with _guard():
        from normfold import pipeline

        run = pipeline.inspect(
            model, report=report, force=force,
            **_source_options(arch, model_args, trust, input_shape, input_dtype, inputs, quiet),
        )  # fmt: skip
        if not quiet:
            _render_layers(run)
            f = run.fold
            export_only = len(f.export_only)
            out_console.print(
                f"{len(f.folded)} of {len(f.folded) + len(f.skipped)} norm ops would fold"
                + (f" ({export_only} in the export only)" if export_only else "")
            )


@app.command("recalibrate")
def recalibrate_cmd(
    model: ModelArg,
    data: Annotated[
        Path, typer.Option("--data", help="torch.save'd list of batches (tensors or tuples of tensors).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output state dict: .pt, .pth or .safetensors.")],
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Replace BatchNorm running statistics by the exact eval-mode statistics on --data; write OUT."""
    with _guard():
        from normfold import pipeline
        from normfold.load import parse_model_args

        run = pipeline.recalibrate_and_write(
            model, data, out, model=arch, model_args=parse_model_args(model_args), trust=trust,
            force=force, report=report, on_step=None if quiet else _spinner,
        )  # fmt: skip
        if not quiet:
            _render_notes(run.notes)
            table = Table(title=f"Recalibrated norms of {run.source}", title_justify="left")
            for col in ("norm", "level", "values", "mean drift (std)", "std drift"):
                table.add_column(col, no_wrap=col != "norm")
            for r in run.result.norms:
                table.add_row(
                    r.norm, str(r.level), f"{r.values:,}", f"{r.mean_drift:.3g}", f"{r.std_drift:.3g}"
                )
            out_console.print(table)
            for norm, reason in run.result.skipped.items():
                out_console.print(f"kept {norm}: {reason}", highlight=False)
            out_console.print(
                f"recalibrated {len(run.result.norms)} norms in {run.result.passes} passes; wrote {run.out}",
                highlight=False,
            )


StateOutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output: .pt/.pth/.safetensors state dict, or .pt2/.onnx.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]


@app.command("drop-bias")
def drop_bias_cmd(
    model: ModelArg,
    out: StateOutOpt,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    force: ForceOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Remove Conv/Linear biases a BatchNorm makes redundant (outputs unchanged); write OUT."""
    with _guard():
        from normfold import pipeline
        from normfold.bias import drop_redundant_biases

        run = pipeline.transform_and_write(
            model, out, lambda m, x: drop_redundant_biases(m, x, inplace=True), force=force, report=report,
            **_source_options(arch, model_args, trust, input_shape, input_dtype, inputs, quiet),
        )  # fmt: skip
        if not quiet:
            _render_notes(run.notes)
            r = run.result
            for d in r.dropped:
                out_console.print(
                    f"dropped {d.layer}.bias ({d.params:,} params) into {d.norm}", highlight=False
                )
            for k in r.kept:
                out_console.print(f"kept {k.layer or '-'} -> {k.norm}: {k.code}: {k.reason}", highlight=False)
            out_console.print(
                f"dropped {len(r.dropped)} biases, {r.params_saved:,} parameters; wrote {run.out}",
                highlight=False,
            )


@app.command("swap")
def swap_cmd(
    model: ModelArg,
    out: StateOutOpt,
    to: Annotated[
        str, typer.Option("--to", help="group, layer, frozen or batch (SyncBatchNorm -> BatchNorm).")
    ],
    num_groups: Annotated[int | None, typer.Option("--num-groups", help="GroupNorm groups.")] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="GroupNorm channels per group.")
    ] = None,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    force: ForceOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Swap BatchNorm for GroupNorm / LayerNorm / frozen BN, or SyncBatchNorm for BatchNorm; write OUT."""
    with _guard():
        from normfold import pipeline
        from normfold.swap import swap_norms

        def transform(m: Any, x: Any) -> Any:
            return swap_norms(
                m, to, num_groups=num_groups, group_size=group_size, example_inputs=x, inplace=True
            )

        run = pipeline.transform_and_write(
            model, out, transform, force=force, report=report,
            **_source_options(arch, model_args, trust, input_shape, input_dtype, inputs, quiet),
        )  # fmt: skip
        if not quiet:
            _render_notes(run.notes)
            r = run.result
            for s in r.swapped:
                groups = f" ({s.num_groups} groups)" if s.num_groups else ""
                out_console.print(
                    f"swapped {s.module}: {s.from_type} -> {s.to_type}{groups}", highlight=False
                )
            for k in r.skipped:
                out_console.print(f"kept {k.module}: {k.code}: {k.reason}", highlight=False)
            if r.drift is not None:
                out_console.print(
                    f"output drift (by design): max rel error {r.drift.max_rel_error:.3g}, "
                    f"cosine {r.drift.cosine_similarity:.4f}",
                    highlight=False,
                )
            out_console.print(f"swapped {len(r.swapped)} norms to {to}; wrote {run.out}", highlight=False)


# Helpers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """The one place where errors become exit codes and one-line messages (tracebacks only with
    ``--debug``). Leaving by an exception unwinds the library's context managers, which remove
    their staging folders."""
    from normfold.files import committed

    committed.clear()  # this command's writes only (tests run many commands in one process)
    try:
        yield
    except NormfoldError as e:
        _error(str(e))
        raise typer.Exit(e.exit_code) from e
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except KeyboardInterrupt as e:
        _error(f"interrupted; {_what_was_written()}")
        raise typer.Exit(EXIT_INTERRUPTED) from e
    except MemoryError as e:
        if _DEBUG[0]:
            raise
        _error(f"out of memory; {_what_was_written()} (try smaller --input-shape)")
        raise typer.Exit(1) from e
    except Exception as e:
        if _DEBUG[0]:
            raise
        from normfold.errors import first_line

        _error(f"internal error: {first_line(e)} (a bug: please report it with the output of --debug)")
        raise typer.Exit(1) from e


def _what_was_written() -> str:
    from normfold.files import committed

    return f"{', '.join(map(str, committed))} had been written" if committed else "nothing was written"


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def _spinner(step: str) -> contextlib.AbstractContextManager[Any]:
    return err_console.status(f"{step}...")


def _source_options(
    arch: str | None,
    model_args: str | None,
    trust: bool,
    shapes: list[str] | None,
    dtype: str | None,
    file: Path | None,
    quiet: bool,
) -> dict[str, Any]:
    """The options both commands pass to the pipeline: what to load, its inputs, progress."""
    from normfold.load import parse_model_args

    return {
        "model": arch,
        "model_args": parse_model_args(model_args),
        "trust": trust,
        "inputs": _input_spec(shapes, dtype, file),
        "on_step": None if quiet else _spinner,
    }


def _input_spec(shapes: list[str] | None, dtype: str | None, file: Path | None) -> Any:

    import torch

    from normfold.pipeline import InputSpec
    from normfold.reference import check_size

    if file is not None and shapes:
        raise UsageError("pass either --inputs or --input-shape, not both")
    parsed = [_parse_shape(text) for text in shapes or []]
    check_size(parsed, " ".join(f"--input-shape {_shown(t)}" for t in shapes or []))  # before loading
    if dtype is not None and dtype not in _DTYPES:
        raise UsageError(f"--input-dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return InputSpec(shapes=parsed or None, dtype=getattr(torch, dtype) if dtype else None, file=file)


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` (or ``1x3x224x224``): positive integers, no empty field."""
    import re

    dims = []
    for i, f in enumerate((f.strip() for f in text.replace("x", ",").split(",")), 1):
        problem = None
        if not f:
            problem = "is empty"
        elif not re.fullmatch(r"[+-]?[0-9]+", f):
            problem = f"({_shown(f, 20)!r}) is not an integer"
        elif len(f) > 30:  # int() of a long digit string is slow; the size limit refuses it anyway
            problem = f"has {len(f):,} digits"
        elif int(f) <= 0:
            problem = f"is {int(f)}; dimensions must be positive"
        if problem is not None:
            raise UsageError(
                f"--input-shape {_shown(text)!r}: dimension {i} {problem} "
                "(expected comma-separated positive integers like 1,3,224,224)"
            )
        dims.append(int(f))
    return tuple(dims)


def _parity_rule(rtol: float | None, atol: float | None, noise_factor: float, value_range: str | None) -> Any:
    from normfold.parity import ParityRule

    low_high: tuple[float, float] = (0.0, 255.0)
    if value_range is not None:
        try:
            low, high = (float(v) for v in value_range.split(","))
        except ValueError as e:
            raise UsageError(f"--value-range {value_range!r}: expected two numbers like 0,255") from e
        low_high = (low, high)
    try:
        return ParityRule(rtol=rtol, atol=atol, noise_factor=noise_factor, value_range=low_high)
    except UsageError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from e


def _render_layers(run: FoldRun) -> None:
    table = Table(title=f"Norm layers of {run.source}", title_justify="left")
    table.add_column("norm", overflow="fold")
    table.add_column("type")
    table.add_column("action")
    table.add_column("into / reason", overflow="fold", ratio=1)
    for r in run.layers:
        if r.action == "keep":
            action, detail = "[yellow]keep[/]", f"{r.code}: {r.reason}"
        else:
            action = "[green]fold[/]" if r.action == "fold" else "[cyan]fold (export)[/]"
            detail = f"{r.into} ({r.pattern})" + (f"; {r.reason}" if r.reason else "")
        table.add_row(r.norm, r.norm_type, action, detail)
    out_console.print(table)
    _render_notes(run.notes)


def _render_notes(notes: list[str]) -> None:
    for note in notes:  # how the model was taken: switched to eval mode, a dtype kept
        out_console.print(f"note: {note}", highlight=False, soft_wrap=True)


def _render_parity(run: FoldRun) -> None:
    table = Table(title="Parity with the original model", title_justify="left")
    table.add_column("runtime", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_column("inputs", overflow="fold")
    for col in ("vs original", "model noise", "vs float64", "allowed", "result"):
        table.add_column(col, no_wrap=True)
    reports = {"pytorch": run.parity} if run.parity is not None else {}
    if run.export is not None:
        reports.update(run.export.parity)
    for runtime, rep in reports.items():
        for o in rep.outputs:
            table.add_row(
                runtime,
                o.name,
                o.inputs,
                f"{o.max_abs_error:.2e}",
                f"{o.noise:.2e}",
                f"{o.exact_error:.2e}",
                f"{o.allowed_error:.2e}",
                "[green]pass[/]" if o.passed else "[red]FAIL[/]",
            )
    out_console.print(table)
    notes = run.parity.notes if run.parity is not None else ()
    for note in notes:
        out_console.print(f"note: {note}", highlight=False)


def _render_summary(run: FoldRun) -> None:
    f = run.fold
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in run.timings.items())
    out_console.print(
        f"folded {len(f.folded)} of {len(f.folded) + len(f.skipped)} norm ops; "
        f"parameters {f.params_before:,} -> {f.params_after:,}"
    )
    if run.export is not None:
        e = run.export
        extra = ""
        if e.format == "onnx":
            extra = f", {e.batchnorm_nodes} BatchNormalization nodes, opset {e.opset}"
        out_console.print(f"wrote {e.path} ({e.format}{extra})", highlight=False)
    out_console.print(f"timings: {timings}", highlight=False)


class _Terminated(SystemExit):
    """SIGTERM/SIGHUP as an ordinary exit, so every ``with`` block (staging folders) unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)


def _on_signal(signum: int, frame: object) -> None:
    from normfold.files import defer_signal

    if defer_signal(signum):  # a commit is moving files into place: it re-raises the signal after
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signum)


def main() -> None:
    """Console-script entry point."""
    # `timeout`, CI cancellation and `docker stop` send SIGTERM; a closed terminal SIGHUP; Ctrl-C
    # SIGINT (the handler only adds the deferral during a commit to its usual KeyboardInterrupt)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        sys.exit(app())
    except _Terminated as e:
        _error(f"stopped by {e.signal.name}; {_what_was_written()}")
        raise
