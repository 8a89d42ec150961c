"""Report helpers: step timings, library versions and JSON writing for the ``report`` file.

The report's content is built by :meth:`normfold.pipeline.FoldRun.to_dict` (plus, for a fold,
``rebuilt_modules``: the modules rebuilt to lose a norm op, :mod:`normfold.engine.rebuild`); this module
times the steps, wraps it in the envelope every report shares (:class:`RunRecord`: schema version,
status, the failing step and message of a failed run, options, seed, start time, versions) and
writes the JSON (made atomic by :mod:`normfold.io.files`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from normfold.errors import ExportError, plain

logger = logging.getLogger(__name__)

_PACKAGES = ("normfold", "torch", "onnx", "onnxruntime", "onnxscript")

#: Called with a step name; returns a context manager wrapping that step (the CLI's spinner).
StepHook = Callable[[str], AbstractContextManager[Any]]


class StepTimer:
    """Times named steps into :attr:`timings` and wraps each in the caller's progress hook."""

    def __init__(self, on_step: StepHook | None = None) -> None:
        self.on_step = on_step
        self.timings: dict[str, float] = {}
        self.current: str | None = None  # the step running, or the one that raised

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        hook = self.on_step(name) if self.on_step is not None else contextlib.nullcontext()
        start = time.perf_counter()
        self.current = name
        with hook:
            yield
        self.current = None
        self.timings[name] = time.perf_counter() - start
        logger.info("%s took %.3f s", name, self.timings[name])


    @contextlib.contextmanager
    def untimed(self, name: str) -> Iterator[None]:
        """A step that a failed run's report names but that has no timing of its own (the final
        commit of the outputs, which happens after the report was made)."""
        self.current = name
        yield
        self.current = None


#: Version of the report's layout: 2 added the envelope (status, failure, options, seed, started),
#: the summary, and dropped the blocks that were written twice (layers, the export's parity).
SCHEMA_VERSION = 2


@dataclass
class RunRecord:
    """A run in progress as its report shows it: the command, what was asked (the API's own
    arguments), when, the steps so far, and the result once there is one (``run.to_dict()``)."""

    command: str
    options: dict[str, Any]
    steps: StepTimer
    seed: int | None = None
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    run: Any = None
    _clock: float = field(default_factory=time.perf_counter, repr=False)

    def to_dict(self, error: BaseException | None = None) -> dict[str, Any]:
        """The report: the envelope, then the run's own blocks; with ``error``, a failed run's."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "status": "ok" if error is None else "failed",
            "started": self.started,
            "seed": self.seed,
            "options": _jsonable(self.options),
        }
        if error is not None:
            out["failure"] = {
                "step": self.steps.current,
                "error": type(error).__name__,
                "exit_code": getattr(error, "exit_code", 1),
                "message": plain(str(error)),
            }
        if self.run is not None:
            out.update(self.run.to_dict())
            rebuilt = rebuilt_in(self.run)
            if rebuilt is not None:
                out["rebuilt_modules"] = rebuilt
        out["timings_s"] = {k: round(v, 4) for k, v in self.steps.timings.items()}
        out["elapsed_s"] = round(time.perf_counter() - self._clock, 4)  # the run, imports aside
        out["versions"] = versions()
        return out


def rebuilt_in(run: Any) -> dict[str, str] | None:
    """Module path -> what it runs, for the modules of a fold run's model that were rebuilt to
    lose a norm op their ``forward`` ran (:func:`normfold.engine.rebuild.rebuilt_modules`); None for a
    run without a folded model."""
    model = getattr(getattr(run, "fold", None), "model", None)
    if model is None or not hasattr(model, "named_modules"):
        return None
    from normfold.engine.rebuild import rebuilt_modules  # torch: only once a run has a model

    return rebuilt_modules(model)


def _jsonable(value: Any) -> Any:
    """Options as JSON: paths and dtypes as text, dataclasses (an input spec, a parity rule) as
    objects, non-finite floats as text; anything else by its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor given as an input: its kind only
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


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
    """Write ``data`` as JSON to ``path`` (a staged path of :class:`normfold.io.files.OutputSet`,
    which makes it atomic). The text is made first, so invalid data (NaN) writes nothing."""
    path = Path(path)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ExportError(f"writing report {path.name} failed: {e.strerror or e}") from e
    return path
