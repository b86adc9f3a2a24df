"""Number search parameters: http://hl7.org/fhir/R4/search.html#number.

A value's precision is implied by how it is written: ``eq100`` means [99.5, 100.5), ``eq1e2``
[50, 150). ``gt/lt/ge/le`` compare with the exact value, ``sa/eb`` are gt/lt, ``ap`` is ±10%.
The same comparison serves quantities (:mod:`.quantity`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    IndexRows,
    Not,
    Pred,
    ValueContext,
    all_of,
    bad_value,
    first_seen,
    split_prefix,
    unsupported_modifier,
)

TABLE = "idx_number"
MODIFIERS = ("missing",)


def number_of(value: Any) -> float | None:
    """A node's numeric value (decimal, integer, or a numeric string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a number parameter."""
    rows: IndexRows = []
    seen: set[float] = set()
    for node in nodes:
        number = number_of(node.value)
        if number is not None and first_seen(seen, number):
            rows.append((TABLE, {"hash_identity": identity, "grp": grp, "value": number}))
    return rows


def parse_number(text: str) -> tuple[float, float, float]:
    """``(value, low, high)``: the value and the half-open range its precision implies."""
    try:
        dec = Decimal(text)
    except InvalidOperation:
        raise ValueError("not a decimal") from None
    if not dec.is_finite():
        raise ValueError("not a finite decimal")
    half = Decimal(5).scaleb(dec.as_tuple().exponent - 1)  # type: ignore[operator]
    return float(dec), float(dec - half), float(dec + half)


def value_predicate(
    prefix: str, value: float, low: float, high: float, column: str = "value"
) -> Pred:
    """Compare ``column`` with a search number under ``prefix``."""
    if prefix == "eq":
        return all_of(Cmp(column, ">=", low), Cmp(column, "<", high))
    if prefix == "ne":
        return Not(all_of(Cmp(column, ">=", low), Cmp(column, "<", high)))
    if prefix in ("gt", "sa"):
        return Cmp(column, ">", value)
    if prefix in ("lt", "eb"):
        return Cmp(column, "<", value)
    if prefix == "ge":
        return Cmp(column, ">=", value)
    if prefix == "le":
        return Cmp(column, "<=", value)
    if prefix == "ap":
        gap = abs(value) * 0.1
        return all_of(Cmp(column, ">=", value - gap), Cmp(column, "<=", value + gap))
    raise ValueError(prefix)


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one number value such as ``gt5.4``."""
    if modifier is not None:
        raise unsupported_modifier(param.code, modifier)
    prefix, text = split_prefix(value)
    try:
        number, low, high = parse_number(text)
    except ValueError:
        raise bad_value(param.code, value, "expected [prefix]number") from None
    return all_of(Cmp("hash_identity", "=", identity), value_predicate(prefix, number, low, high))


SORT_COLUMN = "value"
