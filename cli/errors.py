"""The one place where errors become exit codes and one-line messages.

Every command body runs inside :func:`guard`: a :class:`~normfold.errors.NormfoldError` exits
with its class's ``exit_code`` (the table :data:`EXIT_CODES`, which ``--help``, the module
docstring of :mod:`normfold.cli.app` and the README show), anything else is an internal error
(exit 1). The message is one line on stderr, its non-printable characters escaped, and the
library's API words (``out=m.onnx``, ``InputSpec.shapes``, ``force=True``) become the CLI options
that set them (:func:`cli_words`): the library never names a flag, the user never sees an API
parameter.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator

import typer
from normfold.cli.consoles import err_console
from rich.text import Text

from normfold.errors import NormfoldError, NotFoldedError, printable

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
EXIT_CODES_DOC = "\nExit codes:\n\n" + "\n".join(
    f"* {code}: {what}" + (f" ({details})" if details else "") for code, what, details in EXIT_CODES
)


def exit_codes_markdown() -> str:
    """The README's exit code table."""
    rows = [
        f"| {code} | {what}" + (f" ({details})" if details else "") + " |"
        for code, what, details in EXIT_CODES
    ]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


DEBUG = [False]  # set by --debug


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Run a command body: errors become exit codes and one-line messages (the traceback only
    with ``--debug``). Leaving by an exception unwinds the library's context managers, which
    remove their staging folders."""
    try:
        with _third_party_quiet():
            yield
    except NormfoldError as e:
        _traceback()
        if isinstance(e, NotFoldedError):  # the one error of several lines: one per norm kept,
            error(*str(e).split("\n"))  # each built from escaped names by the library
        else:
            error(str(e))
        raise typer.Exit(e.exit_code) from e
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except KeyboardInterrupt as e:
        error(f"interrupted; {what_was_written(e)}")
        raise typer.Exit(EXIT_INTERRUPTED) from e
    except MemoryError as e:
        if DEBUG[0]:
            raise
        error(f"out of memory; {what_was_written(e)} (try smaller --input-shape)")
        raise typer.Exit(1) from e
    except Exception as e:
        if DEBUG[0]:
            raise
        from normfold.errors import first_line

        error(f"internal error: {first_line(e)} (a bug: please report it with the output of --debug)")
        raise typer.Exit(1) from e


@contextlib.contextmanager
def _third_party_quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Every error is one line on stderr, and a run that succeeds writes nothing there: the
    warnings of torch, onnx, onnxscript or the user's model code (UserWarning, DeprecationWarning,
    ...) are recorded instead of shown, and log records (torch's loggers print to stderr on their
    own) are off while the command runs. ``--debug`` leaves both as they are: it shows them."""
    if DEBUG[0]:
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
    if DEBUG[0]:
        import traceback

        traceback.print_exc()


def what_was_written(error: BaseException) -> str:
    """What a stopped run had already committed (the library's ``normfold_written`` paths)."""
    committed = getattr(error, "normfold_written", None) or []
    return f"{', '.join(map(str, committed))} had been written" if committed else "nothing was written"


def error(message: str, *more: str) -> None:
    """One line ``error: message`` (and ``more`` lines under it), never more: every character
    that could start a line or steer the terminal is escaped (a state-dict key, a module path or
    a file name with a newline cannot forge a ``normfold: ok`` line)."""
    line = Text("error: ", style="bold red") + Text(printable(cli_words(message)))
    err_console.print(line, highlight=False, soft_wrap=True)
    for extra in more:
        err_console.print(Text(printable(cli_words(extra))), highlight=False, soft_wrap=True)


def _as_flag_list(flag: str) -> Callable[[re.Match[str]], str]:
    """``input_names=['a', 'b']`` -> ``--input-names a,b`` (the list as the flag takes it)."""

    def sub(found: re.Match[str]) -> str:
        items = re.findall(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", found.group(2))
        return f"{flag} " + ",".join(a or b for a, b in items)

    return sub


_QUOTED_LIST = r"\[((?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|,\s*)*)\]"

#: The library's keyword arguments and the CLI options that set them.
KEYWORD_FLAGS = {
    "out": "--out", "report": "--report", "save_inputs": "--save-inputs", "force": "--force",
    "model": "--model", "model_args": "--model-args", "trust": "--trust", "calibrate": "--calibrate",
    "data": "--data", "require_all": "--require-all", "reparameterize": "--reparam",
    "static_batch": "--static-batch", "dynamic_axes": "--dynamic", "opset": "--opset",
    "input_names": "--input-names", "output_names": "--output-names", "providers": "--providers",
    "rtol": "--rtol", "atol": "--atol", "noise_factor": "--noise-factor", "value_range": "--value-range",
    "num_groups": "--num-groups", "group_size": "--group-size",
    "input_shapes": "--input-shape", "inputs": "--inputs",  # fold_onnx's
    "lower_kept": "--lower-kept",
}  # fmt: skip
#: The option objects' fields (``InputSpec.shapes``) and the CLI options that set them.
FIELD_FLAGS = {
    "InputSpec.shapes": "--input-shape", "InputSpec.file": "--inputs", "InputSpec.tensors": "--inputs",
    "InputSpec.dtype": "--input-dtype",
    "LoadOptions.model": "--model", "LoadOptions.model_args": "--model-args", "LoadOptions.trust": "--trust",
    "FoldOptions.calibrate": "--calibrate", "FoldOptions.require_all": "--require-all",
    "FoldOptions.reparameterize": "--reparam",
    "ExportOptions.static_batch": "--static-batch", "ExportOptions.dynamic_axes": "--dynamic",
    "ExportOptions.opset": "--opset", "ExportOptions.input_names": "--input-names",
    "ExportOptions.output_names": "--output-names", "ExportOptions.providers": "--providers",
    "ExportOptions.lower_kept": "--lower-kept",
    "WriteOptions.report": "--report", "WriteOptions.save_inputs": "--save-inputs",
    "WriteOptions.force": "--force",
    "ParityRule.rtol": "--rtol", "ParityRule.atol": "--atol", "ParityRule.noise_factor": "--noise-factor",
    "ParityRule.value_range": "--value-range",
}  # fmt: skip
_KW = r"(?<![\w.\-])({})"  # a keyword not inside another word, a dotted name or a flag
_LISTS = ("input_names", "output_names", "providers")
_SWITCHES = ("force", "trust", "require_all", "static_batch", "reparameterize")

#: (pattern, replacement), most specific first. A test checks that every API word in the
#: library's messages becomes a flag.
API_TO_FLAG: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # phrases first: they read better than a word-for-word swap
    (re.compile(r"\(leave InputSpec\.dtype out\)"), "(omit --input-dtype)"),
    (re.compile(r"\bfold_onnx_file\b"), "`normfold fold`"),  # what folds an ONNX file, as a command
    (re.compile(r"\bleave (\w+)= out\b"), lambda m: f"drop {KEYWORD_FLAGS.get(m.group(1), m.group(0))}"),
    (re.compile(r"\bset (?:ExportOptions\.)?static_batch=True\b"), "pass --static-batch"),
    (re.compile(r"\bExportOptions\.dynamic_axes\[('\w+'|\d+)\]"), r"--dynamic \1"),
    # the option objects' fields, with a switch's value
    *((re.compile(re.escape(field) + r"(?:=True)?\b"), flag) for field, flag in FIELD_FLAGS.items()),
    # keyword arguments: a list of names as the flag takes it, switches, then any value
    *((re.compile(_KW.format(kw) + "=" + _QUOTED_LIST), _as_flag_list(KEYWORD_FLAGS[kw])) for kw in _LISTS),
    (re.compile(_KW.format("reparameterize") + r"=False\b"), "--no-reparam"),
    *((re.compile(_KW.format(kw) + r"=True\b"), KEYWORD_FLAGS[kw]) for kw in _SWITCHES),
    (re.compile(_KW.format("|".join(KEYWORD_FLAGS)) + r"=(?=\S)(?![,.;:)\]])"),
     lambda m: KEYWORD_FLAGS[m.group(1)] + " "),
    (re.compile(_KW.format("|".join(KEYWORD_FLAGS)) + r"=(?=[\s,.;:)\]]|$)"),
     lambda m: KEYWORD_FLAGS[m.group(1)]),
    # bare names with an underscore (no English word has one) where a message names the parameter
    (re.compile(_KW.format("|".join(k for k in KEYWORD_FLAGS if "_" in k)) + r"\b(?!=)"),
     lambda m: KEYWORD_FLAGS[m.group(1)]),
]  # fmt: skip


def cli_words(message: str) -> str:
    """``message`` with the API's words replaced by the CLI options that set them."""
    for pattern, flag in API_TO_FLAG:
        message = pattern.sub(flag, message)
    return message
