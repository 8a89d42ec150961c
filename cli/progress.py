"""Progress on stderr while a command runs: one spinner line per phase, with its elapsed time.

The library calls its ``on_step`` hook with each step's name (``load``, ``capture and fold``,
``verify (pytorch)``, ``export (onnx)``, ...); :func:`progress` gives that hook. The display starts
before torch is imported (the first phase, ``starting``, is that import: seconds of a run on a
cold cache), shows each phase as it begins (finished ones get a check mark and keep their time)
and is removed when the command ends, so a finished run's terminal shows only its results.

It is off with ``--quiet`` and whenever stderr is not a terminal (a log, CI, a pipe): there a
run that succeeds writes nothing to stderr.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from normfold.cli.consoles import err_console
from rich.console import Console

from normfold.errors import printable

StepHook = Any  # Callable[[str], AbstractContextManager[Any]]: normfold.report.StepHook


@contextlib.contextmanager
def progress(command: str, *, quiet: bool, console: Console | None = None) -> Iterator[StepHook | None]:
    """The ``on_step`` hook of one command's run (None when the display is off)."""
    console = console if console is not None else err_console
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        SpinnerColumn(finished_text="[green]✓[/green]"),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with bar:
        first = bar.add_task(f"{command}: starting (importing torch)", total=1)

        @contextlib.contextmanager
        def on_step(name: str) -> Iterator[None]:
            bar.update(first, completed=1)  # the imports are over once the library runs a step
            task = bar.add_task(f"{command}: {printable(name)}", total=1)
            bar.refresh()  # drawn at once: a step shorter than a refresh still shows
            try:
                yield
            finally:
                bar.update(task, completed=1, refresh=True)

        yield on_step
