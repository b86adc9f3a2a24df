"""Token search parameters: http://hl7.org/fhir/R4/search.html#token.

Codings, CodeableConcepts, Identifiers, ContactPoints, booleans and codes are stored as
``(system, code)`` rows with three hashes computed at write time: (param, system, code),
(param, code) and (param, system), each leading its own index, so ``system|code``, ``code``,
``|code`` (no system) and ``system|`` are each one index lookup. ``:text`` searches the
normalized display / CodeableConcept.text, ``:of-type`` (Identifier) uses extra rows under
``<code>:of-type`` holding ``type-system|type-code|value``; ``:in`` / ``:not-in`` expand the
ValueSet through the caller's expander; ``:above`` / ``:below`` use the code system's concept
hierarchy (CodeSystems stored on the server or shipped with R4); ``:not`` is compiled by the
caller as NOT IN.
"""

from __future__ import annotations

from typing import Any

from fhir_server.search.fhirpath import Node
from fhir_server.search.hashing import hash64, normalize
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import (
    Cmp,
    Const,
    Contains,
    In,
    IndexRows,
    Pred,
    ValueContext,
    all_of,
    any_of,
    bad_value,
    first_seen,
    split_escaped,
    unescape,
    unsupported_modifier,
)

TABLE = "idx_token"
MODIFIERS = ("text", "not", "in", "not-in", "of-type", "missing", "above", "below")
OF_TYPE = ":of-type"
_CONTACT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}


def h_sys_value(identity: int, system: str | None, code: str | None) -> int:
    """Hash of (param, system, code); a missing system hashes as ''."""
    return hash64(str(identity), "sv", system or "", code or "")


def h_value(identity: int, code: str | None) -> int:
    """Hash of (param, code)."""
    return hash64(str(identity), "v", code or "")


def h_sys(identity: int, system: str | None) -> int:
    """Hash of (param, system)."""
    return hash64(str(identity), "s", system or "")


def token_row(
    identity: int, system: str | None, code: str | None, text: str | None = None, grp: int = 0
) -> dict[str, Any]:
    """One idx_token row."""
    return {
        "hash_identity": identity,
        "grp": grp,
        "system": system,
        "code": code,
        "text_norm": normalize(text) if text else None,
        "hash_sys_value": h_sys_value(identity, system, code),
        "hash_value": h_value(identity, code),
        "hash_sys": h_sys(identity, system),
    }


def tokens_of(value: Any, typ: str | None) -> list[tuple[str | None, str | None, str | None]]:
    """``(system, code, text)`` triples a node contributes."""
    if isinstance(value, bool):
        return [(None, "true" if value else "false", None)]
    if isinstance(value, (str, int, float)):
        return [(None, str(value), None)]
    if not isinstance(value, dict):
        return []
    if typ == "CodeableConcept" or (typ is None and ("coding" in value or set(value) == {"text"})):
        text = value.get("text")
        out = [
            (c.get("system"), c.get("code"), " ".join(filter(None, (text, c.get("display")))))
            for c in value.get("coding", ())
            if isinstance(c, dict)
        ]
        if not out and text:
            out.append((None, None, text))
        return out
    if typ == "Identifier" or (typ is None and "value" in value and "code" not in value):
        if typ != "Identifier" and value.get("system") in _CONTACT_SYSTEMS:
            return [(value.get("system"), value.get("value"), None)]
        type_text = (value.get("type") or {}).get("text")
        return [(value.get("system"), value.get("value"), type_text)]
    if typ == "ContactPoint":
        return [(value.get("system"), value.get("value"), None)]
    if "code" in value or "system" in value:  # Coding, Quantity, …
        return [(value.get("system"), value.get("code"), value.get("display"))]
    return []


def extract(param: SearchParam, identity: int, nodes: list[Node], grp: int = 0) -> IndexRows:
    """Index rows of a token parameter (plus ``:of-type`` rows for Identifiers)."""
    rows: IndexRows = []
    seen: set[tuple[Any, ...] | str] = set()
    of_type_identity: int | None = None
    for node in nodes:
        for system, code, text in tokens_of(node.value, node.type):
            if not first_seen(seen, (system, code, text)):
                continue
            rows.append((TABLE, token_row(identity, system, code, text, grp)))
        value = node.value
        if isinstance(value, dict) and node.type == "Identifier" and value.get("type"):
            if of_type_identity is None:
                of_type_identity = hash64(str(identity), OF_TYPE)
            for coding in value["type"].get("coding", ()):
                composed = (
                    f"{coding.get('system', '')}|{coding.get('code', '')}|{value.get('value', '')}"
                )
                if not first_seen(seen, composed):  # (a plain key is a 3-tuple: no clash)
                    continue
                rows.append((TABLE, token_row(of_type_identity, None, composed, None, grp)))
    return rows


def parse(value: str) -> tuple[str | None, str | None, bool]:
    """``system|code`` -> (system, code, has_bar); ``''`` system means "no system"."""
    parts = split_escaped(value, "|")
    if len(parts) == 1:
        return None, unescape(parts[0]), False
    if len(parts) == 2:
        return unescape(parts[0]), unescape(parts[1]), True
    raise ValueError("too many '|'")


def predicate(
    param: SearchParam, identity: int, modifier: str | None, value: str, vc: ValueContext
) -> Pred:
    """Row predicate for one token value (``:not`` is handled by the caller: NOT of this)."""
    if modifier in (None, "not"):
        try:
            system, code, has_bar = parse(value)
        except ValueError as exc:
            raise bad_value(param.code, value, str(exc)) from None
        if not has_bar:
            return Cmp("hash_value", "=", h_value(identity, code))
        if code:
            return Cmp("hash_sys_value", "=", h_sys_value(identity, system, code))
        if system:
            return all_of(
                Cmp("hash_identity", "=", identity), Cmp("hash_sys", "=", h_sys(identity, system))
            )
        raise bad_value(param.code, value, "empty system and code")
    if modifier == "text":
        return all_of(
            Cmp("hash_identity", "=", identity),
            Contains("text_norm", normalize(unescape(value)), True),
        )
    if modifier == "of-type":
        parts = split_escaped(value, "|")
        if len(parts) != 3:
            raise bad_value(param.code, value, "expected system|code|value")
        composed = "|".join(unescape(p) for p in parts)
        return Cmp("hash_value", "=", h_value(hash64(str(identity), OF_TYPE), composed))
    if modifier in ("in", "not-in"):
        codes = vc.expand_valueset(unescape(value)) if vc.expand_valueset else None
        if codes is None:
            raise bad_value(param.code, value, "unknown ValueSet (not stored on this server)")
        exact = tuple(h_sys_value(identity, s, c) for s, c in codes if c)
        systems = tuple(h_sys(identity, s) for s, c in codes if not c and s)
        return any_of(
            In("hash_sys_value", exact) if exact else Const(False),
            all_of(Cmp("hash_identity", "=", identity), In("hash_sys", systems))
            if systems
            else Const(False),
        )
    if modifier in ("above", "below"):
        try:
            system, code, has_bar = parse(value)
        except ValueError as exc:
            raise bad_value(param.code, value, str(exc)) from None
        if not (has_bar and system and code):
            raise bad_value(param.code, value, f":{modifier} needs system|code")
        found = vc.subsumption(system, code, modifier == "below") if vc.subsumption else None
        if found is None:
            raise bad_value(param.code, value, "no hierarchy known for this code system")
        return In("hash_sys_value", tuple(h_sys_value(identity, system, c) for c in found))
    raise unsupported_modifier(param.code, modifier)


SORT_COLUMN = "code"
