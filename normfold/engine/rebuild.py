"""Rebuilt modules: what is left of a module once the norm op inside its ``forward`` is folded.

A norm module whose ``forward`` also runs other ops (timm's ``BatchNormAct2d``: ``F.batch_norm``,
then ``self.drop``, then ``self.act``) cannot become ``nn.Identity`` when its norm folds, and
setting its statistics to the identity map still runs a batch-norm op. The export has no such op:
for the eager module to compute what the program computes *with the same ops*, the module is
replaced (under every name it has, nothing else of the model changes) by a :class:`Remainder`
that runs the ops of the module's call the fold left, read off the captured graph:

    original:   y = act(drop(batch_norm(x)))      folded:   y = act(drop(x))

The remainder runs on the module's single tensor input ``x``, step by step; each step is either a
call of one of the module's own children on one value (``self.act``), which keeps the user's
submodule, its class and its parameter names (``<path>.act.weight``), or one ATen op of the
module's own ``forward`` whose arguments are ``x``, earlier steps' values, literals, or the
module's own parameters and buffers; the last step's value is the output. Every call of the
module (a module called twice) must leave the same steps. Anything else (several tensor inputs,
symbolic shapes, several outputs, an in-place op that would now write to ``x`` while another op
reads it) is not rebuilt, and :mod:`normfold.engine.apply` keeps its earlier treatment, with the reason.

The same replacement serves a block whose own ``forward`` subtracts or scales the branches a merge
takes into one conv (FastViT's RepMixer: ``x + gamma * (mixer(x) - norm(x))``,
:mod:`normfold.engine.reparam_eager`): its steps call the merged conv's module instead of the sum.

:mod:`normfold.engine.recipes` reads the steps off the captured graph (it decides); this module
holds and runs them. A :class:`Recipe` is plain data (JSON-able: :meth:`Recipe.to_json`), so a
saved folded model (:mod:`normfold.io.roundtrip`) is rebuilt without code: ATen ops are looked up
by name in ``torch.ops.aten`` only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["ATTR", "VALUE", "Recipe", "Remainder", "Step", "rebuilt_modules"]

#: markers in a step's arguments: ``{"$": i}`` is value ``i`` (0: the input, ``i``: step ``i``'s
#: output), ``{"$attr": name}`` a parameter or buffer of the rebuilt module
VALUE, ATTR = "$", "$attr"


@dataclass(frozen=True)
class Step:
    """Call child ``module``, or run ATen ``op`` (``"relu.default"``), with ``args``/``kwargs``
    (JSON-able, with the markers above)."""

    module: str | None = None
    op: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        head = {"module": self.module} if self.module is not None else {"op": self.op}
        return {**head, "args": list(self.args), "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        module, op = data.get("module"), data.get("op")
        return cls(
            module=None if module is None else str(module),
            op=None if op is None else str(op),
            args=tuple(data["args"]),
            kwargs=tuple(dict(data["kwargs"]).items()),
        )


@dataclass(frozen=True)
class Recipe:
    """How a module's folded call is rebuilt: its class name (for the report) and the steps."""

    original: str
    steps: tuple[Step, ...]

    def to_json(self) -> dict[str, Any]:
        return {"original": self.original, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recipe:
        return cls(str(data["original"]), tuple(Step.from_json(s) for s in data["steps"]))

    def describe(self) -> str:
        parts = [s.module if s.module is not None else f"aten.{s.op}" for s in self.steps]
        return f"{self.original} rebuilt, runs: {' -> '.join(parts)}"


@functools.cache
def _aten(name: str) -> torch._ops.OpOverload:
    """``torch.ops.aten.<packet>.<overload>`` by name (``relu.default``): nothing else is reachable."""
    packet, _, overload = name.partition(".")
    if not packet.isidentifier() or not overload.isidentifier():
        raise ValueError(f"not an ATen op name: {name!r}")
    op = getattr(getattr(torch.ops.aten, packet), overload)
    if not isinstance(op, torch._ops.OpOverload):
        raise ValueError(f"not an ATen op: {name!r}")
    return op


class Remainder(nn.Module):
    """A module whose norm op was folded away: it runs the rest of its ``forward``'s ops (the
    :class:`Recipe`), with the original module's children (under their names) and the parameters
    and buffers those ops read. It pickles (ops are held by name) and scripts
    (``torch.jit.script`` takes :meth:`graph_module`, an ``fx.GraphModule`` of the same steps)."""

    def __init__(self, original: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        for name, child in original.named_children():
            self.add_module(name, child)  # every child: module paths stay what they were
        for step in recipe.steps:
            if step.module is not None:
                self.get_submodule(step.module)  # AttributeError when the module has no such child
                continue
            _aten(step.op or "")  # ValueError for a name that is not an ATen op
            for a in [*step.args, *(v for _, v in step.kwargs)]:
                if isinstance(a, dict) and ATTR in a:
                    name = a[ATTR]
                    held = original._parameters.get(name, original._buffers.get(name))
                    if held is None:
                        raise KeyError(f"{type(original).__name__} has no parameter or buffer {name}")
                    if name in original._parameters:
                        self.register_parameter(name, original._parameters[name])
                    else:
                        self.register_buffer(name, held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for step in self.recipe.steps:
            fn = self.get_submodule(step.module) if step.module is not None else _aten(step.op or "")
            args = [self._arg(a, values) for a in step.args]
            values.append(fn(*args, **{k: self._arg(v, values) for k, v in step.kwargs}))
        return values[-1]

    def _arg(self, a: Any, values: list[torch.Tensor]) -> Any:
        if isinstance(a, dict):
            return values[a[VALUE]] if VALUE in a else getattr(self, a[ATTR])
        if isinstance(a, list):
            return [self._arg(v, values) for v in a]
        return a

    def graph_module(self) -> fx.GraphModule:
        """The same steps as an ``fx.GraphModule`` sharing this module's children and tensors."""
        graph = fx.Graph()
        values: list[fx.Node] = [graph.placeholder("x")]

        def arg(a: Any) -> Any:
            if isinstance(a, dict):
                return values[a[VALUE]] if VALUE in a else graph.get_attr(a[ATTR])
            return [arg(v) for v in a] if isinstance(a, list) else a

        for step in self.recipe.steps:
            args, kwargs = tuple(arg(a) for a in step.args), {k: arg(v) for k, v in step.kwargs}
            if step.module is not None:
                values.append(graph.call_module(step.module, args, kwargs))
            else:
                # the op's packet: TorchScript resolves the overload from the arguments, as eager did
                values.append(graph.call_function(_aten(step.op or "").overloadpacket, args, kwargs))
        graph.output(values[-1])
        return fx.GraphModule(self, graph, class_name=self.recipe.original)

    def __prepare_scriptable__(self) -> nn.Module:
        return self.graph_module()

    def extra_repr(self) -> str:
        return self.recipe.describe()


def rebuilt_modules(model: nn.Module) -> dict[str, str]:
    """Module path -> what it runs now, for every :class:`Remainder` in ``model`` (the report's list)."""
    return {p: m.recipe.describe() for p, m in model.named_modules() if isinstance(m, Remainder)}
