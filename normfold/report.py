"""Report helpers: step timings, library versions and JSON writing for ``--report``.

The report's content is built by :meth:`normfold.pipeline.FoldRun.to_dict`; this module times
the steps, stamps versions and writes the JSON (made atomic by :mod:`normfold.files`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from normfold.errors import ExportError

logger = logging.getLogger(__name__)

_PACKAGES = ("normfold", "torch", "onnx", "onnxruntime", "onnxscript")

#: Called with a step name; returns a context manager wrapping that step (the CLI's spinner).
StepHook = Callable[[str], AbstractContextManager[Any]]


class StepTimer:
    """Times named steps into :attr:`timings` and wraps each in the caller's progress hook."""

    def __init__(self, on_step: StepHook | None = None) -> None:
        self.on_step = on_step
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        hook = self.on_step(name) if self.on_step is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with hook:
            yield
        self.timings[name] = time.perf_counter() - start
        logger.info("%s took %.3f s", name, self.timings[name])


def versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour a report depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` (a staged path of :class:`normfold.files.OutputSet`,
    which makes it atomic). The text is made first, so invalid data (NaN) writes nothing."""
    path = Path(path)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ExportError(f"writing report {path.name} failed: {e.strerror or e}") from e
    return path
