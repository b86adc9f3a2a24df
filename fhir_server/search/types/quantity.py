"""Quantity search parameters: http://hl7.org/fhir/R4/search.html#quantity.

``[prefix]number|system|code``: with a system, (system, code) must match; with only a code it
matches the code or, when the Quantity has no code, its unit; without either only the number
counts. Quantity, Age, Duration, Count, Distance and Money (currency as code) are indexed.
Units are compared as written (no UCUM canonicalisation).
"""

from __future__ import annotations

from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.hashing import hash64
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    IndexRows,
    Pred,
    ValueContext,
    all_of,
    bad_value,
    first_seen,
    split_escaped,
    split_prefix,
    unescape,
    unsupported_modifier,
)
from fhir_server.search.types.number import number_of, parse_number, value_predicate

TABLE = "idx_quantity"
MODIFIERS = ("missing",)
CURRENCY_SYSTEM = "urn:iso:std:iso:4217"


def h_sys_code(identity: int, system: str | None, code: str | None) -> int:
    """Hash of (param, system, code)."""
    return hash64(str(identity), "sc", system or "", code or "")


def h_code(identity: int, code: str | None) -> int:
    """Hash of (param, code)."""
    return hash64(str(identity), "c", code or "")


def quantity_of(value: Any) -> tuple[float, str | None, str | None] | None:
    """``(value, system, code-or-unit)`` of a Quantity-like node."""
    if not isinstance(value, dict):
        return None
    number = number_of(value.get("value"))
    if number is None:
        return None
    if "currency" in value:
        return number, CURRENCY_SYSTEM, value["currency"]
    return number, value.get("system"), value.get("code") or value.get("unit")


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a quantity parameter."""
    rows: IndexRows = []
    seen: set[tuple[float, str | None, str | None]] = set()
    for node in nodes:
        found = quantity_of(node.value)
        if found is None or not first_seen(seen, found):
            continue
        number, system, code = found
        rows.append(
            (
                TABLE,
                {
                    "hash_identity": identity,
                    "grp": grp,
                    "value": number,
                    "system": system,
                    "code": code,
                    "hash_sys_code": h_sys_code(identity, system, code),
                    "hash_code": h_code(identity, code),
                },
            )
        )
    return rows


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one quantity value such as ``gt5.4|http://unitsofmeasure.org|mg``."""
    if modifier is not None:
        raise unsupported_modifier(param.code, modifier)
    parts = split_escaped(value, "|")
    if len(parts) not in (1, 3):
        raise bad_value(param.code, value, "expected [prefix]number[|system|code]")
    prefix, text = split_prefix(parts[0])
    try:
        number, low, high = parse_number(text)
    except ValueError:
        raise bad_value(param.code, value, "expected [prefix]number[|system|code]") from None
    compare = value_predicate(prefix, number, low, high)
    if len(parts) == 3:
        system, code = unescape(parts[1]), unescape(parts[2])
        if system and code:
            return all_of(Cmp("hash_sys_code", "=", h_sys_code(identity, system, code)), compare)
        if code:
            return all_of(Cmp("hash_code", "=", h_code(identity, code)), compare)
        if system:
            return all_of(Cmp("hash_identity", "=", identity), Cmp("system", "=", system), compare)
    return all_of(Cmp("hash_identity", "=", identity), compare)


SORT_COLUMN = "value"
