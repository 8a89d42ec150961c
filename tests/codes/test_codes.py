"""The registry of codes (:mod:`normfold.codes`) against the source that gives them and README.

The package's source is read with :mod:`ast`, not run: a *carrier* is any class or function of the
package with a parameter or dataclass field named ``code`` (``Skipped``, ``Keep``, ``KeptBias``,
``NotSwapped``, ``NotMerged``, ``Unmerged``, ``NotRecalibrated``, ``_Fail``, ``Refused``,
``_skip``, ... found, not listed), and a code is a string given as that argument, directly, as a
module constant (``gate.CODE``, imported under another name too) or as either side of a
conditional. Functions that return ``(code, reason)`` pairs (annotated ``tuple[str, str]``) give
the first element of each pair they return or put in a dict. A code passed on from another record
(``keep.code``) is no literal: it is counted where it was first given.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import normfold
from normfold import codes
from normfold.codes import CODES, TABLES, Code, Kept, lookup, markdown
from normfold.codes.__main__ import _main as codes_main
from normfold.errors import UnknownCodeError

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "normfold"
README = ROOT / "README.md"
REGENERATE = "python -m normfold.codes --markdown {table}"

#: which transforms' records carry the codes a module gives, by dotted module name; None: the
#: module's records are internal (replan's ``Keep("export_only")`` marks a fold held out of the eager
#: module: never shown); any other module of ``normfold.engine`` gives the planner's codes
_PLANNER = frozenset({"fold", "merge", "drop_bias"})  # passed on by merges and drop-bias
_EMITTERS: dict[str, frozenset[str] | None] = {
    "normfold.engine.replan": None,
    "normfold.engine.gate": frozenset({"fold"}),
    "normfold.folding": frozenset({"fold"}),
    "normfold.engine.analysis": frozenset({"fold"}),
    "normfold.engine.parts": frozenset({"capture"}),
    "normfold.onnx_fold": frozenset({"fold"}),
    "normfold.engine.reparam": frozenset({"merge"}),
    "normfold.engine.reparam_values": frozenset({"merge"}),
    "normfold.engine.reparam_eager": frozenset({"merge"}),
    "normfold.transforms.bias": frozenset({"drop_bias"}),
    "normfold.transforms.swap": frozenset({"swap"}),
    "normfold.transforms.calibration": frozenset({"calibrate"}),
    "normfold.transforms.calibration_capture": frozenset({"calibrate"}),
    "normfold.engine.norm_affine.torch_norms": frozenset({"norm_affine"}),
    "normfold.engine.norm_affine.walk": frozenset({"norm_affine"}),
    "normfold.engine.norm_affine.planner": frozenset({"norm_affine"}),
    "normfold.norm_affine_checkpoint": frozenset({"norm_affine"}),
}


# --- the scanner ------------------------------------------------------------------------------


def _sources(root: Path = PACKAGE) -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def _carriers(trees: dict[str, ast.Module]) -> dict[str, set[int]]:
    """Callable name -> positions of its ``code`` argument (without ``self``)."""
    found: dict[str, set[int]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields = [
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name)
                    and "ClassVar" not in ast.unparse(s.annotation)
                ]
                if "code" in fields:
                    found.setdefault(node.name, set()).add(fields.index("code"))
                for f in node.body:
                    if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                        params = [a.arg for a in f.args.args[1:]]
                        if "code" in params:
                            found.setdefault(node.name, set()).add(params.index("code"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__":
                params = [a.arg for a in node.args.args]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if "code" in params:
                    found.setdefault(node.name, set()).add(params.index("code"))
    return found


def _constants(trees: dict[str, ast.Module]) -> dict[str, dict[str, frozenset[str]]]:
    """Module -> its top-level string (or set of strings) constants, imported ones included."""
    own: dict[str, dict[str, frozenset[str]]] = {}
    for mod, tree in trees.items():
        values: dict[str, frozenset[str]] = {}
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found = _literal_strings(node.value)
                if found:
                    values.update({t.id: found for t in targets if isinstance(t, ast.Name)})
        own[mod] = values
    out = {}
    for mod, tree in trees.items():
        values = dict(own[mod])
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module in own:
                for alias in node.names:
                    if alias.name in own[node.module]:
                        values[alias.asname or alias.name] = own[node.module][alias.name]
        out[mod] = values
    return out


def _literal_strings(value: ast.expr) -> frozenset[str]:
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return frozenset({value.value})
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "frozenset":
        return _literal_strings(value.args[0]) if value.args else frozenset()
    if isinstance(value, (ast.Set, ast.Tuple, ast.List)) and value.elts:
        parts = [_literal_strings(e) for e in value.elts]
        if all(len(p) == 1 for p in parts):
            return frozenset().union(*parts)
    return frozenset()


def _resolve(expr: ast.expr, consts: dict[str, frozenset[str]]) -> set[str]:
    """The strings ``expr`` can be: a literal, a module constant, a conditional, a collection."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.Name):
        return set(consts.get(expr.id, ()))
    if isinstance(expr, ast.IfExp):
        return _resolve(expr.body, consts) | _resolve(expr.orelse, consts)
    if isinstance(expr, (ast.Set, ast.Tuple, ast.List)):
        return set().union(*(_resolve(e, consts) for e in expr.elts))
    return set()


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _pairs(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.Tuple]:
    """The ``(code, reason)`` pairs a function annotated ``-> ... tuple[str, str] ...`` returns or
    puts in a dict."""
    if fn.returns is None or "tuple[str, str]" not in ast.unparse(fn.returns):
        return
    for node in ast.walk(fn):
        values: list[ast.expr | None] = []
        if isinstance(node, ast.Return):
            values = [node.value]
        elif isinstance(node, ast.Dict):
            values = list(node.values)
        elif isinstance(node, ast.DictComp):
            values = [node.value]
        while any(isinstance(v, ast.IfExp) for v in values):  # ``return (a, b) if c else None``
            values = [b for v in values for b in ((v.body, v.orelse) if isinstance(v, ast.IfExp) else (v,))]
        yield from (v for v in values if isinstance(v, ast.Tuple) and len(v.elts) == 2)


def given(trees: dict[str, ast.Module]) -> list[tuple[str, str, int, str]]:
    """Every code the package gives: ``(code, module, line, carrier)``."""
    carriers, constants = _carriers(trees), _constants(trees)
    found = []
    for mod, tree in trees.items():
        consts = constants[mod]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) in carriers:
                args = [k.value for k in node.keywords if k.arg == "code"]
                for pos in carriers[_callee(node)]:  # type: ignore[index]
                    if pos < len(node.args) and not any(
                        isinstance(a, ast.Starred) for a in node.args[: pos + 1]
                    ):
                        args.append(node.args[pos])
                found += [
                    (c, mod, node.lineno, _callee(node) or "") for a in args for c in _resolve(a, consts)
                ]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for pair in _pairs(node):
                    found += [(c, mod, pair.lineno, f"{node.name}()") for c in _resolve(pair.elts[0], consts)]
    return found


def compared(trees: dict[str, ast.Module]) -> list[tuple[str, str, int]]:
    """Every string a record's ``.code`` is compared with: ``(code, module, line)``."""
    constants = _constants(trees)
    found = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "code" for s in sides):
                    found += [(c, mod, node.lineno) for s in sides for c in _resolve(s, constants[mod])]
    return found


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.Module]:
    return _sources()


def _where(rows: list[tuple[str, str, int, str]]) -> str:
    return ", ".join(f"{mod.replace('.', '/')}.py:{line} ({how})" for _, mod, line, how in rows)


# --- the scanner finds what it must (it reads a made-up package) ------------------------------


_MADE_UP = {
    "pkg.records": """
from dataclasses import dataclass
CODE = "from_constant"
class _Fail(Exception):
    def __init__(self, code: str, reason: str) -> None:
        self.code = code
@dataclass(frozen=True)
class Kept:
    norm: str
    code: str
    reason: str
def raise_it(flag):
    raise _Fail("from_fail" if flag else "from_else", "why")
def record(norm):
    return Kept(norm, code="from_keyword", reason="why")
""",
    "pkg.user": """
from pkg.records import CODE as OTHER, Kept, _Fail
GENERIC = {"from_compared_set"}
class Result:
    def _skip(self, norm: str, code: str, reason: str) -> None: ...
def run(result, keep):
    result._skip("n", "from_method", "why")
    Kept("n", OTHER, "why")
    Kept("n", keep.code, "passed on, no literal")
    if keep.code in GENERIC or keep.code == "from_compared":
        pass
def reasons(x) -> tuple[str, str] | None:
    narrow = x in ("not_a_pair_a", "not_a_pair_b")
    return ("from_pair", "why") if narrow else None
def judged(names) -> dict[str, tuple[str, str]]:
    return {n: ("from_dict_pair", f"{n} why") for n in names}
""",
}


def test_the_scanner_finds_every_form_a_code_is_given_in() -> None:
    trees = {mod: ast.parse(src) for mod, src in _MADE_UP.items()}
    codes_given = {c for c, *_ in given(trees)}
    assert codes_given == {
        "from_fail",
        "from_else",
        "from_keyword",
        "from_method",
        "from_constant",
        "from_pair",
        "from_dict_pair",
    }
    assert {c for c, *_ in compared(trees)} == {"from_compared_set", "from_compared"}


# --- the source against the registry ----------------------------------------------------------


def test_every_code_the_package_gives_is_registered(trees: dict[str, ast.Module]) -> None:
    rows = given(trees)
    assert len({c for c, *_ in rows}) >= 40, "the scanner lost the package's codes"  # 50 when written
    missing: dict[str, list[tuple[str, str, int, str]]] = {}
    for row in rows:
        if row[0] not in CODES:
            missing.setdefault(row[0], []).append(row)
    assert not missing, (
        "codes given but not in normfold/codes/: "
        + "; ".join(f"{code!r} at {_where(found)}" for code, found in sorted(missing.items()))
        + (
            ". Add each to normfold/codes/ (fold.py or transforms.py: name, one-line meaning, "
            "transforms), then put its table into README.md: " + REGENERATE.format(table="TABLE")
        )
    )


def test_every_registered_code_is_given_somewhere(trees: dict[str, ast.Module]) -> None:
    dead = sorted(set(CODES) - {c for c, *_ in given(trees)})
    assert not dead, f"registered in normfold/codes/ but given nowhere in the package: {dead}"


def test_every_code_a_record_is_compared_with_is_registered(trees: dict[str, ast.Module]) -> None:
    unknown = [row for row in compared(trees) if row[0] not in CODES]
    assert not unknown, "`.code` compared with unregistered codes: " + ", ".join(
        f"{c!r} at {mod.replace('.', '/')}.py:{line}" for c, mod, line in unknown
    )


def test_each_code_is_registered_for_the_transform_that_gives_it(trees: dict[str, ast.Module]) -> None:
    wrong, unplaced = [], set()
    for code, mod, line, how in given(trees):
        planner = _PLANNER if mod.startswith("normfold.engine.") else frozenset()
        expected = _EMITTERS.get(mod, planner)
        if expected == frozenset():
            unplaced.add(mod)
        elif expected is not None and code in CODES and not expected & set(CODES[code].transforms):
            wrong.append(f"{code!r} at {mod.replace('.', '/')}.py:{line} ({how}): registered for "
                         f"{CODES[code].transforms}, given by {sorted(expected)}")  # fmt: skip
    assert not unplaced, (
        f"modules {sorted(unplaced)} give codes: add them to _EMITTERS in tests/codes/test_codes.py with the "
        "transforms whose records carry their codes"
    )
    assert not wrong, "; ".join(wrong)


def test_calibration_codes_agree_with_the_registry() -> None:
    """:data:`normfold.transforms.calibration.CODES`, the calibration's own list, names the same codes."""
    from normfold.transforms import calibration

    assert set(calibration.CODES) == codes.names("calibrate")


# --- the registry itself ----------------------------------------------------------------------


def test_lookup_finds_a_code_and_names_the_closest_for_a_typo() -> None:
    code = lookup("overflow")
    assert code.name == "overflow" and set(code.transforms) == {"fold", "merge", "norm_affine"}
    assert code.meaning_in("merge") != code.meaning_in("fold")
    with pytest.raises(
        UnknownCodeError, match=r"'overflw' is not a code normfold gives .*did you mean overflow"
    ):
        lookup("overflw")
    with pytest.raises(LookupError):  # an UnknownCodeError is a LookupError too
        lookup("")


def test_every_code_has_a_one_line_meaning_in_each_of_its_tables() -> None:
    for code in CODES.values():
        for transform in code.transforms:
            text = code.meaning_in(transform)
            assert text.strip() and "\n" not in text, f"{code.name} in {transform}: {text!r}"
    shown = {c.name for table in TABLES for c in codes.codes_of(table)}
    assert shown == set(CODES), f"codes in no table: {sorted(set(CODES) - shown)}"


def test_a_code_refuses_an_unknown_transform() -> None:
    with pytest.raises(ValueError, match="transforms"):
        Code("x", "y", ("fold", "train"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not give it"):
        Code("x", "y", ("fold",), {"swap": "z"})


def test_a_table_lists_its_own_codes_first_and_escapes_pipes() -> None:
    merge = [c.name for c in codes.codes_of("merge")]
    assert merge[0] == "reparam_stride" and merge.index("multiple_users") > merge.index("reparam_channels")
    fold = markdown("fold")
    assert "`\\|mean\\| / std`" in fold  # a pipe in a code span would end the cell
    assert all(len(re.split(r"(?<!\\)\|", line)) == 4 for line in fold.splitlines())  # two cells
    with pytest.raises(UnknownCodeError, match="'train' is not a table of codes"):
        markdown("train")


def test_the_command_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert codes_main(["--markdown", "swap"]) == 0
    assert capsys.readouterr().out == f"<!-- table of codes: swap -->\n{markdown('swap')}\n\n"
    assert codes_main(["--markdown", "nope"]) == 2
    assert "usage: python -m normfold.codes --markdown" in capsys.readouterr().err


def test_every_record_of_a_thing_kept_is_one_type() -> None:
    """Every dataclass of the package that carries a ``code`` (always) and a ``reason`` is a
    :class:`normfold.Kept`, whose ``subject`` names a field of it (or is its own property)."""
    records = []
    for info in pkgutil.walk_packages(normfold.__path__, "normfold."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == info.name and dataclasses.is_dataclass(cls):
                types = {f.name: f.type for f in dataclasses.fields(cls)}
                names = set(types)
                if types.get("code") == "str" and "reason" in types:  # a row that may have one: not a record
                    records.append(cls)
                    assert issubclass(cls, Kept), f"{info.name}.{cls.__name__} is not a normfold.Kept"
                    assert cls.subject_field in names or cls.subject is not Kept.subject, cls
    assert {c.__name__ for c in records} >= {
        "Skipped", "NotMerged", "Uncaptured", "KeptBias", "NotSwapped", "NotRecalibrated", "Keep", "Unmerged",
    }  # fmt: skip
    exported = {n for n in normfold.__all__ if isinstance(getattr(normfold, n), type)}
    public = {c.__name__ for c in records} - {"Keep", "Unmerged"}  # the plan's own, inside the engine
    assert public <= exported, f"kept records not exported from normfold: {sorted(public - exported)}"


# --- README -----------------------------------------------------------------------------------


def _readme_tables(text: str) -> list[tuple[int, list[str]]]:
    """README's tables of codes: ``(first line number, rows)`` of each table whose header's first
    cell is ``code`` and whose rows name backticked codes."""
    tables: list[tuple[int, list[str]]] = []
    block: list[str] = []
    for number, line in enumerate([*text.splitlines(), ""], start=1):
        if line.startswith("|"):
            block.append(line)
            continue
        if block and block[0].startswith("| code |") and any(re.match(r"\| `", row) for row in block[2:]):
            tables.append((number - len(block), block))
        block = []
    return tables


def _row_codes(row: str) -> set[str]:
    return set(re.findall(r"`([a-z0-9_]+)`", row.split(" | ")[0]))


def test_readme_shows_each_table_of_codes_as_the_registry_renders_it() -> None:
    text = README.read_text(encoding="utf-8")
    tables = _readme_tables(text)
    problems = []
    for name in TABLES:
        expected = markdown(name)
        if any("\n".join(rows) == expected for _, rows in tables):  # the whole table, no row more
            continue
        rows = {
            c.name: line for c, line in zip(codes.codes_of(name), expected.splitlines()[2:], strict=False)
        }
        own = {c.name for c in codes.codes_of(name) if c.transforms[0] in TABLES[name].transforms}
        best = max(tables, key=lambda t: len(own & set().union(*map(_row_codes, t[1]))), default=None)
        shown = set().union(*map(_row_codes, best[1])) if best else set()
        if not best or not shown & own:
            problems.append(f"README.md has no table of codes {name!r}")
            continue
        where = f"README.md's table of codes {name!r} (line {best[0]})"
        lines = set(best[1])
        for code in rows:
            if code not in shown:
                problems.append(f"{where} lacks `{code}`")
            elif rows[code] not in lines:
                problems.append(f"{where}: the row of `{code}` is not the registry's: {rows[code]}")
        problems += [
            f"{where} shows `{c}`, which is not a code of this table" for c in sorted(shown - set(rows))
        ]
        if not problems:
            problems.append(f"{where} differs in its header, order or last rows")
    assert not problems, "; ".join(problems) + (
        ". Regenerate the table from normfold/codes/ and paste it over README's: "
        + REGENERATE.format(table=" | ".join(TABLES))
    )


def test_readme_names_no_unregistered_code_in_a_table_of_codes() -> None:
    tables = _readme_tables(README.read_text(encoding="utf-8"))
    assert len(tables) >= len(TABLES)
    shown = {code for _, rows in tables for row in rows[2:] for code in _row_codes(row)}
    assert shown <= set(CODES), f"README shows codes normfold does not give: {sorted(shown - set(CODES))}"


# --- errors ------------------------------------------------------------------------------------


def _error_classes() -> set[str]:
    """Every class of the package (and its CLI) deriving from NormfoldError, read from the source."""
    bases: dict[str, set[str]] = {}
    for root in (PACKAGE, ROOT / "cli"):
        for tree in _sources(root).values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                    bases.setdefault(node.name, set()).update(names)
    found = {"NormfoldError"}
    while True:
        more = {cls for cls, of in bases.items() if of & found} - found
        if not more:
            return found
        found |= more


def test_every_error_class_is_exported_from_normfold() -> None:
    classes = _error_classes()
    assert {"NormfoldError", "NotFoldedError", "ConsistencyError", "UnknownCodeError"} <= classes
    for name in sorted(classes):
        cls = getattr(normfold, name, None)
        assert isinstance(cls, type) and issubclass(cls, normfold.NormfoldError), f"normfold.{name}"
        assert name in normfold.__all__, f"{name} is not in normfold.__all__"
