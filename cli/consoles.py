"""The CLI's two consoles: results on stdout, errors and progress on stderr.

Their own module so that what prints (:mod:`normfold.cli.render`, :mod:`normfold.cli.progress`)
and what turns errors into messages (:mod:`normfold.cli.errors`) share them without importing
each other: rendering a library note needs the error module's :func:`~normfold.cli.errors.cli_words`.
"""

from __future__ import annotations

from rich.console import Console

out_console = Console()
err_console = Console(stderr=True)
