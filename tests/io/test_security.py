"""No code from the working directory runs unless the user names it.

A downloaded model folder may hold ``onnx.py``, ``sympy.py``, ... next to the weights. The test
plants such a file for *every* top-level module a full ``normfold fold`` run imports (found by
running it once, plus the lazily imported dependencies named in the issue) and then runs the
installed ``normfold`` command in that folder, for every input format and for ``inspect``: no
planted file may run. A factory module that lives in the folder (``mymodel.py``) is still
importable, and its own imports resolve to the installed packages, not the planted files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from normfold.models import resnet
from safetensors.torch import save_file

RESNET = "normfold.models:resnet"
NORMFOLD = str(Path(sys.executable).with_name("normfold"))  # the console script users run
NAMED = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "sympy", "networkx", "ml_dtypes", "packaging",
         "safetensors", "numpy", "typer", "rich", "json", "tempfile", "pickle", "zipfile")  # fmt: skip
_NOT_PLANTABLE = {"__main__", "__future__", "builtins", "sys", "normfold"}

_IMPORTED = """
import json, sys
from normfold.cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""

_PLANT = "open({canary!r}, 'a').write({name!r} + '\\n')\n"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every top-level module a `fold --out x.onnx --report` run has imported by its end."""
    folder = tmp_path_factory.mktemp("clean")
    args = ["fold", RESNET, "--out", "x.onnx", "--report", "r.json", "-q"]
    run = subprocess.run([sys.executable, "-c", _IMPORTED, *args], cwd=folder,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    names = set(json.loads(run.stdout.strip().splitlines()[-1])) | set(NAMED)
    return sorted(n for n in names if n.isidentifier() and n not in _NOT_PLANTABLE)


def _plant(folder: Path, names: list[str], canary: Path) -> None:
    for name in names:
        (folder / f"{name}.py").write_text(_PLANT.format(canary=str(canary), name=name))


def _setup(folder: Path) -> None:
    model = resnet()
    torch.save(model.state_dict(), folder / "w.pt")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, folder / "ckpt.pth")
    save_file(model.state_dict(), str(folder / "w.safetensors"))
    torch.save(model, folder / "whole.pt")
    torch.save(torch.randn(2, 3, 32, 32), folder / "x.pt")
    # the user's own factory, in the folder: importable, and its imports are the real packages
    (folder / "mymodel.py").write_text(
        "import sympy\nimport onnx\nfrom normfold.models import resnet\n\n"
        "assert hasattr(sympy, 'Symbol') and hasattr(onnx, 'ModelProto'), 'a planted file was imported'\n\n"
        "def build():\n    return resnet()\n"
    )


RUNS = [
    ("factory-installed", ["fold", RESNET, "--out", "a.onnx", "--report", "a.json"]),
    ("factory-in-folder", ["fold", "mymodel:build", "--out", "b.pt2", "--inputs", "x.pt"]),
    ("state-dict", ["fold", "w.pt", "--model", RESNET, "--out", "c.onnx"]),
    ("checkpoint", ["inspect", "ckpt.pth", "--model", "mymodel:build", "--input-shape", "2,3,32,32"]),
    ("safetensors", ["fold", "w.safetensors", "--model", RESNET, "--out", "d.onnx", "--report", "d.json"]),
    ("trusted-pickle", ["inspect", "whole.pt", "--trust", "--inputs", "x.pt", "--report", "e.json"]),
    ("inspect", ["inspect", RESNET]),
]


def test_the_plant_list_covers_the_lazy_dependencies(imported: list[str]) -> None:
    for name in ("onnx", "onnxruntime", "onnxscript", "sympy", "networkx", "ml_dtypes", "safetensors"):
        assert name in imported


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("args", [r[1] for r in RUNS], ids=[r[0] for r in RUNS])
def test_no_planted_module_runs(tmp_path: Path, imported: list[str], args: list[str]) -> None:
    canary = tmp_path / "canary.txt"
    folder = tmp_path / "downloaded-model"
    folder.mkdir()
    _setup(folder)
    _plant(folder, imported, canary)
    run = subprocess.run([NORMFOLD, *args, "-q"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert not canary.exists(), f"planted modules ran: {canary.read_text().split()}"
    assert run.returncode == 0, run.stderr
