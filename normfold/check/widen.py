"""The exact reference of a model that casts inside: its captured graph widened to float64.

``copy.deepcopy(model).double()`` is no exact reference for a model whose ``forward`` casts to a
fixed dtype (Hugging Face norms compute in ``float32`` whatever the model's dtype): those ops keep
rounding to float32. The captured ``torch.export`` graph names every such dtype as an argument, so
:func:`widened` rewrites each floating dtype argument of every op (casts, factories, the export's
own dtype assertions) to float64 and casts the graph's parameters, buffers and constants to
float64: the same computation, rounded in float64 throughout.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

__all__ = ["widened"]

_NARROW = {torch.float32, torch.float16, torch.bfloat16}


def _wide(arg: Any) -> Any:
    if isinstance(arg, torch.dtype) and arg in _NARROW:
        return torch.float64
    if isinstance(arg, (list, tuple)):
        return type(arg)(_wide(a) for a in arg)
    if isinstance(arg, dict):
        return {k: _wide(v) for k, v in arg.items()}
    return arg


def widened(program: ExportedProgram) -> nn.Module:
    """A module computing ``program`` in float64 (module docstring); its floating inputs must be
    float64 too."""
    with warnings.catch_warnings():  # torch's own deprecation inside copying a GraphModule
        warnings.simplefilter("ignore", FutureWarning)
        module: fx.GraphModule = copy.deepcopy(program.module())  # .to() below must not touch program
    for node in module.graph.nodes:
        if node.op == "call_function":
            node.args, node.kwargs = _wide(node.args), _wide(node.kwargs)
    module.recompile()
    module.to(torch.float64)
    for node in module.graph.nodes:  # lifted constants are plain attributes: .to() does not see them
        if node.op == "get_attr":
            parent, _, name = node.target.rpartition(".")
            owner = functools.reduce(getattr, parent.split("."), module) if parent else module
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                setattr(owner, name, value.to(torch.float64))
    return module
