"""Reference search parameters: http://hl7.org/fhir/R4/search.html#reference.

A literal reference ``Type/id`` is stored as (target_type, target_id); absolute URLs, URNs and
canonical URLs (version stripped) as ``target_url`` with a hash; a logical reference
(``Reference.identifier``) as a token row under ``<code>:identifier`` so that
``subject:identifier=system|value`` is a token lookup. Search values: ``id``, ``Type/id``,
an absolute URL (one under this server's base is treated as local), ``:Type`` restricts the
target type. Chaining and ``_has`` are compiled in :mod:`fhir_server.search.compile` as joins
over this table.
"""

from __future__ import annotations

from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.hashing import hash64
from fhir_server.search.registry import SearchParam
from fhir_server.search.types import token
from fhir_server.search.types.base import (
    Cmp,
    IndexRows,
    Pred,
    ValueContext,
    all_of,
    bad_value,
    first_seen,
    unescape,
)

TABLE = "idx_reference"
MODIFIERS = ("identifier", "missing")
IDENTIFIER = ":identifier"


def identifier_identity(identity: int) -> int:
    """hash_identity of the token rows holding logical references."""
    return hash64(str(identity), IDENTIFIER)


def h_url(identity: int, url: str) -> int:
    """Hash of (param, absolute or canonical URL)."""
    return hash64(str(identity), "url", url)


def parse_reference(ref: str) -> tuple[str | None, str | None, str | None]:
    """``(type, id, url)`` of a reference string (``#contained`` gives all ``None``)."""
    if not ref or ref.startswith("#"):
        return None, None, None
    if "://" in ref or ref.startswith("urn:"):
        return None, None, ref.split("|", 1)[0]
    ref = ref.split("/_history/", 1)[0]
    parts = ref.split("/")
    if len(parts) == 2 and parts[0][:1].isupper() and parts[1]:
        return parts[0], parts[1], None
    return None, None, ref.split("|", 1)[0]


def _row(
    identity: int, typ: str | None, rid: str | None, url: str | None, grp: int
) -> dict[str, Any]:
    return {
        "hash_identity": identity,
        "grp": grp,
        "target_type": typ,
        "target_id": rid,
        "target_url": url,
        "hash_url": h_url(identity, url) if url else None,
    }


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a reference parameter (plus token rows for logical references)."""
    rows: IndexRows = []
    seen: set[tuple[Any, ...]] = set()
    for node in nodes:
        value = node.value
        ref: str | None = None
        if isinstance(value, str):
            ref = value
        elif isinstance(value, dict):
            ref = value.get("reference") if isinstance(value.get("reference"), str) else None
            ident = value.get("identifier")
            if (
                isinstance(ident, dict)
                and ident.get("value")
                and first_seen(seen, ("identifier", ident.get("system"), ident["value"]))
            ):
                rows.append(
                    (
                        token.TABLE,
                        token.token_row(
                            identifier_identity(identity),
                            ident.get("system"),
                            ident["value"],
                            None,
                            grp,
                        ),
                    )
                )
        if ref:
            typ, rid, url = parse_reference(ref)
            if (typ or url) and first_seen(seen, (typ, rid, url)):
                rows.append((TABLE, _row(identity, typ, rid, url, grp)))
    return rows


def local_form(value: str, base_url: str | None) -> str:
    """Strip this server's base from an absolute reference to it."""
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        return value[len(base_url.rstrip("/")) + 1 :]
    return value


def table_for(modifier: str | None) -> str:
    """The index table a value with ``modifier`` is matched against."""
    return token.TABLE if modifier == "identifier" else TABLE


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one reference value; ``modifier`` may be ``identifier`` or a type."""
    if modifier == "identifier":
        return token.predicate(param, identifier_identity(identity), None, value, vc)
    text = local_form(unescape(value), vc.base_url)
    if not text:
        raise bad_value(param.code, value, "empty reference")
    typ, rid, url = parse_reference(text)
    if url is not None and "/" not in text and "://" not in text and not text.startswith("urn:"):
        typ, rid, url = None, text, None  # a bare id
    if url is not None:
        return Cmp("hash_url", "=", h_url(identity, url))
    if modifier is not None:
        if typ is not None and typ != modifier:
            raise bad_value(param.code, value, f"type {typ} conflicts with :{modifier}")
        typ = modifier
    if typ is not None and param.target and typ not in param.target:
        raise bad_value(param.code, value, f"{typ} is not a target of this parameter")
    return all_of(
        Cmp("hash_identity", "=", identity),
        Cmp("target_id", "=", rid),
        Cmp("target_type", "=", typ) if typ else all_of(),
    )


SORT_COLUMN = "target_id"
