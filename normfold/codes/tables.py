"""README's tables of codes, rendered from the registry: :data:`TABLES`, :func:`markdown`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from normfold.codes.base import Code, Transform
from normfold.codes.registry import CODES
from normfold.errors import UnknownCodeError

__all__ = ["TABLES", "Table", "codes_of", "markdown"]


@dataclass(frozen=True)
class Table:
    """One of README's tables of codes: the codes of ``transforms`` (each one's own first), under
    ``header``, and ``footer`` rows after them (a code passed on from another table)."""

    name: str
    transforms: tuple[Transform, ...]
    header: tuple[str, str] = ("code", "meaning")
    footer: tuple[tuple[str, str], ...] = ()


TABLES: Mapping[str, Table] = MappingProxyType({
    "fold": Table("fold", ("fold", "capture")),
    "merge": Table(
        "merge",
        ("merge",),
        footer=(("any kept-norm code", "a branch's own BN stays (its conv branch is then no conv)"),),
    ),
    "drop_bias": Table(
        "drop_bias",
        ("drop_bias",),
        footer=(("any kept-norm code", "the engine keeps the norm: a code of `fold()`'s table, its reason"),),
    ),
    "swap": Table("swap", ("swap",)),
    "calibrate": Table("calibrate", ("calibrate",), header=("code", "left unchanged because")),
    "norm_affine": Table("norm_affine", ("norm_affine",), header=("code", "kept (or shift kept) because")),
})  # fmt: skip


def codes_of(table: str) -> list[Code]:
    """The codes ``table`` shows, in its order: those a transform of the table gives first, then
    the ones it shares, each group in registry order."""
    t = _table(table)
    mine = [c for c in CODES.values() if set(c.transforms) & set(t.transforms)]
    return sorted(mine, key=lambda c: c.transforms[0] not in t.transforms)


def markdown(table: str) -> str:
    """``table`` as README shows it: a markdown table, one row per code, no trailing newline."""
    t = _table(table)
    rows = [
        f"| {t.header[0]} | {t.header[1]} |",
        "|---|---|",
        *(f"| `{c.name}` | {_cell(_meaning(c, t))} |" for c in codes_of(table)),
        *(f"| {name} | {_cell(meaning)} |" for name, meaning in t.footer),
    ]
    return "\n".join(rows)


def _meaning(code: Code, table: Table) -> str:
    return code.meaning_in(next(t for t in table.transforms if t in code.transforms))


def _cell(text: str) -> str:
    """A table cell: every ``|`` escaped, so a ``|mean|`` in a code span does not end the cell."""
    return text.replace("|", "\\|")


def _table(name: str) -> Table:
    if name not in TABLES:
        raise UnknownCodeError(f"{name!r} is not a table of codes (known: {', '.join(TABLES)})")
    return TABLES[name]
