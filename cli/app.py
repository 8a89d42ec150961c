"""The ``normfold`` command line: parse options, make one library call, render the result.

Layout (as onnxslim and polygraphy group theirs):

* :mod:`normfold.cli.app` (this module): the typer app, its global options, the commands'
  registration, signals and the console-script entry point :func:`main`;
* :mod:`normfold.cli.options`: the options as ``Annotated`` types, grouped by concern, and their
  parsing into the library's option objects; :mod:`normfold.cli.preflight`: what is decided
  from the disk before torch loads (files, formats, opset range, providers);
* :mod:`normfold.cli.cmd_fold` (``fold``, ``inspect``), :mod:`normfold.cli.cmd_write`
  (``recalibrate``, ``drop-bias``, ``swap``) and :mod:`normfold.cli.cmd_norms` (``fold-norms``):
  each command groups its options, makes one call to :mod:`normfold.pipeline` and renders what
  comes back;
* :mod:`normfold.cli.render` (tables, the summary, the result line),
  :mod:`normfold.cli.progress` (phases and a spinner on stderr, on a terminal only),
  :mod:`normfold.cli.errors` (the one place errors become exit codes and one-line messages in
  the CLI's words), :mod:`normfold.cli.consoles` (the stdout and stderr consoles they share).

Options are checked before torch is imported (shapes, dtypes, numbers, JSON, output paths, the
model file's kind), so a usage or file error comes back at once; torch, onnx and onnxruntime are
imported inside the commands, never at module level, so ``normfold --help`` and ``--version``
stay instant.

Output: tables on a terminal; piped or redirected (a log, CI) the same rows as plain
``a | b | c`` lines that never wrap, so no cell is ever split. ``fold`` and ``inspect`` end with
one line a pipeline can grep: ``normfold: ok folded=8/8 kept=0 ...``.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from normfold.cli.cmd_fold import FOLD_EXAMPLES, INSPECT_EXAMPLES, fold_cmd, inspect_cmd
from normfold.cli.cmd_norms import FOLD_NORMS_EXAMPLES, fold_norms_cmd
from normfold.cli.cmd_write import (
    DROP_BIAS_EXAMPLES,
    RECALIBRATE_EXAMPLES,
    SWAP_EXAMPLES,
    drop_bias_cmd,
    recalibrate_cmd,
    swap_cmd,
)
from normfold.cli.consoles import out_console
from normfold.cli.errors import (
    DEBUG,
    EXIT_CODES,
    EXIT_CODES_DOC,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    cli_words,
    error,
    exit_codes_markdown,
    what_was_written,
)
from normfold.cli.options import given_inputs, load_options

from normfold import __version__

__doc__ += EXIT_CODES_DOC
__all__ = ["EXIT_CODES", "EXIT_INTERRUPTED", "app", "cli_words", "exit_codes_markdown", "main"]

app = typer.Typer(
    help="Fold eval-mode BatchNorm into Conv/ConvTranspose/Linear layers, prove parity, export ONNX.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no boxes in a log, no type tags on flags, brackets kept
)


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
    DEBUG[0] = debug


app.command("fold", epilog=FOLD_EXAMPLES)(fold_cmd)
app.command("inspect", epilog=INSPECT_EXAMPLES)(inspect_cmd)
app.command("recalibrate", epilog=RECALIBRATE_EXAMPLES)(recalibrate_cmd)
app.command("drop-bias", epilog=DROP_BIAS_EXAMPLES)(drop_bias_cmd)
app.command("swap", epilog=SWAP_EXAMPLES)(swap_cmd)
app.command("fold-norms", epilog=FOLD_NORMS_EXAMPLES)(fold_norms_cmd)


def _source_options(
    model: str, arch: str | None, model_args: str | None, trust: bool, shapes: list[str] | None,
    dtype: str | None, file: Path | None, quiet: bool,
) -> dict[str, Any]:  # fmt: skip
    """Kept for tests/test_corpus.py (the input-size limit over several --input-shape): the
    loading and input options as :mod:`normfold.cli.options` checks them."""
    return {"load": load_options(arch, model_args, trust), "given": given_inputs(shapes, dtype, file)}


def _with_inputs(source: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's ``load`` and ``inputs`` arguments from :func:`_source_options`."""
    return {"load": source["load"], "inputs": source["given"].spec()}


class _Terminated(SystemExit):
    """SIGTERM/SIGHUP as an ordinary exit, so every ``with`` block (staging folders) unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)


def _on_signal(signum: int, frame: object) -> None:
    from normfold.io.files import defer_signal

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
        error(f"stopped by {e.signal.name}; {what_was_written(e)}")
        raise
