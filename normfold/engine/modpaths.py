"""Module paths ``torch.export`` records through a sliced container, resolved to registered ones.

A ``forward`` that iterates a slice of a container (``for m in self.model[:-1]``) calls modules
of a new container object that ``model[:-1]`` built; where the export cannot match that object
to the registered one (a module shared between blocks), ``nn_module_stack`` holds paths such as
``model.slice(None, -1, None).0.bn``. The module is ``model``'s child picked by the slice:

* ``nn.Sequential`` slices keep their keys: ``.0`` is the child registered as ``0``;
* ``nn.ModuleList`` slices renumber: ``.0`` is the first child the slice keeps.

Both readings agree whenever the slice starts at the first child (``[:-1]``). Where they differ
(``[1:]``), the parameters the ops under that path read decide: they belong to the module the
path names (compared through the capture's aliases, so a shared module counts once). A path
neither reading nor the parameters settle stays as recorded (its ops are then treated as code
of the forward, as before).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from torch import fx


class Capture(Protocol):
    """What this module reads of a :class:`normfold.engine.capture.Capture` (which calls it, so it
    cannot import it back)."""

    aliases: Mapping[str, str]
    graph: fx.Graph

    def state_of(self, node: Any) -> str | None: ...

_SLICE = re.compile(r"^slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)$")


def unslice(capture: Capture, path: str) -> str:
    """``path`` with every ``<container>.slice(a, b, c).<k>`` replaced by the registered child it
    names (see the module docstring); unchanged where that is not decided."""
    cache: dict[str, str] = capture.__dict__.setdefault("_unsliced", {})
    if path not in cache:
        cache[path] = _resolve(capture, path)
    return cache[path]


def _resolve(capture: Capture, path: str) -> str:
    parts = path.split(".")
    done: list[str] = []
    i = 0
    while i < len(parts):
        match = _SLICE.match(parts[i])
        if match is None:
            done.append(parts[i])
            i += 1
            continue
        if i + 1 >= len(parts):
            return path
        bounds = [None if g == "None" else int(g) for g in match.groups()]
        container = ".".join(done)
        kept = _children(capture, container)[slice(*bounds)]
        key = parts[i + 1]
        by_key = key if key in kept else None  # nn.Sequential: keys kept
        by_index = kept[int(key)] if key.isdigit() and int(key) < len(kept) else None  # nn.ModuleList
        if by_key is None or by_index is None or by_key == by_index:
            child = by_key or by_index
        else:
            recorded = ".".join(parts[: i + 2])
            votes: dict[str, str | None] = capture.__dict__.setdefault("_slice_votes", {})
            if recorded not in votes:  # one scan of the graph per recorded block, not per path under it
                votes[recorded] = _by_parameters(capture, recorded, container, (by_key, by_index))
            child = votes[recorded]
        if child is None:
            return path
        done.append(child)
        i += 2
    return ".".join(done)


def _children(capture: Capture, container: str) -> list[str]:
    """Names of ``container``'s registered children, in order."""
    prefix = f"{container}." if container else ""
    names = []
    for registered in capture.aliases:
        if registered.startswith(prefix) and registered != container:
            rest = registered[len(prefix) :]
            if rest and "." not in rest:
                names.append(rest)
    return names


def _by_parameters(
    capture: Capture, recorded: str, container: str, candidates: tuple[str, str]
) -> str | None:
    """The candidate child whose parameters the ops recorded under ``recorded`` read, or None."""
    votes: set[str] = set()
    for node in capture.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            continue
        inner = next(reversed(stack.values()))[0]
        if inner != recorded and not inner.startswith(recorded + "."):
            continue
        rest = inner[len(recorded) :]
        if "slice(" in rest:
            continue
        for arg in node.all_input_nodes:
            fqn = capture.state_of(arg)
            if fqn is None:
                continue
            owner = capture.aliases.get(fqn.rpartition(".")[0], fqn.rpartition(".")[0])
            fits = [c for c in candidates if _module(capture, container, c + rest) == owner]
            if len(fits) == 1:  # a module both readings reach (shared between blocks) tells nothing
                votes.add(fits[0])
    return next(iter(votes)) if len(votes) == 1 else None


def _module(capture: Capture, container: str, rest: str) -> str:
    path = f"{container}.{rest}" if container else rest
    return capture.aliases.get(path, path)
