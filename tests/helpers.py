"""Shared test helpers: realistic BatchNorm statistics, byte-level state comparison, and the
command line run in this process (:func:`invoke`, :func:`ok`) or in a fresh one (:func:`invoke_fresh`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.check.reference import _ProgramModule

if TYPE_CHECKING:
    from typer.testing import Result


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial statistics and affine parameters.

    Parity tests must never run on the default mean 0 / var 1 / gamma 1 / beta 0, which would
    hide a fold that forgets one of them.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, _BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                dtype = m.running_mean.dtype
                m.running_mean.copy_((torch.randn(c, generator=gen) + 0.5).to(dtype))
                m.running_var.copy_((torch.rand(c, generator=gen) * 2.8 + 0.2).to(dtype))
            if m.affine:
                dtype = m.weight.dtype
                m.weight.copy_((torch.rand(c, generator=gen) + 0.5).to(dtype))
                m.bias.copy_((torch.randn(c, generator=gen) * 0.5).to(dtype))
    return module.eval()


def state_bytes(module: nn.Module) -> dict[str, bytes]:
    """Raw bytes of every state_dict entry (bf16 included), for byte-identity checks."""
    return {
        k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + str(v.dtype).encode()
        for k, v in module.state_dict().items()
    }


def count_bn(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


def bn_ops(program: torch.export.ExportedProgram) -> int:
    """batch_norm ops left in an exported program."""
    return sum(n.target is torch.ops.aten.batch_norm.default for n in program.graph.nodes)


def exported(program: torch.export.ExportedProgram) -> nn.Module:
    """An exported program as a module ``verify`` can run (normfold's own wrapper)."""
    return _ProgramModule(program)


#: zoo model -> {kept norm: code} with reparameterization (the CLI's default); every other norm op folds
ZOO_KEPT_REPARAM = {
    "mixed": {
        "bn_shared": "shared_producer",
        "bn_nostats": "batch_statistics",
        "bn_after_relu": "zero_padding_forward",
        "bn_two_users": "multiple_users",
        "bn_seq": "wrong_axis",
    },
}
#: the same without reparameterization (``normfold.fold``'s default): identity-branch norms stay
ZOO_KEPT = {
    **ZOO_KEPT_REPARAM,
    "repvgg": {f"stages.{i}.rbr_identity": "multiple_users" for i in (1, 3, 4)},
    "mobileone": {f"stages.{i}.rbr_skip": "multiple_users" for i in (1, 4)},
}
#: zoo model -> blocks reparameterization merges into one conv (every block of the model)
ZOO_MERGED = {
    "repvgg": {f"stages.{i}" for i in range(5)},
    "mobileone": {f"stages.{i}" for i in range(5)},
    "acnet": {f"features.{i}" for i in (0, 2, 4)},
}
#: zoo model -> norms folded in the export only (written in a forward, not a removable module)
ZOO_EXPORT_ONLY = {
    "functional": {"bn1", "bn2", "bn_fc"},
    "custom_bn": {"forward:sub_1"},
    "inception_next": {"blocks.0:mul", "blocks.1:mul_1"},  # layer scale in the block's forward
}
#: zoo model -> (norm, pattern, through) folds that show one pattern each
ZOO_SHOWS = {
    "levit": [("attn.qkv.bn", "linear-bn", ("flatten_1",)), ("head_bn", "bn-linear", ())],
    "inception_next": [("blocks.0.norm", "bn-conv", ())],
    "bn_head": [("head_norm", "bn-linear", ("adaptive_avg_pool2d", "flatten"))],
    "mixed_kernel": [("bn_mix", "concat-bn", ("cat",))],
    "custom_bn": [("norm2:sub", "conv-affine", ()), ("forward:sub_1", "conv-affine", ())],
    "bn_act": [("bn_stem", "conv-bn", ())],
    "same_pad": [("bn_stem", "conv-bn", ())],
    "functional": [("bn_fc", "linear-bn", ())],
}


class Pair(nn.Module):
    """A user's own class: producer -> norm -> activation."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.norm = norm

    def forward(self, x):
        return torch.relu(self.norm(self.producer(x)))


# ------------------------------------------------------------------------------------------------
# the command line

#: wide enough that rich never wraps a table cell or a path
CLI_ENV = {"COLUMNS": "250"}
#: what a usage or file error, ``--help`` and ``--version`` must not import
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript")


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """``normfold ARGS`` in this process (typer's runner), its output captured."""
    from normfold.cli.app import app  # here: most users of this module never run the CLI
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args], env=CLI_ENV if env is None else env)


def ok(*args: str | Path) -> Result:
    """``normfold ARGS``, which must exit 0."""
    result = invoke(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@dataclass(frozen=True)
class FreshRun:
    """One command of :func:`invoke_fresh`: how it ended, and the :data:`HEAVY` modules loaded
    in its process once it had (those of the commands before it included)."""

    exit_code: int
    stdout: str
    stderr: str
    heavy: list[str]


_FRESH = f"""
import json, sys
loaded = lambda: [m for m in {HEAVY!r} if m in sys.modules]
from normfold.cli.app import app
on_import = loaded()
from typer.testing import CliRunner
runs = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args, env={CLI_ENV!r})
    runs.append([r.exit_code, r.stdout, r.stderr, loaded()])
print(json.dumps([on_import, runs]))
"""


def invoke_fresh(
    commands: Sequence[Sequence[str | Path]], *, cwd: Path | None = None, timeout: float = 300
) -> tuple[list[str], list[FreshRun]]:
    """Each command in turn in one fresh Python process (nothing imported by this one): the
    :data:`HEAVY` modules importing the CLI loaded, and each command's :class:`FreshRun`."""
    argv = json.dumps([[str(a) for a in args] for args in commands])
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    on_import, runs = json.loads(proc.stdout.splitlines()[-1])
    return on_import, [FreshRun(*run) for run in runs]
