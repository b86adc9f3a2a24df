"""URI search parameters: http://hl7.org/fhir/R4/search.html#uri.

Exact match by default (on a hash), ``:below`` = the stored URI starts with the value,
``:above`` = the stored URI is the value or one of its ``/``-separated ancestors,
``:contains`` = substring (a common extension).
"""

from __future__ import annotations

from fhir_server.search.fhirpath import Node
from fhir_server.search.hashing import hash64
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    Contains,
    In,
    IndexRows,
    Pred,
    Prefix,
    ValueContext,
    all_of,
    first_seen,
    unescape,
    unsupported_modifier,
)

TABLE = "idx_uri"
MODIFIERS = ("below", "above", "contains", "missing")


def h_uri(identity: int, uri: str) -> int:
    """Hash of (param, uri)."""
    return hash64(str(identity), "u", uri)


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a uri parameter."""
    rows: IndexRows = []
    seen: set[str] = set()
    for node in nodes:
        if isinstance(node.value, str) and node.value and first_seen(seen, node.value):
            rows.append(
                (
                    TABLE,
                    {
                        "hash_identity": identity,
                        "grp": grp,
                        "uri": node.value,
                        "hash_uri": h_uri(identity, node.value),
                    },
                )
            )
    return rows


def ancestors(uri: str) -> list[str]:
    """``http://a/b/c`` -> the URI and each parent path below the authority."""
    out = [uri]
    scheme = uri.find("//")
    floor = uri.find("/", scheme + 2) if scheme >= 0 else 0
    current = uri
    while True:
        cut = current.rfind("/")
        if cut <= floor:
            return out
        current = current[:cut]
        out.append(current)


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one uri value."""
    uri = unescape(value)
    if modifier is None:
        return Cmp("hash_uri", "=", h_uri(identity, uri))
    if modifier == "below":
        return all_of(Cmp("hash_identity", "=", identity), Prefix("uri", uri))
    if modifier == "above":
        return In("hash_uri", tuple(h_uri(identity, u) for u in ancestors(uri)))
    if modifier == "contains":
        return all_of(Cmp("hash_identity", "=", identity), Contains("uri", uri))
    raise unsupported_modifier(param.code, modifier)


SORT_COLUMN = "uri"
