"""Storage and search of AuditEvents in their own table (:mod:`fhir_server.storage.audit_schema`).

The FHIR API serves them read-only (create allowed for admin and system clients feeding their
own events) with the search parameters an auditor uses (IHE BALP): ``date``, ``patient``,
``agent``, ``altid``, ``entity``, ``type``, ``subtype``, ``action``, ``outcome``, ``address``,
``_id``, plus ``_count``, ``_total``, ``_sort=(-)date`` and keyset paging. Newest first.

Every event is stored whatever its values: a searchable column's value that does not fit the
column (a 300-character ``X-Forwarded-For``, a search for ``patient=<300 characters>``) is cut
to its first characters, ``…`` and a digest of the whole value (:func:`fit`), and a search value
goes through the same function, so a search for the whole value finds it; the JSON keeps the
value whole. PostgreSQL text cannot hold NUL, so NUL becomes U+FFFD in the columns.
"""

from __future__ import annotations

import hashlib
import json
import types
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import Connection, String, func, insert, or_, select
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.search.types.base import split_escaped, split_prefix, to_sql
from fhir_server.search.types.date import date_range, now_ms, range_predicate
from fhir_server.storage.audit_schema import audit_event

SEARCH_PARAMS = {
    "_id": "id",
    "date": "recorded_ms",
    "patient": "patient",
    "agent": "agent",
    "altid": "altid",
    "entity": "entity",
    "type": "type_code",
    "subtype": "subtype",
    "action": "action",
    "outcome": "outcome",
    "address": "address",
}
RESULT_PARAMS = frozenset({"_count", "_cursor", "_total", "_sort", "_format", "_pretty"})
# The string columns and their sizes: what :func:`fit` cuts values to.
_LENGTHS = {
    c.name: c.type.length
    for c in audit_event.columns
    if isinstance(c.type, String) and c.type.length
}
# The columns of a row that only serve searching (emptied by :func:`bare_row`).
SEARCH_COLUMNS = tuple(
    c.name for c in audit_event.columns if c.name not in ("seq", "id", "recorded_ms", "content")
)
_MARK = "…"
_DIGEST = 12  # hex digits of the SHA-256 of a cut value


def fit(value: str | None, length: int) -> str | None:
    """``value`` as it is stored in (and searched for in) a column of ``length`` characters:
    unchanged when it fits, else its first characters, ``…`` and 12 hex digits of its SHA-256
    (two long values sharing a prefix stay apart). NUL becomes U+FFFD."""
    if value is None:
        return None
    text = value.replace("\x00", "\ufffd")
    if len(text) <= length:
        return text
    if length <= len(_MARK) + _DIGEST:  # a code column (action, outcome): no room for a digest
        return text[:length]
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST]
    return text[: length - len(_MARK) - _DIGEST] + _MARK + digest


def _fitted(name: str, value: Any) -> Any:
    length = _LENGTHS.get(name)
    return fit(value, length) if length and isinstance(value, str) else value


def _ms(instant: str) -> int:
    return date_range(instant)[0]


def columns_of(event: dict[str, Any]) -> dict[str, Any]:
    """The searchable columns of one AuditEvent."""
    requestor = next((a for a in event.get("agent", ()) if a.get("requestor")), {})
    app = next((a for a in event.get("agent", ()) if not a.get("requestor")), {})
    who = requestor.get("who") or {}
    patient = None
    entity = None
    for item in event.get("entity", ()):
        ref = ((item.get("what") or {}).get("reference") or "").split("/_history/")[0]
        if not ref:
            continue
        if ref.startswith("Patient/") and patient is None:
            patient = ref.split("/", 1)[1]
        if entity is None:
            entity = ref
    return {
        "recorded_ms": _ms(event["recorded"]),
        "type_code": (event.get("type") or {}).get("code"),
        "subtype": next((c.get("code") for c in event.get("subtype", ())), None),
        "action": event.get("action"),
        "outcome": event.get("outcome"),
        "agent": who.get("reference"),
        "altid": requestor.get("altId") or (who.get("identifier") or {}).get("value"),
        "client": ((app.get("who") or {}).get("identifier") or {}).get("value"),
        "address": (requestor.get("network") or {}).get("address"),
        "patient": patient,
        "entity": entity,
    }


def _stored_body(event: dict[str, Any]) -> dict[str, Any]:
    body = dict(event)
    given = body.get("id")
    if not (isinstance(given, str) and given and fit(given, _LENGTHS["id"]) == given):
        body["id"] = str(uuid.uuid4())  # none given, or not one the id column can hold
    body["meta"] = {**(body.get("meta") or {}), "versionId": "1"}
    body["meta"]["lastUpdated"] = body.get("recorded")
    return body


def prepare(event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An AuditEvent as it will be stored (an id and ``meta`` assigned) and its table row
    (column values cut to fit, see :func:`fit`). Raises when the event is malformed (no
    ``recorded`` instant, a value JSON cannot hold): :func:`bare_prepare` stores it anyway."""
    body = _stored_body(event)
    columns = {name: _fitted(name, value) for name, value in columns_of(body).items()}
    return body, {"id": body["id"], **columns, "content": orjson.dumps(body)}


def bare_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its searchable columns emptied (found by ``_id`` and ``date`` only): the
    last resort for a row the database refused."""
    recorded = row.get("recorded_ms")
    bare = {name: None for name in SEARCH_COLUMNS}
    bare["recorded_ms"] = recorded if isinstance(recorded, int) else now_ms()
    return {**row, **bare}


def renamed(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` bare (:func:`bare_row`) under a new id (also in its JSON): the last resort for
    an event whose id the database refuses (one already stored)."""
    new_id = str(uuid.uuid4())
    try:
        content = orjson.dumps({**orjson.loads(row["content"]), "id": new_id})
    except orjson.JSONDecodeError:
        content = row["content"]
    return bare_row({**row, "id": new_id, "content": content})


def bare_prepare(event: dict[str, Any]) -> dict[str, Any]:
    """The row of an event :func:`prepare` refused: the JSON as it can be written (a value
    JSON cannot hold becomes its text, undecodable characters U+FFFD), its id, its
    ``recorded`` instant if it has one (else now), no searchable columns."""
    body = _stored_body(event)
    try:
        content = orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):
        text = json.dumps(body, default=str, ensure_ascii=False)
        content = text.encode("utf-8", "replace")
    try:
        recorded: int | None = _ms(body["recorded"])
    except (KeyError, TypeError, ValueError):
        recorded = None
    return bare_row({"id": str(body["id"]), "recorded_ms": recorded, "content": content})


def write_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Store rows made by :func:`prepare` in the unit of ``conn``."""
    if rows and conn.dialect.name == "postgresql":
        _copy_rows(conn, rows)
    elif rows:
        conn.execute(insert(audit_event), rows)


def append(conn: Connection, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Store AuditEvents (an id and ``meta`` are assigned); returns them as stored."""
    prepared = [prepare(event) for event in events]
    write_rows(conn, [row for _, row in prepared])
    return [body for body, _ in prepared]


_COPY_COLUMNS = tuple(c.name for c in audit_event.columns if c.name != "seq")
_COPY_SQL = f"COPY audit_event ({', '.join(_COPY_COLUMNS)}) FROM STDIN"


def _copy_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: the batch through COPY on the unit's own connection (same transaction).

    The writer thread stores every request's AuditEvent; COPY costs it a fraction of a
    multi-row INSERT's CPU, which the request threads of the process compete with.
    """
    with conn.connection.driver_connection.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        for row in rows:
            copy.write_row(tuple(row[name] for name in _COPY_COLUMNS))


def get(conn: Connection, event_id: str) -> dict[str, Any] | None:
    """One AuditEvent by id."""
    row = conn.execute(select(audit_event.c.content).where(audit_event.c.id == event_id)).first()
    return orjson.loads(row.content) if row else None


def conditions(params: list[tuple[str, str]]) -> tuple[list[ColumnElement[bool]], list[str]]:
    """SQL conditions of the search parameters, and the names of those that were not used.

    Raises ``ValueError`` naming the parameter when a value is malformed.
    """
    where: list[ColumnElement[bool]] = []
    unknown: list[str] = []
    c = audit_event.c
    for name, value in params:
        base, _, modifier = name.partition(":")
        if base in RESULT_PARAMS:
            continue
        column_name = SEARCH_PARAMS.get(base)
        if column_name is None or (modifier and base != "subtype"):
            unknown.append(name)
            continue
        column = c[column_name]
        values = [v for v in split_escaped(value, ",") if v]
        if base == "date":
            for item in values:
                prefix, text = split_prefix(item)
                try:
                    low, high = date_range(text)
                except ValueError:
                    raise ValueError(f"date: '{item}' is not a FHIR date") from None
                target = types.SimpleNamespace(c={"low": column, "high": column})
                where.append(to_sql(range_predicate(prefix, low, high, now_ms()), target))
            continue
        if base in ("patient",):
            values = [v.split("/", 1)[1] if v.startswith("Patient/") else v for v in values]
        if base in ("subtype", "type"):
            values = [v.split("|", 1)[1] if "|" in v else v for v in values]
        if base == "entity":
            values = [v.split("/_history/")[0] for v in values]
        values = [_fitted(column_name, v) for v in values]  # as stored
        where.append(or_(*(column == v for v in values)) if values else column.is_(None))
    return where, unknown


def search(
    conn: Connection,
    where: list[ColumnElement[bool]],
    *,
    count: int,
    before: int | None,
    ascending: bool,
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """A page of ``(seq, event)`` matching ``where``; and whether more follow."""
    c = audit_event.c
    stmt = select(c.seq, c.content).where(*where)
    if before is not None:
        stmt = stmt.where(c.seq > before if ascending else c.seq < before)
    stmt = stmt.order_by(c.seq.asc() if ascending else c.seq.desc()).limit(count + 1)
    rows = conn.execute(stmt).all()
    return [(r.seq, orjson.loads(r.content)) for r in rows[:count]], len(rows) > count


def total(conn: Connection, where: list[ColumnElement[bool]]) -> int:
    """How many AuditEvents match ``where``."""
    return int(conn.execute(select(func.count()).select_from(audit_event).where(*where)).scalar())
