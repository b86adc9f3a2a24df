"""What every search parameter type module shares: row predicates and value parsing.

http://hl7.org/fhir/R4/search.html#escaping (``\\,`` ``\\$`` ``\\|``) and #prefix. A type module
turns one search value into a :class:`Pred` over the columns of its index table. The same
predicate renders to SQL (:func:`to_sql`, used by the compiler) and evaluates in Python over
extracted rows (:func:`evaluate`, used by :mod:`fhir_server.search.matcher`), so the database
and the in-memory matcher can be compared row for row in differential tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, false, not_, or_, true
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.hashing import prefix_successor

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

Row = dict[str, Any]
# (table name, row) pairs produced by extraction; a type's extract() gives each row once
IndexRows = list[tuple[str, Row]]


def first_seen(seen: set[Any], key: Any) -> bool:
    """True the first time ``key`` is offered to ``seen`` (which then remembers it): how the
    extractors give a repeated value one row."""
    if key in seen:
        return False
    seen.add(key)
    return True


class Pred:
    """A predicate over one index row."""


@dataclass(frozen=True, slots=True)
class Cmp(Pred):
    """``column <op> value`` with op in = != < <= > >=."""

    column: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class In(Pred):
    """``column IN values``."""

    column: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Prefix(Pred):
    """The (binary) string column starts with ``value``."""

    column: str
    value: str


@dataclass(frozen=True, slots=True)
class Contains(Pred):
    """The string column contains ``value``; ``word`` = at the start of the column or a word."""

    column: str
    value: str
    word: bool = False


@dataclass(frozen=True, slots=True)
class IsNull(Pred):
    """The column is NULL."""

    column: str


@dataclass(frozen=True, slots=True)
class All(Pred):
    """Conjunction."""

    preds: tuple[Pred, ...]


@dataclass(frozen=True, slots=True)
class Any_(Pred):
    """Disjunction."""

    preds: tuple[Pred, ...]


@dataclass(frozen=True, slots=True)
class Not(Pred):
    """Negation."""

    pred: Pred


@dataclass(frozen=True, slots=True)
class Const(Pred):
    """Always true or always false."""

    value: bool


def all_of(*preds: Pred) -> Pred:
    """Conjunction, flattening trivial cases."""
    items = tuple(p for p in preds if not (isinstance(p, Const) and p.value))
    if any(isinstance(p, Const) and not p.value for p in items):
        return Const(False)
    if not items:
        return Const(True)
    return items[0] if len(items) == 1 else All(items)


def any_of(*preds: Pred) -> Pred:
    """Disjunction, flattening trivial cases."""
    items = tuple(p for p in preds if not (isinstance(p, Const) and not p.value))
    if any(isinstance(p, Const) and p.value for p in items):
        return Const(True)
    if not items:
        return Const(False)
    return items[0] if len(items) == 1 else Any_(items)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


Binder = Callable[[Any, Any], Any]
"""Turns a value bound by :func:`to_sql` into a SQL parameter, given its column."""


def _leaf_values(pred: Pred) -> list[Any]:
    """The values a leaf predicate binds in SQL, in the order :func:`to_sql` binds them."""
    if isinstance(pred, Cmp):
        return [pred.value]
    if isinstance(pred, In):
        return list(pred.values)
    if isinstance(pred, Prefix):
        return [pred.value, prefix_successor(pred.value)] if pred.value else []
    if isinstance(pred, Contains):
        pattern = _like_escape(pred.value)
        return [pattern + "%", "% " + pattern + "%"] if pred.word else ["%" + pattern + "%"]
    return []


def bound_values(pred: Pred) -> list[Any]:
    """Every value :func:`to_sql` binds for ``pred``, in binding order (see ``binder``)."""
    if isinstance(pred, (All, Any_)):
        return [v for p in pred.preds for v in bound_values(p)]
    if isinstance(pred, Not):
        return bound_values(pred.pred)
    return _leaf_values(pred)


def pred_shape(pred: Pred) -> tuple[Any, ...]:
    """``pred`` without its bound values: predicates of one shape render to the same SQL text."""
    if isinstance(pred, (All, Any_)):
        return (type(pred).__name__, tuple(pred_shape(p) for p in pred.preds))
    if isinstance(pred, Not):
        return ("Not", pred_shape(pred.pred))
    if isinstance(pred, Cmp):
        return ("Cmp", pred.column, pred.op)
    if isinstance(pred, In):
        return ("In", pred.column, len(pred.values))
    if isinstance(pred, Prefix):
        return ("Prefix", pred.column, bool(pred.value))
    if isinstance(pred, Contains):
        return ("Contains", pred.column, pred.word)
    if isinstance(pred, IsNull):
        return ("IsNull", pred.column)
    if isinstance(pred, Const):
        return ("Const", pred.value)
    raise TypeError(pred)


def to_sql(pred: Pred, table: Any, binder: Binder | None = None) -> ColumnElement[bool]:
    """Render ``pred`` over the columns of ``table`` (a Table or an alias of one).

    With a ``binder`` every value goes through it (the compiler names them, so that a statement
    can be executed again with other values of the same shape: :func:`bound_values` lists them
    in the same order); without one they are plain anonymous parameters.
    """
    c = table.c
    if isinstance(pred, All):
        return and_(*(to_sql(p, table, binder) for p in pred.preds))
    if isinstance(pred, Any_):
        return or_(*(to_sql(p, table, binder) for p in pred.preds))
    if isinstance(pred, Not):
        return not_(to_sql(pred.pred, table, binder))
    if isinstance(pred, Const):
        return true() if pred.value else false()
    col = c[pred.column]
    if isinstance(pred, IsNull):
        return col.is_(None)
    values = _leaf_values(pred)
    if binder is not None:
        values = [binder(v, col) for v in values]
    if isinstance(pred, Cmp):
        (value,) = values
        return {
            "=": col == value,
            "!=": col != value,
            "<": col < value,
            "<=": col <= value,
            ">": col > value,
            ">=": col >= value,
        }[pred.op]
    if isinstance(pred, In):
        return col.in_(values)
    if isinstance(pred, Prefix):
        if not values:
            return col.is_not(None)
        return and_(col >= values[0], col < values[1])
    if isinstance(pred, Contains):
        if pred.word:
            return or_(col.like(values[0], escape="\\"), col.like(values[1], escape="\\"))
        return col.like(values[0], escape="\\")
    raise TypeError(pred)


def evaluate(pred: Pred, row: Row) -> bool:
    """Evaluate ``pred`` on an extracted row (SQL semantics: a comparison with NULL is false)."""
    if isinstance(pred, Cmp):
        v = row.get(pred.column)
        if v is None:
            return False
        op = pred.op
        return (
            (op == "=" and v == pred.value)
            or (op == "!=" and v != pred.value)
            or (op == "<" and v < pred.value)
            or (op == "<=" and v <= pred.value)
            or (op == ">" and v > pred.value)
            or (op == ">=" and v >= pred.value)
        )
    if isinstance(pred, In):
        return row.get(pred.column) in pred.values
    if isinstance(pred, Prefix):
        v = row.get(pred.column)
        return v is not None and v.startswith(pred.value)
    if isinstance(pred, Contains):
        v = row.get(pred.column)
        if v is None:
            return False
        if pred.word:
            return v.startswith(pred.value) or (" " + pred.value) in v
        return pred.value in v
    if isinstance(pred, IsNull):
        return row.get(pred.column) is None
    if isinstance(pred, All):
        return all(evaluate(p, row) for p in pred.preds)
    if isinstance(pred, Any_):
        return any(evaluate(p, row) for p in pred.preds)
    if isinstance(pred, Not):
        return not evaluate(pred.pred, row)
    if isinstance(pred, Const):
        return pred.value
    raise TypeError(pred)


# -- value parsing ----------------------------------------------------------------------------


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where not escaped by a backslash; escapes are kept for a later split."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    """Remove search escapes (``\\,`` ``\\$`` ``\\|`` ``\\\\``)."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split_prefix(value: str) -> tuple[str, str]:
    """``ge2020`` -> ``("ge", "2020")``; no prefix -> ``("eq", value)``."""
    if len(value) > 2 and value[:2] in PREFIXES and not value[2].isalpha():
        return value[:2], value[2:]
    return "eq", value


def bad_value(param: str, value: str, why: str) -> FhirError:
    """The 400 for a malformed search value.

    The text names the parameter and what is wrong, never ``value``: a search value may be patient
    data (a name, a birth date, an identifier). ``why`` must not quote it either.
    """
    del value  # kept in the signature so every caller says which value it rejects
    return FhirError(
        400,
        "invalid",
        f"Invalid value for search parameter '{param}': {why}",
        code="MSO-SEARCH-002",
        expression=[param],
    )


def unsupported_modifier(param: str, modifier: str) -> FhirError:
    """The 400 for a modifier a parameter type does not support."""
    return FhirError(
        400,
        "not-supported",
        f"Modifier ':{modifier}' is not supported on search parameter '{param}'",
        code="MSO-SEARCH-003",
        expression=[f"{param}:{modifier}"],
    )


@dataclass(slots=True)
class ValueContext:
    """What a type module may need beyond the value: base URL and a ValueSet expander."""

    base_url: str | None = None
    expand_valueset: Callable[[str], Sequence[tuple[str | None, str | None]] | None] | None = None
    now_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # (system, code, below) -> the code and its descendants (below) or ancestors (above)
    subsumption: Callable[[str, str, bool], Sequence[str] | None] | None = None
