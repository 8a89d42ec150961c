"""Errors raised by normfold.

Every error the library raises on purpose is a :class:`NormfoldError`; the CLI maps each
subclass to one exit code (see ``EXIT_CODE``), so a pipeline can tell a bad file from a
failed parity check without parsing messages.
"""

from __future__ import annotations

import re


class NormfoldError(Exception):
    """Base class of every error normfold raises on purpose."""

    exit_code: int = 1


class UsageError(NormfoldError):
    """The caller asked for something inconsistent (bad option, bad shape, bad path)."""

    exit_code = 2


class LoadError(NormfoldError):
    """A model or input file could not be loaded, or loading it would be unsafe."""

    exit_code = 3


class TraceError(NormfoldError):
    """The model could not be traced or run, so no norm could be analysed."""

    exit_code = 4


class ParityError(NormfoldError):
    """The transformed model's outputs differ from the original beyond tolerance."""

    exit_code = 5


class ExportError(NormfoldError):
    """Export (ONNX or torch.export) failed, or the exported file failed its checks."""

    exit_code = 6


class NotFoldedError(NormfoldError):
    """Every norm was required to fold (``require_all``) and some stayed; each is named with its
    skip code and reason."""

    exit_code = 7


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without terminal escape codes (third-party messages color their words)."""
    return _ANSI.sub("", text)


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message``, to wrap a third-party error in one readable line."""
    lines = [ln for ln in plain(str(e)).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"


def printable(text: object) -> str:
    """``text`` with every character that is not printable (newlines, carriage returns, terminal
    escapes, Unicode line separators and format characters) written as its Python escape
    (``\\n``, ``\\x1b``, ``\\u2028``), so a name from a user's file (a state-dict key, a module
    path, a file name) can never start a new line of output or steer the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ConsistencyError(NormfoldError):
    """A post-condition of normfold's own failed: the artifacts of one run disagree, or planning
    the folded program again finds work the plan missed. A bug in normfold, never returned as a
    result: the message names the folds and merges involved."""

    exit_code = 1


class UnknownCodeError(NormfoldError, LookupError):
    """A name that is not one of the stable codes normfold gives (:mod:`normfold.codes`), or not
    one of its tables of codes: a typo in the caller, or a code of another normfold version."""

    exit_code = 1
