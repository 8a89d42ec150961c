"""Running a written ``.onnx`` file in onnxruntime, as the export check does.

* **Graph optimizations disabled**: onnxruntime's ConvBNFusion runs at its basic level and would
  refold an unfolded BatchNorm, hiding a wrong fold; the file is run as written.
* **One session per execution provider**, opened once and run on every input set (creating a
  session reads and prepares the whole graph). A session runs its ops on the calling thread
  (``intra_op_num_threads=1``): the input sets run side by side in threads of their own
  (:mod:`normfold.check.workers`), so a core that another process holds delays one set, not every op
  of every set at a thread-pool barrier.
* **Providers** (:func:`check_providers`): the CPU one by default; any other must be installed in
  this onnxruntime build (a UsageError names those that are), and a session that could not use
  the provider asked for (onnxruntime falls back to the CPU silently) is an ExportError: a CUDA
  check that ran on the CPU would prove nothing about CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from normfold.errors import ExportError, UsageError, first_line

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def check_providers(providers: Sequence[str] | None) -> tuple[str, ...]:
    """``providers`` (default: CPU), each installed in this onnxruntime build, none twice."""
    if providers is None:
        return DEFAULT_PROVIDERS
    import onnxruntime as ort

    installed = ort.get_available_providers()
    if isinstance(providers, str) or not providers:
        raise UsageError(f"providers={providers!r}: give a list of onnxruntime execution providers, "
                         f"e.g. {list(DEFAULT_PROVIDERS)!r} (installed: {', '.join(installed)})")  # fmt: skip
    for provider in providers:
        if provider not in installed:
            raise UsageError(
                f"providers={list(providers)!r}: {provider!r} is not installed in this onnxruntime "
                f"{ort.__version__} (installed: {', '.join(installed)})"
            )
    if len(set(providers)) != len(providers):
        raise UsageError(f"providers={list(providers)!r}: a provider is given twice")
    return tuple(providers)


def runtime_name(provider: str) -> str:
    """``onnxruntime-cpu`` for ``CPUExecutionProvider``: the key of its parity report."""
    return "onnxruntime-" + provider.removesuffix("ExecutionProvider").lower()


@dataclass(frozen=True)
class Session:
    """An open onnxruntime session of one file on one provider."""

    session: ort.InferenceSession
    name: str  # the file's name, for messages
    provider: str


def open_session(
    model: str | Path | bytes, provider: str = "CPUExecutionProvider", *, name: str = "",
    data_dir: Path | None = None,
) -> Session:  # fmt: skip
    """An onnxruntime session of ``model`` (a file, or a serialized model: ``name`` names it in
    messages, ``data_dir`` holds the external data it names) on ``provider`` (module docstring).
    Every onnxruntime session normfold opens is opened here."""
    import onnxruntime as ort

    shown = name or (Path(model).name if isinstance(model, (str, Path)) else "the model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if data_dir is not None:  # a serialized model's external data: their folder
        key = "session.model_external_initializers_file_folder_path"
        options.add_session_config_entry(key, str(data_dir))
    try:
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, options, providers=[provider])
    except Exception as e:
        raise _failure(shown, provider, e) from e
    if provider not in session.get_providers():
        raise ExportError(
            f"onnxruntime could not run {shown} on {provider} (it would run on "
            f"{', '.join(session.get_providers())})"
        )
    return Session(session, shown, provider)


def run_onnx(
    model: str | Path | Session, inputs: tuple[torch.Tensor, ...], provider: str
) -> list[torch.Tensor]:
    """Run an ONNX file (a path, or a session of :func:`open_session` on ``provider``) on
    ``inputs``, fed to the graph's inputs in order; outputs as CPU tensors."""
    opened = open_session(model, provider) if isinstance(model, (str, Path)) else model
    session = opened.session
    try:
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ExportError(f"ONNX graph takes {len(names)} inputs, {len(inputs)} given")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
        return [torch.from_numpy(a) for a in session.run(None, feed)]
    except ExportError:
        raise
    except Exception as e:
        raise _failure(opened.name, provider, e) from e


def _failure(name: str, provider: str, e: Exception) -> ExportError:
    hint = ""
    if "NOT_IMPLEMENTED" in str(e):
        hint = (
            " (onnxruntime has no kernel for that op in the model's dtype: write a .pt2 instead, "
            "or cast the weights to float32)"
        )
    return ExportError(f"onnxruntime ({provider}) failed to run {name}: {first_line(e)}{hint}")
