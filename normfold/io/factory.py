"""Factory specs: ``package.module:callable``, imported and called to build a model.

Importing the named module runs its code, which the user chose explicitly. Installed modules come
first; a module found only in the working directory is importable too (as with ``python -m``),
but only while the factory's module is imported and the factory runs (and while a trusted pickle's
classes are imported: :func:`working_dir_importable`), never before anything installed and never
afterwards, so a file there cannot shadow an installed package (onnx, sympy, ...).

**Default input shapes.** A factory may register the shapes of its example inputs (batch first,
one per positional input of the model's ``forward``) with :func:`register_input_shapes`; a caller
that names the factory without giving inputs then runs the model on inputs of those shapes. The
reference zoo (``normfold.models``) registers every factory of its own when it is imported, which
importing the spec does first: the library never imports the zoo.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from normfold.errors import LoadError, UsageError, first_line

__all__ = [
    "build",
    "input_shapes_of",
    "is_factory_spec",
    "register_input_shapes",
    "resolve_factory",
    "working_dir_importable",
]

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

#: id(factory) -> (factory, its example input shapes); the factory is held, so its id stays its own
_INPUT_SHAPES: dict[int, tuple[Callable[..., Any], tuple[tuple[int, ...], ...]]] = {}


def register_input_shapes(factory: Callable[..., Any], input_shapes: Sequence[Sequence[int]]) -> None:
    """Declare the example input shapes of ``factory`` (module docstring); a second call replaces them."""
    if not callable(factory):
        raise UsageError(f"register_input_shapes() expects a callable factory, got {type(factory).__name__}")
    try:
        shapes = tuple(tuple(shape) for shape in input_shapes)
    except TypeError:
        shapes = ()
    if not shapes or not all(shape and all(_positive_int(d) for d in shape) for shape in shapes):
        raise UsageError(
            "register_input_shapes(): input_shapes must be one or more shapes (sequences of positive "
            f"ints, batch first), got {input_shapes!r}"
        )
    _INPUT_SHAPES[id(factory)] = (factory, shapes)


def _positive_int(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def input_shapes_of(factory: Callable[..., Any]) -> list[tuple[int, ...]] | None:
    """The shapes registered for ``factory`` (by identity), or None."""
    entry = _INPUT_SHAPES.get(id(factory))
    return [tuple(s) for s in entry[1]] if entry is not None and entry[0] is factory else None


def is_factory_spec(text: str) -> bool:
    return bool(_SPEC.match(text)) and not Path(text).exists()


class _WorkingDirFinder(importlib.abc.MetaPathFinder):
    """Finds a top-level module in the working directory, consulted only after every other
    finder failed: unlike a ``sys.path`` entry (even the last one), it cannot take a name an
    installed package owns, not even a namespace package's (``google.protobuf``)."""

    def __init__(self, folder: str, found: list[Path] | None = None) -> None:
        self.folder = folder
        self.found = found if found is not None else []  # the files of the modules it found

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if path is not None:  # a submodule: its package's own __path__ finds it
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [self.folder])
        if spec is not None and spec.has_location and spec.origin:
            self.found.append(Path(spec.origin))
        return spec


@contextlib.contextmanager
def working_dir_importable(found: list[Path] | None = None) -> Iterator[None]:
    """Modules of the working directory importable for the block only, after everything else;
    the files of those it finds are appended to ``found``."""
    saved = list(sys.path)
    # the script's folder or '' (python -c, -m) would put the working directory first
    sys.path[:] = [p for p in saved if p not in ("", os.getcwd())]
    finder = _WorkingDirFinder(os.getcwd(), found)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.path[:] = saved


def resolve_factory(spec: str, code_files: list[Path] | None = None) -> Callable[..., Any]:
    """Import ``package.module:callable``.

    Installed modules come first; a module found only in the working directory is importable
    too (as with ``python -m``) while the factory's module is imported (and, in :func:`build`,
    while the factory runs), never before anything installed and never afterwards, so a file
    there cannot shadow an installed package (onnx, sympy, ...) then or later. ``code_files``
    collects the source files of the factory's module and of the working directory's modules
    the import found (inputs of the run: never to be written over).
    """
    if not _SPEC.match(spec):
        raise UsageError(f"{spec!r} is not a factory spec of the form package.module:callable")
    module_name, _, attr = spec.partition(":")
    try:
        with working_dir_importable(code_files):
            obj: Any = importlib.import_module(module_name)
        if code_files is not None and getattr(obj, "__file__", None):
            code_files.append(Path(obj.__file__))
    except ImportError as e:
        raise LoadError(f"cannot import {module_name!r} for factory {spec!r}: {e}") from e
    except Exception as e:  # the module itself raised (SyntaxError, an error in its top-level code)
        raise LoadError(f"importing {module_name!r} for factory {spec!r} failed: {first_line(e)}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise LoadError(f"{module_name!r} has no attribute {attr!r} (factory {spec!r})") from e
    if not callable(obj):
        raise LoadError(f"factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(
    spec: str, model_args: Mapping[str, Any] | None = None, code_files: list[Path] | None = None
) -> tuple[nn.Module, list[tuple[int, ...]] | None]:
    """Call a factory spec; return the module and the input shapes its factory registered
    (:func:`register_input_shapes`), if any. ``code_files``: see :func:`resolve_factory`."""
    factory = resolve_factory(spec, code_files)
    try:
        with working_dir_importable(code_files):  # a factory may import its siblings lazily
            model = factory(**dict(model_args or {}))
    except Exception as e:
        raise LoadError(f"factory {spec!r} failed with arguments {dict(model_args or {})}: {e}") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model, input_shapes_of(factory)
