"""Factories that register their own example input shapes (normfold.io.factory): the zoo does so,
so the library finds a zoo model's shapes without importing the zoo."""

from __future__ import annotations

import importlib
import sys
import uuid
from pathlib import Path

import pytest

from normfold.errors import UsageError
from normfold.io.factory import input_shapes_of, register_input_shapes
from normfold.io.load import load_model

SOURCE = """
import torch
from normfold.io.factory import register_input_shapes

def registered(width=5):
    return torch.nn.Sequential(torch.nn.Linear(width, 3), torch.nn.BatchNorm1d(3))

def unregistered():
    return torch.nn.Linear(4, 2)

register_input_shapes(registered, [(3, 5)])
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user's module in the working directory whose import registers one of its factories."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"nf_factory_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(SOURCE)
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def test_a_registered_factory_gives_its_shapes_to_the_loader(factory_module: str) -> None:
    loaded = load_model(f"{factory_module}:registered")
    assert loaded.input_shapes == [(3, 5)]
    assert load_model(f"{factory_module}:unregistered").input_shapes is None


def test_the_shapes_belong_to_the_factory_object_not_its_name(factory_module: str) -> None:
    load_model(f"{factory_module}:registered")  # imports it: the working directory is no sys.path entry
    module = sys.modules[factory_module]
    assert input_shapes_of(module.registered) == [(3, 5)]
    assert input_shapes_of(lambda: module.registered()) is None
    register_input_shapes(module.registered, [(2, 5), (2, 7)])  # a second call replaces them
    assert input_shapes_of(module.registered) == [(2, 5), (2, 7)]


def test_the_zoo_registers_every_factory_when_imported() -> None:
    from normfold.models import ZOO

    assert {name: input_shapes_of(m.factory) for name, m in ZOO.items()} == {
        name: list(m.input_shapes) for name, m in ZOO.items()
    }
    assert input_shapes_of(ZOO["two_tower"].factory) == [(2, 3, 24, 24), (2, 12)]


@pytest.mark.parametrize(
    ("factory", "shapes", "message"),
    [
        ("not callable", [(1, 3)], "expects a callable factory, got str"),
        (len, [], "one or more shapes"),
        (len, [(1, 0)], "got [(1, 0)]"),
        (len, [(1, True)], "positive ints"),
        (len, 3, "got 3"),
        (len, [()], "got [()]"),
    ],
)
def test_bad_registrations_are_refused(factory: object, shapes: object, message: str) -> None:
    with pytest.raises(UsageError, match="register_input_shapes") as info:
        register_input_shapes(factory, shapes)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert input_shapes_of(len) is None
