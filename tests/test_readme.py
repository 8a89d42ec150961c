"""README's code blocks run as written.

Every fenced ``python`` and ``bash`` block of README.md is run, in a fresh folder, in order:
python blocks are executed as they are; each line of a bash block is a ``normfold`` command (run
through the CLI, in process), a ``python -c`` command (executed), or one of the set-up lines
below. Where a block names the user's own files (``model.pt``, ``mypkg.nets:build``,
``batches.pt``, a Lightning ``last.ckpt``, ``torchvision``/``timm`` factories, which CI does not
install), the folder holds small stand-ins under those names (:func:`_placeholders`): the
commands themselves are never edited.

Set-up lines (``python3 -m venv``, ``pip install``, ``ruff``, ``pytest``) are what ``.ci/run``
itself runs: they are checked to be there, not run again.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from normfold.cli.app import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
BLOCKS = [(m.group(1), m.group(2), README.count("\n", 0, m.start()) + 1) for m in _BLOCK.finditer(README)]

_NETS = '''
import torch
from torch import nn


def build(width: int = 16):
    """A small conv net standing in for the user's architecture."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def resnet50(**kwargs):
    return build()


def create_model(model_name: str = "resnet50", **kwargs):
    return build()
'''


def _placeholders(folder: Path) -> None:
    """The user's files the README names, as small stand-ins."""
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "nets.py").write_text(_NETS)
    (folder / "torchvision").mkdir()  # found only because CI does not install the real one
    (folder / "torchvision" / "__init__.py").write_text("")
    (folder / "torchvision" / "models.py").write_text("from mypkg.nets import resnet50  # noqa: F401\n")
    (folder / "timm.py").write_text("from mypkg.nets import create_model  # noqa: F401\n")
    import importlib
    import sys

    sys.path.insert(0, str(folder))
    try:
        nets = importlib.import_module("mypkg.nets")
        small, wide = nets.build().state_dict(), nets.build(width=64).state_dict()
        torch.save(small, folder / "model.pt")
        torch.save({f"module.{k}": v for k, v in small.items()}, folder / "ddp_weights.pt")
        from safetensors.torch import save_file

        save_file(dict(wide), str(folder / "model.safetensors"))
        torch.save(nets.resnet50().state_dict(), folder / "weights.pt")
        ck = {"state_dict": {f"model.{k}": v for k, v in nets.resnet50().state_dict().items()}}
        torch.save(ck, folder / "last.ckpt")
        gen = torch.Generator().manual_seed(0)
        torch.save([torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)], folder / "batches.pt")
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] in ("mypkg", "torchvision", "timm")]:
            del sys.modules[name]


def _commands(text: str) -> list[str]:
    """The block's command lines: continuations joined, comments and blank lines dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


_SETUP = re.compile(r"^(python3 -m venv \.venv|\.venv/bin/pip install .*|\.venv/bin/ruff check \.|"
                    r"\.venv/bin/python -m pytest)$")  # fmt: skip


def _run_bash(text: str, where: str) -> None:
    ci = (ROOT / ".ci" / "run").read_text().replace("--quiet ", "").replace("--clear ", "")
    for command in _commands(text):
        for part in command.split(" && "):
            if _SETUP.match(part):  # the install CI runs itself (the test extra is a superset)
                ran = part in ci or part.replace("-e .", '-e ".[test]"') in ci
                assert ran, f"{where}: {part!r} is not what .ci/run runs"
                continue
            argv = shlex.split(part)
            if argv[0] in ("normfold", ".venv/bin/normfold"):
                result = CliRunner().invoke(app, argv[1:])
                assert result.exit_code == 0, f"{where}: {part}\n{result.output}"
            elif argv[:2] == ["python", "-c"]:
                exec(compile(argv[2], where, "exec"), {})
            else:
                raise AssertionError(f"{where}: no rule to run {part!r}")


@pytest.mark.parametrize(("kind", "text", "line"), BLOCKS, ids=[f"line{b[2]}" for b in BLOCKS])
def test_readme_block_runs_as_written(
    kind: str, text: str, line: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _placeholders(tmp_path)
    monkeypatch.chdir(tmp_path)
    where = f"README.md:{line}"
    with torch.random.fork_rng():
        if kind == "python":
            exec(compile(text, where, "exec"), {"__name__": "__readme__"})
        else:
            _run_bash(text, where)


def test_every_runnable_block_is_found() -> None:
    """The extraction itself: the README has both kinds, and no other fenced block claims a
    language this test would skip."""
    kinds = {k for k, _, _ in BLOCKS}
    assert kinds == {"python", "bash"}
    other = set(re.findall(r"^```(\w+)", README, re.M)) - {"python", "bash"}
    assert not other, f"README blocks in {other} are not run by this test"
