"""The norm-affine planner: one decision per norm found by pattern, as data (:class:`NormPlan`).

:class:`NormIntoLinears` is the rule (``match`` / ``check`` / ``plan``, as the BatchNorm rules of
:mod:`normfold.engine.rules`): it matches when every reader of the norm's output is a Linear over
its channel axis (:mod:`.walk`), checks that each consumer's weight (and bias) is a parameter only
that layer reads and that the norm's own scale and shift belong to it alone, and plans the fold.
Every other norm is a :class:`NormKept` with a stable code (:mod:`normfold.codes`).

The facts of the eager module the graph does not hold come in as data (:class:`ModuleFacts`):
other names of a tensor (a tied LM head whose embedding is not called is still tied), the
Linear modules that can take a new bias, and the modules that register each parameter (with
``untie``, a consumer weight another op reads gets its own copy under the consumer's name,
:attr:`Consumer.untie`; one that is only registered under other names is changed in place, so
every name holds the folded value). Pure: reads the view, changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from normfold.engine.context import Refused
from normfold.engine.norm_affine.records import (
    Consumer,
    NormFold,
    NormKept,
    NormPlan,
    NormRecord,
    fold_values,
    overflow_reason,
    overflowing,
    scale_of,
    shift_of,
)
from normfold.engine.norm_affine.view import AffineNorm, AffineParam, NormView
from normfold.engine.norm_affine.walk import Reached, blocking_code, input_channels, walk
from normfold.engine.view import Node

Value = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class ModuleFacts:
    """What the eager module knows and the graph does not: ``aliases`` (FQN -> the other names
    of the same tensor), ``bias_slots`` (weight FQN of an ``nn.Linear`` without bias -> the name
    its new bias takes), and whether to give them one (``new_biases``)."""

    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    bias_slots: Mapping[str, str] = field(default_factory=dict)
    new_biases: bool = False
    #: parameter name (any of its names) -> {module path: attribute} of each module registering it
    #: (modules registered at one path only): where ``untie`` can give a layer its own copy
    owners: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    untie: bool = False


@dataclass(frozen=True)
class Match:
    norm: AffineNorm
    record: NormRecord
    reached: tuple[Reached, ...]


class NormIntoLinears:
    """``gamma * n + beta -> Linear(s)``: the scale (and shift) into every consumer."""

    name = "norm-linear"

    def match(self, view: NormView, norm: AffineNorm, record: NormRecord, value: Value) -> Match:
        if norm.refused is not None:
            raise Refused(*norm.refused)
        if _identity(record, value):
            what = "no scale or shift" if norm.weight is None and norm.bias is None else "scale 1 and shift 0"
            where = view.describe(norm.output)
            raise Refused("no_affine", f"the norm at {where} has {what}: nothing to fold")
        found = walk(view, norm)
        if found.blockers:
            raise blocking_code(view, norm, found.blockers, found.products)
        beta = shift_of(record, value)
        if found.products and beta is not None and bool((beta != 0).any()):
            names = ", ".join(dict.fromkeys(view.describe(p) for p in found.products))
            raise Refused("nonlinear_consumer", f"the output of the norm at {view.describe(norm.output)} is "
                          f"multiplied by another tensor ({names}) before its Linear layers: its scale "
                          "could pass that product, its shift cannot")  # fmt: skip
        return Match(norm, record, tuple(found.reached))

    def check(self, view: NormView, match: Match, facts: ModuleFacts) -> Refused | None:
        own = {*match.norm.nodes}
        for param in (match.norm.weight, match.norm.bias):
            if param is not None:
                refused = _own_param(view, param, own | set(param.nodes), facts)
                if refused is not None:
                    return refused
        for r in match.reached:
            refused = _consumer_check(view, r, facts)
            if refused is not None:
                return refused
        return None

    def plan(self, view: NormView, match: Match, facts: ModuleFacts, value: Value) -> NormFold:
        """``value(fqn)``: a parameter's current tensor (where the shift goes depends on it).
        Refused when the shift must stay in the norm and cannot (no scale, or a zero in it)."""
        consumers = [_consumer(view, r, facts) for r in match.reached]
        record, shift_kept = match.record, None
        beta = shift_of(record, value)
        if beta is not None and bool((beta == 0).all()):
            beta = None  # nothing to move
        missing = [c for c in consumers if c.bias is None]
        if beta is not None and missing:
            slots = facts.bias_slots if facts.new_biases else {}
            if all(c.weight in slots for c in missing):
                consumers = [c if c.bias else _with_new_bias(c, slots[c.weight]) for c in consumers]
            else:
                names = ", ".join(c.module or c.layer for c in missing if c.weight not in slots)
                hint = ("pass new_biases=True to give nn.Linear layers one" if not facts.new_biases
                        else "only an nn.Linear module can be given a new bias")  # fmt: skip
                reason = f"{names} has no bias to take the shift of {record.name} ({hint})"
                gamma = scale_of(record, value)
                if record.weight is None or bool((gamma == 0).any()) or bool((gamma == 1).all()):
                    why = "its scale has zeros" if bool((gamma == 0).any()) else "it has no scale to move"
                    why = f"{reason}, and {why}: the shift cannot stay as beta / gamma"
                    raise Refused("new_bias_needed", why)
                shift_kept = ("new_bias_needed", f"{reason}: the shift stays in the norm as beta / gamma")
        return NormFold(record, tuple(consumers), shift_kept)


def _identity(record: NormRecord, value: Value) -> bool:
    """Scale 1 and no shift (or 0): a norm already parameter-free."""
    beta = shift_of(record, value)
    return bool((scale_of(record, value) == 1).all()) and (beta is None or bool((beta == 0).all()))


def _with_new_bias(c: Consumer, name: str) -> Consumer:
    return dataclasses.replace(c, new_bias=name)


def _own_param(view: NormView, param: AffineParam, own: set[Node], facts: ModuleFacts) -> Refused | None:
    """The norm's scale or shift parameter is read by the norm alone, under one name."""
    others = [u for u in view.users(param.source) if u not in own]
    if others or param.fqn in facts.aliases:
        also = ", ".join(view.describe(u) for u in others) or ", ".join(facts.aliases[param.fqn])
        return Refused("shared_norm", f"{param.fqn} is also read by {also}: a norm called at several places "
                       "(or a weight shared) cannot be made parameter-free for one of them")  # fmt: skip
    return None


def _consumer_check(view: NormView, r: Reached, facts: ModuleFacts) -> Refused | None:
    layer = r.layer
    name = view.describe(layer.node)
    module = view.canonical(view.owner(layer.node)[1])
    for role, node in (("weight", layer.weight), ("bias", layer.bias)):
        if node is None:
            continue
        fqn = view.state_name(node)
        if fqn is None or not view.is_parameter(node):
            why = f"the {role} of {name} is computed in forward, not a parameter"
            return Refused("weight_not_parameter", why)
        dtype = view.dtype(node)
        if dtype is None or not dtype.is_floating_point:
            return Refused("dtype", f"the {role} {fqn} of {name} is not floating point ({dtype})")
        readers = _readers(view, r, role, node)
        if readers and all(view.owner(u)[1] == view.owner(layer.node)[1] for u in readers):
            why = f"{name} is called at several places: its {role} {fqn} would be scaled for every call"
            return Refused("tied_weight", why)
        if (readers or fqn in facts.aliases) and not (facts.untie and _own_name(facts, fqn, module)):
            also = ", ".join(view.describe(u) for u in readers) or ", ".join(facts.aliases[fqn])
            can = not facts.untie and _own_name(facts, fqn, module)
            fix = f"gives {module} its own copy" if readers else "changes it under every name"
            hint = f" (untie=True {fix})" if can else ""
            return Refused("tied_weight", f"the {role} {fqn} of {name} is also read by {also} (a tied or "
                           f"shared weight): scaling it would change that reader too{hint}")  # fmt: skip
    try:
        input_channels(view, r)
    except Refused as e:
        return e
    return None


def _readers(view: NormView, r: Reached, role: str, node: Node) -> list[Node]:
    """The ops other than ``r``'s layer reading its weight (or bias)."""
    layer = r.layer
    first = (layer.via or layer.inner or layer.node) if role == "weight" else layer.node
    readers = [u for u in view.users(node) if u is not first]
    if role == "weight" and layer.via is not None:
        readers += [u for u in view.users(layer.via) if u is not (layer.inner or layer.node)]
    return readers


def _own_name(facts: ModuleFacts, fqn: str, module: str) -> str | None:
    """``module.attr``: the name under which ``module`` itself registers the parameter ``fqn``."""
    attr = facts.owners.get(fqn, {}).get(module)
    return None if attr is None else f"{module}.{attr}" if module else attr


def _consumer(view: NormView, r: Reached, facts: ModuleFacts) -> Consumer:
    layer = r.layer
    module = view.canonical(view.owner(layer.node)[1])
    names, untie = {}, []
    for role, node in (("weight", layer.weight), ("bias", layer.bias)):
        fqn = view.state_name(node) if node is not None else None
        own = _own_name(facts, fqn, module) if fqn is not None and facts.untie else None
        if own is not None and _readers(view, r, role, node):  # a copy for this layer alone
            fqn = own
            untie.append(own)
        # a tensor under other names no op of the graph reads (BERT's ``cls.predictions.bias`` is
        # ``decoder.bias``) is written in place: every name keeps holding the layer's value
        names[role] = fqn
    rank = len(view.shape(layer.weight))
    in_axis = rank - 2 if layer.in_out else rank - 1  # (.., in, out) or (.., out, in)
    return Consumer(view.name(layer.node), module, names["weight"], names["bias"], in_axis,
                    input_channels(view, r), r.through, untie=tuple(untie))  # fmt: skip


def records(view: NormView, norms: list[AffineNorm]) -> list[NormRecord]:
    """One :class:`NormRecord` per norm; a module run at several places names each call by its op."""
    modules = [view.canonical(view.owner(n.nodes[0])[1]) for n in norms]
    out = []
    for norm, module in zip(norms, modules, strict=True):
        first = view.name(norm.nodes[0])
        name = module if module and modules.count(module) == 1 else f"{module or 'forward'}:{first}"
        w, b = norm.weight, norm.bias
        out.append(NormRecord(name, norm.kind, norm.pattern, module, view.owner(norm.nodes[0])[2],
                              tuple(view.name(n) for n in norm.nodes), w.fqn if w else None,
                              w.offset if w else 0.0, b.fqn if b else None, norm.channels))  # fmt: skip
    return out


def plan(view: NormView, facts: ModuleFacts, value: Value) -> NormPlan:
    """Decide every norm of the viewed graph; ``value(fqn)``: a parameter's current tensor."""
    rule, result = NormIntoLinears(), NormPlan()
    order: dict[str, int] = {}
    norms = view.affine_norms()
    for norm, record in zip(norms, records(view, norms), strict=True):
        try:
            match = rule.match(view, norm, record, value)
            refused = rule.check(view, match, facts)
            if refused is not None:
                raise refused
            fold = rule.plan(view, match, facts, value)
            order = order or {view.name(n): i for i, n in enumerate(view.nodes())}
            ordered = tuple(sorted(fold.consumers, key=lambda c: order[c.layer]))  # in graph order
            result.folds.append(dataclasses.replace(fold, consumers=ordered))
        except Refused as r:
            result.kept.append(NormKept.of(record, r.code, r.reason))
    return result


def keep_overflowing(the_plan: NormPlan, value: Value, dtype_of: Callable[[str], torch.dtype]) -> NormPlan:
    """``the_plan`` with every fold whose new values do not fit their parameter's dtype
    (``dtype_of(fqn)``: the model's own, e.g. float16) kept instead, code ``overflow``."""
    out = NormPlan(kept=list(the_plan.kept))
    for fold in the_plan.folds:
        bad = overflowing(fold, fold_values(fold, value), dtype_of)
        if bad is None:
            out.folds.append(fold)
        else:
            out.kept.append(NormKept.of(fold.norm, "overflow", overflow_reason(fold.norm.name, bad)))
    return out
