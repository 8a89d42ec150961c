"""A norm-affine plan's norm -> consumers map, in the forms other tools take as their per-model
tables, so they can use normfold's discovery (found by pattern on the graph) instead.

Each folded norm (:attr:`NormPlan.folds`) with its module path and the module paths of the
Linear layers it feeds, in graph order (a layer written in a ``forward`` is named by its
weight, as :meth:`normfold.NormAffineResult.norm_mappings` does). Norms that stay are not
listed: their consumers cannot take the scale. The formats, each followed from the tool's source:

* ``"llm-compressor"``: ``[{"norm": str, "linears": [str, ...]}]``, the fields of
  ``NormMapping(norm=..., linears=[...])`` (vllm-project/llm-compressor,
  ``src/llmcompressor/modifiers/transform/spinquant/norm_mappings.py``: ``norm`` "name or regex
  that matches norm layer", ``linears`` "list of names or regexes of Linear layers that receive
  input from norm"; exact names, no ``re:`` prefix). ``NormMapping(**entry)`` builds one.
* ``"aimet"``: ``[(norm, [linear, ...])]``, the pairs an AIMET SpinQuant
  ``SUPPORTED_MODULE_DICT[cls][RMSNORM_LINEAR_PAIRS]`` function returns
  (``TrainingExtensions/torch/src/python/aimet_torch/experimental/spinquant/spinquant_optimizer.py``
  of AIMET, read in the lipovsek/aimet mirror: ``lambda module: [(layer.input_layernorm,
  [layer.self_attn.q_proj, ...]), ..., (module.model.norm, [module.lm_head])]``). AIMET wants the
  module objects: ``lambda m: [(m.get_submodule(n), [m.get_submodule(x) for x in xs]) for n, xs in
  pairs]`` turns these names into them.
* ``"autoround"``: ``[{"smooth_layer": regex, "balance_layers": [regex, ...]}]``, the explicit
  mappings ``AWQConfig(mappings=[...])`` takes (intel/auto-round,
  ``auto_round/algorithms/transforms/awq/mappings.py``, ``resolve_mappings(model,
  user_mappings)``: a norm is a *smooth layer*, its consumers the *balance layers*). Names are
  anchored and escaped (``^model\\.layers\\.0\\.input_layernorm$``) because AutoRound matches
  them with ``re.search`` against every module of a block. AutoRound resolves a mapping only
  inside a numbered block (``...layers.N.``) and only onto ``nn.Linear`` balance layers: an entry
  for a norm outside any block (a final norm into the LM head) is listed but AutoRound skips it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from normfold.engine.norm_affine.records import NormPlan
from normfold.errors import UsageError

__all__ = ["FORMATS", "MappingFormat", "norm_consumers", "to_format"]

MappingFormat = Literal["llm-compressor", "aimet", "autoround"]
FORMATS: tuple[str, ...] = ("llm-compressor", "aimet", "autoround")


def norm_consumers(plan: NormPlan) -> list[tuple[str, list[str]]]:
    """``(norm module, [consumer module, ...])`` per folded norm, in plan order."""
    out = []
    for fold in plan.folds:
        linears = dict.fromkeys(c.module or c.weight for c in fold.consumers)
        out.append((fold.norm.module or fold.norm.name, list(linears)))
    return out


def to_format(plan: NormPlan, format: str) -> list[Any]:
    """The plan's map as ``format`` writes it (module docstring): plain lists, dicts, strings."""
    pairs = norm_consumers(plan)
    if format == "llm-compressor":
        return [{"norm": norm, "linears": linears} for norm, linears in pairs]
    if format == "aimet":
        return [(norm, linears) for norm, linears in pairs]
    if format == "autoround":
        return [{"smooth_layer": _exact(norm), "balance_layers": [_exact(x) for x in linears]}
                for norm, linears in pairs]  # fmt: skip
    raise UsageError(f"unknown mapping format {format!r}; use one of {', '.join(FORMATS)}")


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"
