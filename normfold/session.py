"""The one skeleton every command runs: load -> transform -> verify -> export -> write.

A :class:`Session` holds a run's output set (:class:`~normfold.io.files.OutputSet`: destinations
checked before any work, everything staged, committed as one set at the end) and its record
(:class:`~normfold.report.RunRecord`: options, step timings, the failing step of a failed run).
:func:`session` opens one; the entry points of :mod:`normfold.pipeline` differ only in their
transform. A run that fails after its outputs were checked still commits its report (status
``failed``) and its saved inputs; nothing else is written.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normfold.check.parity import ParityRule
from normfold.check.reference import Reference
from normfold.engine.capture import CaptureOptions
from normfold.errors import UsageError, first_line
from normfold.io.export import ExportResult, commit_export, stage_export, stage_state_dict
from normfold.io.files import OutputSet
from normfold.io.load import LoadedModel, load_model
from normfold.options import ExportOptions, LoadOptions, WriteOptions
from normfold.report import RunRecord, StepHook, StepTimer, write_json

logger = logging.getLogger(__name__)

Source = nn.Module | str | Path


class Session:
    """One run of a command: its files, its record, and the steps every command shares."""

    def __init__(self, files: OutputSet, record: RunRecord) -> None:
        self.files = files
        self.record = record

    @property
    def steps(self) -> StepTimer:
        return self.record.steps

    def load(self, source: Source, options: LoadOptions) -> LoadedModel:
        """:func:`normfold.load_model`, or a copy of a module given as is (the caller's module is
        never changed). The source files of the code a load ran are inputs of the run too (a
        ``report`` over the factory's own module is refused like one over the weights)."""
        if isinstance(source, nn.Module):
            return LoadedModel(copy.deepcopy(source), f"module {type(source).__name__}")
        loaded = load_model(source, model=options.model, model_args=options.model_args, trust=options.trust)
        self.files.add_inputs(loaded.code_files)
        return loaded

    def export(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...] | None,
        *,
        reference: Reference | None,
        capture: CaptureOptions | None,
        options: ExportOptions,
        rule: ParityRule,
        program: torch.export.ExportedProgram | None = None,
    ) -> ExportResult | None:
        """Stage ``out``: a state dict (``.pt``/``.pth``/``.safetensors``, returns None) or an
        export (``.onnx``/``.pt2``, written as ``options`` say) checked against ``reference``."""
        out = self.files.paths["out"]
        if out.suffix in (".pt", ".pth", ".safetensors"):
            with self.steps("write"):
                stage_state_dict(model, self.files)
            return None
        if inputs is None:
            needs = "give InputSpec.shapes or InputSpec.file"
            raise UsageError(f"out={out}: an export needs example inputs ({needs})")
        return stage_export(
            model, inputs, self.files, program=program, reference=reference, capture=capture, options=options,
            rule=rule, steps=self.steps,
        )  # fmt: skip

    def commit(self) -> None:
        """Write the report (if asked) into the set, then commit the set: data, model, report. A
        failure here (a full disk, no free inode) is the step ``write`` in a failed run's report."""
        with self.steps.untimed("write"):
            if "report" in self.files.paths:
                write_json(self.files.staged("report"), self.record.to_dict())
            export = getattr(self.record.run, "export", None)
            if export is not None:
                commit_export(self.files, export)
            else:
                self.files.commit()


@contextlib.contextmanager
def session(
    command: str,
    out: str | Path | None,
    write: WriteOptions,
    *,
    options: Mapping[str, Any],
    inputs: Iterable[object],
    formats: Mapping[str, Sequence[str]],
    on_step: StepHook | None,
    seed: int | None = None,
) -> Iterator[Session]:
    """Open a run of ``command`` writing ``out`` and ``write``'s files (checked now, before any
    work); the body fills ``session.record.run``; leaving it normally commits the set."""
    outputs = {"out": out, "report": write.report, "save_inputs": write.save_inputs}
    paths = [p for p in inputs if isinstance(p, (str, Path))]  # a module given as is has no file
    with OutputSet(outputs, inputs=paths, force=write.force, formats=formats) as files:
        record = RunRecord(command, dict(options), StepTimer(on_step), seed=seed)
        run = Session(files, record)
        try:
            yield run
            run.commit()
        except Exception as e:
            _commit_report(files, record, e)
            raise


def _commit_report(files: OutputSet, record: RunRecord, error: Exception) -> None:
    """A failed run's report (status ``failed``, the failing step and message) and saved inputs."""
    try:
        if "report" in files.paths:
            write_json(files.staged("report"), record.to_dict(error))
        files.commit(["report", "save_inputs"])
    except Exception as failed:  # never hide the run's own error behind the report's
        logger.info("the report of the failed run was not written: %s", first_line(failed))
