"""The ``normfold`` command line: parse options, make one library call, render the result.

Options are checked before torch is imported (shapes, dtypes, numbers, JSON, output paths), so a
usage error comes back at once; torch, onnx and onnxruntime are imported inside the commands,
never at module level, so ``normfold --help`` and ``--version`` stay instant. Library errors
become exit codes in one place (:func:`_guard`), from one table (:data:`EXIT_CODES`) that
``--help``, this docstring (below) and the README show.

Output: tables on a terminal; piped or redirected (a log, CI) the same rows as plain
``a | b | c`` lines that never wrap, so no cell is ever split. ``fold`` and ``inspect`` end with
one line a pipeline can grep: ``normfold: ok folded=8/8 kept=0 ...``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from normfold import __version__
from normfold.errors import NormfoldError, NotFoldedError, UsageError, printable
from normfold.files import ANY_FORMATS, MODEL_FORMATS, STATE_FORMATS

if TYPE_CHECKING:
    from normfold.pipeline import FoldRun

#: Every exit code: (code, what, details). The README's table is made from it (a test checks).
EXIT_CODES = (
    ("0", "success", ""),
    ("1", "internal error", "a bug: please report it with the output of --debug"),
    ("2", "usage error", "bad option, existing --out without --force, --out equal to the input"),
    ("3", "load error", "missing, truncated, unsafe or unrecognised file; architecture mismatch"),
    ("4", "trace error", "the model fails on the given inputs, or cannot be captured"),
    ("5", "parity failure", "the folded model differs from the original in PyTorch, or the check could not "
     "judge it: outputs the same on every input set, or the model's own noise reaching its output's scale"),
    ("6", "export failure", "export, onnx.checker, the exported model differs in its runtime, "
     "or writing failed: a full disk, no free inode, a quota"),
    ("7", "not every norm folded", "with --require-all; each one kept is listed with its reason"),
    ("129, 130, 143", "stopped by SIGHUP, SIGINT (Ctrl-C) or SIGTERM",
     "temporary files removed; the message says whether the outputs had already been written"),
)  # fmt: skip
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it; SIGTERM 143, SIGHUP 129
EXIT_CODES_HELP = "Exit codes: " + "; ".join(f"{code} {what}" for code, what, _ in EXIT_CODES) + "."
__doc__ += "\nExit codes:\n\n" + "\n".join(
    f"* {code}: {what}" + (f" ({details})" if details else "") for code, what, details in EXIT_CODES
)


def exit_codes_markdown() -> str:
    """The README's exit code table."""
    rows = [
        f"| {code} | {what}" + (f" ({details})" if details else "") + " |"
        for code, what, details in EXIT_CODES
    ]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


_DEBUG = [False]  # set by --debug

app = typer.Typer(
    help="Fold eval-mode BatchNorm into Conv/ConvTranspose/Linear layers, prove parity, export ONNX.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no boxes in a log, no type tags on flags, brackets kept
)
out_console = Console()
err_console = Console(stderr=True)

#: ``--input-dtype`` choices: generated inputs are floating (integer ones need real values:
#: token ids below a vocabulary size, class labels... pass them with --inputs)
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _version(value: bool) -> None:
    if value:
        out_console.print(f"normfold {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of any error.")] = False,
) -> None:
    """normfold: fold BatchNorm, check parity, export ONNX."""
    _DEBUG[0] = debug


# Options shared by the commands --------------------------------------------------------------------
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A factory spec package.module:callable (e.g. normfold.models:resnet), a state_dict file "
        "(.pt/.pth/.bin/.safetensors, needs --model), or a pickled nn.Module (needs --trust).",
        show_default=False,
        metavar="MODEL",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--model", metavar="SPEC", help="Factory spec that builds the architecture for a weights file."
    ),
]
ArgsOpt = Annotated[
    str | None,
    typer.Option("--model-args", metavar="JSON", help="JSON object of factory keyword arguments."),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust", help="Allow unpickling a whole nn.Module: this runs code from the file."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="[NAME:]SHAPE",
        help="Input shape like 1,3,224,224, or name:1,3,224,224 with the forward's argument name; "
        "one per input.",
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-dtype",
        metavar="DTYPE",
        help=f"Dtype of generated inputs: {', '.join(_DTYPES)} (default: the weights'); integer "
        "inputs come from --inputs.",
    ),
]
InputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        metavar="FILE",
        help="torch.save file with a tensor or tuple of tensors (weights_only load).",
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        metavar="FILE",
        help="Write a JSON report here, also when the run fails (with the step and the error).",
    ),
]
StaticOpt = Annotated[bool, typer.Option("--static-batch", help="Capture and export a fixed batch size.")]
DynamicOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dynamic",
        metavar="[INPUT:]AXIS=NAME,...",
        help="Keep more axes dynamic in the export, named (e.g. 2=height,3=width, or image:2=height "
        "for the forward argument image; INPUT defaults to the first); checked at a second size.",
    ),
]
RequireOpt = Annotated[
    bool,
    typer.Option("--require-all", help="Exit 7, writing no model, when any norm is not folded."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ReparamOpt = Annotated[
    bool,
    typer.Option(
        "--reparam/--no-reparam",
        help="Merge RepVGG-style parallel conv/BN/identity branches into one conv.",
    ),
]

_FOLD_EXAMPLES = """Examples:

\b
  normfold fold normfold.models:resnet --out resnet.onnx
  normfold fold weights.pt --model torchvision.models:resnet50 --input-shape 1,3,224,224 --out r50.onnx
  normfold fold timm:create_model --model-args '{"model_name": "resnet50"}' \\
      --input-shape 1,3,224,224 --out r50.onnx --require-all --report r50.json
  normfold fold normfold.models:two_tower --input-shape image:1,3,24,24 --input-shape features:1,12 \\
      --dynamic image:2=height,3=width --out two.onnx
"""
_INSPECT_EXAMPLES = """Examples:

\b
  normfold inspect normfold.models:mixed
  normfold inspect weights.safetensors --model mypkg.nets:build --input-shape image:1,3,64,64 --require-all
"""


@app.command("fold", epilog=_FOLD_EXAMPLES)
def fold_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Output file: .onnx or .pt2.")],
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: StaticOpt = False,
    dynamic: DynamicOpt = None,
    opset: Annotated[
        int | None, typer.Option("--opset", metavar="N", help="ONNX opset (default: the exporter's).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
    rtol: Annotated[
        float | None, typer.Option("--rtol", metavar="X", help="Override the relative tolerance floor.")
    ] = None,
    atol: Annotated[
        float | None, typer.Option("--atol", metavar="X", help="Override the absolute tolerance floor.")
    ] = None,
    noise_factor: Annotated[
        float,
        typer.Option(
            "--noise-factor",
            metavar="X",
            help="Allowed fold error, in multiples of the model's own rounding noise (vs float64).",
        ),
    ] = 4.0,
    value_range: Annotated[
        str | None,
        typer.Option(
            "--value-range", metavar="LOW,HIGH", help="Range of the uniform parity inputs [default: 0,255]."
        ),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            metavar="FILE",
            help="Recalibrate BatchNorm statistics on these batches first (.pt).",
        ),
    ] = None,
    require_all: RequireOpt = False,
    reparam: ReparamOpt = True,
    report: ReportOpt = None,
    save_inputs: Annotated[
        Path | None,
        typer.Option(
            "--save-inputs",
            metavar="FILE",
            help="Save the parity inputs (.pt, {set: [tensors]}), also when the run fails.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Load -> fold -> verify in PyTorch -> export -> verify in onnxruntime -> write OUT."""
    with _guard():
        source = _source_options(model, arch, model_args, trust, input_shape, input_dtype, inputs, quiet)
        rule = _rule_options(rtol, atol, noise_factor, value_range)
        axes = _parse_dynamic(dynamic or [])
        _preflight(
            {"--out": out, "--report": report, "--save-inputs": save_inputs},
            [model, inputs, calibrate], force, {"--out": MODEL_FORMATS, "--save-inputs": (".pt",)},
        )  # fmt: skip
        if opset is not None:
            from normfold.export import check_opset

            check_opset(opset)
        from normfold import pipeline

        run = pipeline.fold_and_export(
            model, out, static_batch=static_batch, opset=opset, force=force, report=report,
            save_inputs=save_inputs, require_all=require_all, calibrate=calibrate, dynamic_axes=axes,
            reparameterize=reparam, rule=_parity_rule(rule), **_with_inputs(source),
        )  # fmt: skip
        if not quiet:
            _render_layers(run)
            _render_parity(run)
            _render_written(run)
            _line(_result_line(run))


@app.command("inspect", epilog=_INSPECT_EXAMPLES)
def inspect_cmd(
    model: ModelArg,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: StaticOpt = False,
    dynamic: DynamicOpt = None,
    require_all: RequireOpt = False,
    reparam: ReparamOpt = True,
    report: ReportOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Dry run: every norm layer, what it would fold into or why it stays (fold's own decisions,
    on the same inputs). Writes no model."""
    with _guard():
        source = _source_options(model, arch, model_args, trust, input_shape, input_dtype, inputs, quiet)
        axes = _parse_dynamic(dynamic or [])
        _preflight({"--report": report}, [model, inputs], force, {})
        from normfold import pipeline

        run = pipeline.inspect(
            model, report=report, force=force, static_batch=static_batch, require_all=require_all,
            dynamic_axes=axes, reparameterize=reparam, **_with_inputs(source),
        )  # fmt: skip
        if not quiet:
            _render_layers(run)
            f = run.fold
            export_only = len(f.export_only)
            _line(
                f"{len(f.folded)} of {len(f.folded) + len(f.skipped)} norm ops would fold"
                + (f" ({export_only} in the export only)" if export_only else "")
            )
            _line(_result_line(run))


@app.command("recalibrate")
def recalibrate_cmd(
    model: ModelArg,
    data: Annotated[
        Path,
        typer.Option(
            "--data", metavar="FILE", help="torch.save'd list of batches (tensors or tuples of tensors)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="FILE", help="Output state dict: .pt, .pth or .safetensors."),
    ],
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Replace BatchNorm running statistics by the exact eval-mode statistics on --data; write OUT."""
    with _guard():
        source = _source_options(model, arch, model_args, trust, None, None, None, quiet)
        _preflight({"--out": out, "--report": report}, [model, data], force, {"--out": STATE_FORMATS})
        from normfold import pipeline

        for key in ("shapes", "dtype", "file"):
            source.pop(key)
        run = pipeline.recalibrate_and_write(model, data, out, force=force, report=report, **source)
        if not quiet:
            _render_notes(run.notes)
            rows = [
                (r.norm, str(r.level), f"{r.values:,}", f"{r.mean_drift:.3g}", f"{r.std_drift:.3g}")
                for r in run.result.norms
            ]
            columns = ("norm", "level", "values", "mean drift (std)", "std drift")
            _table(f"Recalibrated norms of {run.source}", columns, rows)
            for norm, reason in run.result.skipped.items():
                _line(f"kept {norm}: {reason}")
            _line(
                f"recalibrated {len(run.result.norms)} norms in {run.result.passes} passes; wrote {run.out}"
            )


StateOutOpt = Annotated[
    Path,
    typer.Option(
        "--out", "-o", metavar="FILE", help="Output: .pt/.pth/.safetensors state dict, or .pt2/.onnx."
    ),
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
        source = _source_options(model, arch, model_args, trust, input_shape, input_dtype, inputs, quiet)
        _preflight({"--out": out, "--report": report}, [model, inputs], force, {"--out": ANY_FORMATS})
        from normfold import pipeline
        from normfold.bias import drop_redundant_biases

        run = pipeline.transform_and_write(
            model, out, lambda m, x: drop_redundant_biases(m, x, inplace=True), force=force, report=report,
            command="drop-bias", **_with_inputs(source),
        )  # fmt: skip
        if not quiet:
            _render_notes(run.notes)
            r = run.result
            for d in r.dropped:
                _line(f"dropped {d.layer}.bias ({d.params:,} params) into {d.norm}")
            for k in r.kept:
                _line(f"kept {k.layer or '-'} -> {k.norm}: {k.code}: {k.reason}")
            _line(f"dropped {len(r.dropped)} biases, {r.params_saved:,} parameters; wrote {run.out}")


@app.command("swap")
def swap_cmd(
    model: ModelArg,
    out: StateOutOpt,
    to: Annotated[
        str,
        typer.Option(
            "--to", metavar="KIND", help="group, layer, frozen or batch (SyncBatchNorm -> BatchNorm)."
        ),
    ],
    num_groups: Annotated[
        int | None, typer.Option("--num-groups", metavar="N", help="GroupNorm groups.")
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", metavar="N", help="GroupNorm channels per group.")
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
        source = _source_options(model, arch, model_args, trust, input_shape, input_dtype, inputs, quiet)
        _preflight({"--out": out, "--report": report}, [model, inputs], force, {"--out": ANY_FORMATS})
        from normfold import pipeline
        from normfold.swap import swap_norms

        def transform(m: Any, x: Any) -> Any:
            return swap_norms(
                m, to, num_groups=num_groups, group_size=group_size, example_inputs=x, inplace=True
            )

        run = pipeline.transform_and_write(
            model, out, transform, force=force, report=report, command="swap", **_with_inputs(source)
        )
        if not quiet:
            _render_notes(run.notes)
            r = run.result
            for sw in r.swapped:
                groups = f" ({sw.num_groups} groups)" if sw.num_groups else ""
                _line(f"swapped {sw.module}: {sw.from_type} -> {sw.to_type}{groups}")
            for k in r.skipped:
                _line(f"kept {k.module}: {k.code}: {k.reason}")
            if r.drift is not None:
                _line(
                    f"output drift (by design): max rel error {r.drift.max_rel_error:.3g}, "
                    f"cosine {r.drift.cosine_similarity:.4f}"
                )
            _line(f"swapped {len(r.swapped)} norms to {to}; wrote {run.out}")


# Errors --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """The one place where errors become exit codes and one-line messages (the traceback only
    with ``--debug``). Leaving by an exception unwinds the library's context managers, which
    remove their staging folders."""
    from normfold.files import committed

    committed.clear()  # this command's writes only (tests run many commands in one process)
    try:
        with _third_party_quiet():
            yield
    except NormfoldError as e:
        _traceback()
        if isinstance(e, NotFoldedError):  # the one error of several lines: one per norm kept,
            _error(*str(e).split("\n"))  # each built from escaped names by the library
        else:
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


@contextlib.contextmanager
def _third_party_quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Every error is one line on stderr, and a run that succeeds writes nothing there: the
    warnings of torch, onnx, onnxscript or the user's model code (UserWarning, DeprecationWarning,
    ...) are recorded instead of shown, and log records (torch's loggers print to stderr on their
    own) are off while the command runs. ``--debug`` leaves both as they are: it shows them."""
    if _DEBUG[0]:
        yield []
        return
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield caught
    finally:
        logging.disable(disabled)


def _traceback() -> None:
    if _DEBUG[0]:
        import traceback

        traceback.print_exc()


def _what_was_written() -> str:
    from normfold.files import committed

    return f"{', '.join(map(str, committed))} had been written" if committed else "nothing was written"


def _error(message: str, *more: str) -> None:
    """One line ``error: message`` (and ``more`` lines under it), never more: every character
    that could start a line or steer the terminal is escaped (a state-dict key, a module path or
    a file name with a newline cannot forge a ``normfold: ok`` line)."""
    line = Text("error: ", style="bold red") + Text(printable(message))
    err_console.print(line, highlight=False, soft_wrap=True)
    for extra in more:
        err_console.print(Text(printable(extra)), highlight=False, soft_wrap=True)


def _spinner(step: str) -> contextlib.AbstractContextManager[Any]:
    return err_console.status(f"{step}...")


# Options, checked before torch is imported ---------------------------------------------------------
def _source_options(
    model: str,
    arch: str | None,
    model_args: str | None,
    trust: bool,
    shapes: list[str] | None,
    dtype: str | None,
    file: Path | None,
    quiet: bool,
) -> dict[str, Any]:
    """What to load and its inputs, as the pipeline's keyword arguments (the inputs still as
    parsed text: :func:`_with_inputs` makes them an InputSpec once torch may be imported)."""
    from normfold.limits import check_size, parse_model_args

    if file is not None and shapes:
        raise UsageError("pass either --inputs or --input-shape, not both")
    parsed = _parse_shapes(shapes or [])
    check_size([dims for _, dims in parsed], " ".join(f"--input-shape {_shown(t)}" for t in shapes or []))
    if dtype is not None and dtype not in _DTYPES:
        hint = ""
        if re.fullmatch(r"u?int\d*|bool|long|short", dtype):
            hint = " (integer inputs need real values, e.g. token ids: pass them with --inputs FILE)"
        raise UsageError(f"--input-dtype {dtype!r}: choose one of {', '.join(_DTYPES)}{hint}")
    return {
        "model": arch,
        "model_args": parse_model_args(model_args),
        "trust": trust,
        "shapes": parsed,
        "dtype": dtype,
        "file": file,
        "on_step": None if quiet else _spinner,
    }


def _with_inputs(source: dict[str, Any]) -> dict[str, Any]:
    """``source`` with its input options as an :class:`~normfold.pipeline.InputSpec`."""
    import torch

    from normfold.pipeline import InputSpec

    options = dict(source)
    shapes, dtype, file = options.pop("shapes"), options.pop("dtype"), options.pop("file")
    named = {name: dims for name, dims in shapes if name is not None}
    spec = InputSpec(
        shapes=named or [dims for _, dims in shapes] or None,
        dtype=getattr(torch, dtype) if dtype else None,
        file=file,
    )
    return {**options, "inputs": spec}


def _preflight(
    outputs: dict[str, Path | None],
    inputs: Sequence[str | Path | None],
    force: bool,
    formats: dict[str, Sequence[str]],
) -> None:
    """The output files' rule (:mod:`normfold.files`), checked before any import of torch (the
    pipeline checks again when it starts writing)."""
    from normfold.files import check_outputs

    check_outputs(outputs, inputs=inputs, force=force, formats=formats)


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_shapes(texts: Sequence[str]) -> list[tuple[str | None, tuple[int, ...]]]:
    """``--input-shape`` values: ``1,3,224,224`` in order, or ``name:1,3,224,224`` by the
    forward's argument names; all named or none, each name once."""
    parsed = []
    for text in texts:
        name, sep, dims = text.rpartition(":")
        if sep and not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise UsageError(
                f"--input-shape {_shown(text)!r}: {_shown(name, 30)!r} is not an argument name "
                "(expected name:1,3,224,224 or 1,3,224,224)"
            )
        parsed.append((name or None, _parse_shape(text, dims)))
    names = [name for name, _ in parsed if name is not None]
    if names and len(names) != len(parsed):
        raise UsageError("--input-shape: name every shape (name:1,3,224,224) or none of them")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--input-shape: {', '.join(repeated)} given more than once")
    return parsed


def _parse_shape(text: str, dims_text: str) -> tuple[int, ...]:
    """``1,3,224,224`` (or ``1x3x224x224``): positive integers, no empty field."""
    dims = []
    for i, f in enumerate((f.strip() for f in dims_text.replace("x", ",").split(",")), 1):
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


def _parse_dynamic(texts: Sequence[str]) -> dict[int | str, dict[int, str]]:
    """``--dynamic`` values: ``[INPUT:]AXIS=NAME,...`` (INPUT an argument name or a position,
    default the first input), as ``{input: {axis: name}}``; each axis and each name once."""
    out: dict[int | str, dict[int, str]] = {}
    seen: set[str] = set()
    for text in texts:
        found = re.fullmatch(r"(?:(\w+):)?(\d+=[A-Za-z_]\w*(?:,\d+=[A-Za-z_]\w*)*)", text.replace(" ", ""))
        if found is None:
            raise UsageError(
                f"--dynamic {_shown(text)!r}: expected [INPUT:]AXIS=NAME,... like 2=height,3=width "
                "or image:2=height"
            )
        key: int | str = found.group(1) or 0
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        for pair in found.group(2).split(","):
            axis, name = pair.split("=")
            if int(axis) in out.get(key, {}) or name in seen:
                raise UsageError(f"--dynamic {_shown(text)!r}: axis {axis} or name {name} given twice")
            out.setdefault(key, {})[int(axis)] = name
            seen.add(name)
    return out


def _rule_options(
    rtol: float | None, atol: float | None, noise_factor: float, value_range: str | None
) -> tuple[float | None, float | None, float, tuple[float, float]]:
    """The parity rule's options, checked: finite non-negative numbers, a range LOW < HIGH."""
    import math

    for name, value in (("--rtol", rtol), ("--atol", atol), ("--noise-factor", noise_factor)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be finite and >= 0, got {value}")
    low_high = (0.0, 255.0)
    if value_range is not None:
        try:
            low, high = (float(v) for v in value_range.split(","))
        except ValueError as e:
            raise UsageError(f"--value-range {value_range!r}: expected two numbers like 0,255") from e
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UsageError(f"--value-range {value_range!r}: expected finite LOW,HIGH with LOW < HIGH")
        low_high = (low, high)
    return rtol, atol, noise_factor, low_high


def _parity_rule(options: tuple[float | None, float | None, float, tuple[float, float]]) -> Any:
    from normfold.parity import ParityRule

    rtol, atol, noise_factor, value_range = options
    return ParityRule(rtol=rtol, atol=atol, noise_factor=noise_factor, value_range=value_range)


# Rendering -----------------------------------------------------------------------------------------
Cell = str | Text


def _line(text: str | Text) -> None:
    """One line of output, never wrapped (a pipe or a log keeps it whole), its names escaped
    (:func:`~normfold.errors.printable`: a name cannot start a line of its own)."""
    out_console.print(_printable(text), soft_wrap=True, highlight=False, markup=False)


def _printable(cell: str | Text) -> Text:
    if isinstance(cell, Text):
        return cell if cell.plain.isprintable() else Text(printable(cell.plain), style=cell.style)
    return Text(printable(cell))


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Cell]]) -> None:
    """A table on a terminal; elsewhere the title, the header and one ``a | b | c`` line per
    row, so no cell is ever split however narrow the log is."""
    rows = [[_printable(c) for c in row] for row in rows]
    title = printable(title)
    if out_console.is_terminal:
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        out_console.print(table)
        return
    _line(title)
    _line(" | ".join(columns))
    for row in rows:
        _line(" | ".join(c.plain for c in row))


def _render_layers(run: FoldRun) -> None:
    rows = []
    for r in run.layers:
        if r.action == "keep":
            action, detail = Text("keep", style="yellow"), f"{r.code}: {r.reason}"
        else:
            action = Text(r.action, style="green" if r.action == "fold" else "cyan")
            detail = f"{r.into} ({r.pattern})" + (f"; {r.reason}" if r.reason else "")
        rows.append((r.norm, r.norm_type, action, detail))
    _table(f"Norm layers of {run.source}", ("norm", "type", "action", "into / reason"), rows)
    _render_merges(run)
    _render_notes(run.notes)


def _render_merges(run: FoldRun) -> None:
    """Blocks of parallel branches: merged into one conv (where), or why they stay."""
    f = run.fold
    rows = [(m.block, " + ".join(m.branches), Text("merge", style="green"),
             m.into + (f"; {m.note}" if m.note else "")) for m in f.merged]  # fmt: skip
    rows += [(m.block, m.node, Text("keep", style="yellow"), f"{m.code}: {m.reason}") for m in f.not_merged]
    if rows:
        columns = ("block", "branches", "action", "into / reason")
        _table("Parallel branches (reparameterization)", columns, rows)


def _render_notes(notes: list[str]) -> None:
    for note in notes:  # how the model was taken: switched to eval mode, a dtype kept
        _line(f"note: {note}")


def _render_parity(run: FoldRun) -> None:
    reports = {"pytorch": run.parity} if run.parity is not None else {}
    if run.export is not None:
        reports.update(run.export.parity)
    rows = [
        (runtime, o.name, o.inputs, f"{o.max_abs_error:.2e}", f"{o.noise:.2e}", f"{o.exact_error:.2e}",
         f"{o.allowed_error:.2e}", Text("pass", style="green") if o.passed else Text("FAIL", style="red"))
        for runtime, rep in reports.items()
        for o in rep.outputs
    ]  # fmt: skip
    columns = ("runtime", "output", "inputs", "vs original", "model noise", "vs float64", "allowed", "result")
    _table("Parity with the original model", columns, rows)
    for note in run.parity.notes if run.parity is not None else ():
        _line(f"note: {note}")


#: Ops the before/after table shows (the ones folding changes), when any column has them
_SHOWN_OPS = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div")


def _render_written(run: FoldRun) -> None:
    """onnxsim-style before/after: ops, parameters, the written file, its inputs and outputs,
    and who did what (normfold's folds, the norms kept, the exporter's own changes)."""
    summary, e = run.summary(), run.export
    columns = {"original": summary["ops_original"], "folded": summary["ops_folded"]}
    if summary["ops_written"] is not None:
        columns["written (onnx)"] = summary["ops_written"]
    ops = [op for op in _SHOWN_OPS if any(op in c for c in columns.values())]
    rows = [(op, *(str(c.get(op, 0)) for c in columns.values())) for op in ops]
    if rows:
        _table("Ops before and after (ATen ops counted as the ONNX ops they become)", ("op", *columns), rows)
    params = f"parameters {summary['params_before']:,} -> {summary['params_after']:,}"
    if e is not None and e.parameters is not None:
        params += f" (written file: {e.parameters:,} initializer elements)"
    _line(params)
    if e is not None:
        extra = f", opset {e.opset}" if e.opset is not None else ""
        _line(f"wrote {e.path} ({e.format}, {_size(e.size_bytes)}{extra})")
        for role, tensors in (("inputs", e.inputs), ("outputs", e.outputs)):
            if tensors:
                _line(
                    f"{role}: "
                    + ", ".join(f"{t.name} {t.dtype} [{', '.join(map(str, t.shape))}]" for t in tensors)
                )
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
    _line(f"{folded}; {kept}{exporter}")
    _line("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in run.timings.items()))


def _result_line(run: FoldRun) -> str:
    """The last line, for pipelines to grep: ``normfold: ok folded=F/N kept=K ...``."""
    s = run.summary()
    parts = [f"normfold: ok folded={s['folded']}/{s['norms']}", f"kept={s['kept']}"]
    if s["blocks_merged"] or s["blocks_not_merged"]:
        parts.append(f"merged={s['blocks_merged']}/{s['blocks_merged'] + s['blocks_not_merged']}")
    if s["exporter_removed_batchnorms"] is not None:
        parts.append(f"exporter_removed_bn={s['exporter_removed_batchnorms']}")
    if run.parity is not None:
        runtimes = ["pytorch", *(run.export.parity if run.export is not None else ())]
        parts.append(f"parity=pass({','.join(runtimes)})")
    parts.append(f"out={run.export.path}" if run.export is not None else "out=none")
    return " ".join(parts)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


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
