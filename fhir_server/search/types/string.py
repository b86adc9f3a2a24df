"""String search parameters: http://hl7.org/fhir/R4/search.html#string.

Default matching is case- and accent-insensitive *starts with* on the normalized value (an index
range scan on ``(hash_identity, value_norm)``); ``:exact`` is a case-sensitive full match (the
same index: equality on the normalized value, then on ``value_exact``); ``:contains`` matches
anywhere. HumanName and Address index each of their parts, other complex types every string
they contain.
"""

from __future__ import annotations

from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.hashing import normalize
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    Contains,
    IndexRows,
    Pred,
    Prefix,
    ValueContext,
    all_of,
    first_seen,
    unescape,
    unsupported_modifier,
)

TABLE = "idx_string"
MODIFIERS = ("exact", "contains")
_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")
EXACT_LENGTH = 2000


def strings_of(value: Any, typ: str | None = None) -> list[str]:
    """The strings a node contributes to a string index."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        keys: tuple[str, ...] | None = None
        if typ == "HumanName" or (typ is None and ("family" in value or "given" in value)):
            keys = _NAME_PARTS
        elif typ == "Address" or (typ is None and ("city" in value or "line" in value)):
            keys = _ADDRESS_PARTS
        out: list[str] = []
        for key, item in value.items():
            if keys is not None and key not in keys:
                continue
            if key in ("extension", "modifierExtension", "id", "url", "system", "use", "type"):
                continue
            out.extend(strings_of(item))
        return out
    if isinstance(value, list):
        return [s for item in value for s in strings_of(item)]
    return []


def string_row(identity: int, text: str, grp: int = 0) -> dict[str, Any]:
    """One idx_string row."""
    exact = text[:EXACT_LENGTH]
    return {
        "hash_identity": identity,
        "grp": grp,
        "value_norm": normalize(text),
        "value_exact": exact,
    }


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a string parameter."""
    rows: IndexRows = []
    seen: set[str] = set()
    for node in nodes:
        for text in strings_of(node.value, node.type):
            if text and first_seen(seen, text):
                rows.append((TABLE, string_row(identity, text, grp)))
    return rows


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one string search value."""
    text = unescape(value)
    base = Cmp("hash_identity", "=", identity)
    if modifier == "exact":
        exact = text[:EXACT_LENGTH]
        # A stored value equal to ``exact`` has this normalized form (only a value over
        # EXACT_LENGTH characters whose first 200 normalized ones lie past that many
        # characters, i.e. almost all whitespace, could differ and go unmatched).
        return all_of(
            base, Cmp("value_norm", "=", normalize(exact)), Cmp("value_exact", "=", exact)
        )
    if modifier == "contains":
        return all_of(base, Contains("value_norm", normalize(text)))
    if modifier is None:
        return all_of(base, Prefix("value_norm", normalize(text)))
    raise unsupported_modifier(param.code, modifier)


SORT_COLUMN = "value_norm"
