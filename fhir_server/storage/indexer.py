"""Write resources' search index rows in the writer's transaction (http://hl7.org/fhir/R4/search.html).

Rows are extracted by :func:`fhir_server.search.extract.extract_rows` and replace the previous
rows of the resource (``pid``). A first version (``meta.versionId == "1"``, a fresh pid) has no
previous rows, so nothing is deleted. On PostgreSQL a write's rows go in the same statement as
its resource row (:func:`rows_after`), and those of all the resources a transaction Bundle wrote
in one statement (:func:`_write_postgres`); an update deletes and re-inserts them. On SQLite an
update reads the stored rows of each table and writes only the differences. ``resource=None``
(delete) drops all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, Table, delete, insert, select

from fhir_server.search.extract import RowsByTable, extract_rows
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.index_schema import INDEX_TABLES

_VALUE_COLUMNS: dict[str, tuple[str, ...]] = {
    t.name: tuple(c.name for c in t.columns if c.name != "pid") for t in INDEX_TABLES
}


@dataclass(frozen=True)
class IndexWrite:
    """The index rows of one written resource, to be stored (``rows`` as extracted)."""

    pid: int
    rows: RowsByTable
    fresh: bool  # a first version: there are no previous rows to delete


def index_rows(registry: SearchRegistry, resource: dict[str, Any]) -> RowsByTable:
    """The index rows of a resource about to be written."""
    return extract_rows(registry, resource)


def index_write(registry: SearchRegistry, pid: int, resource: dict[str, Any]) -> IndexWrite:
    """Extract the rows of ``resource`` (stored under ``pid``), ready for :func:`write_rows`."""
    fresh = str((resource.get("meta") or {}).get("versionId")) == "1"
    return IndexWrite(pid, index_rows(registry, resource), fresh)


def rows_after(source: str, rows: RowsByTable | None) -> tuple[list[str], list[Any]]:
    """PostgreSQL: the index writes of one resource as bodies of data-modifying CTEs, to chain
    after the CTE ``source`` that wrote its resource row and returns its ``pid``: the row and
    its index in one statement (one round trip). ``written`` (a first version): its rows are
    inserted; ``moved`` (a later version): the previous rows are deleted first, and ``rows``
    ``None`` (a deletion) inserts none. Nothing happens when ``source`` returns no row."""
    parts: list[str] = []
    params: list[Any] = []
    for table in INDEX_TABLES:
        if source == "moved":
            parts.append(_DELETE_AFTER_MOVED_SQL[table.name])
        new = rows.get(table.name) if rows else None
        if new:
            parts.append(_INSERT_AFTER_SQL[source, table.name])
            params.append(orjson.dumps(new).decode())
    return parts, params


def write_index(
    conn: Connection,
    registry: SearchRegistry,
    pid: int,
    res_type: str | None,
    resource: dict[str, Any] | None,
) -> None:
    """Replace the index rows of ``pid`` by those of ``resource`` (``None``: drop all)."""
    if resource is None:
        for table in INDEX_TABLES:
            conn.execute(delete(table).where(table.c.pid == pid))
        return
    write_rows(conn, [index_write(registry, pid, resource)])


def write_rows(conn: Connection, writes: Sequence[IndexWrite]) -> None:
    """Store the rows of several resources, each replacing its previous rows.

    On PostgreSQL one statement whatever their number; on SQLite the rows of first versions
    go in as one ``executemany`` per table, and each other resource's rows are diffed against
    the stored ones.
    """
    if not writes:
        return
    if conn.dialect.name == "postgresql":
        _write_postgres(conn, writes)
        return
    for table in INDEX_TABLES:
        fresh_rows = [
            {"pid": w.pid, **row} for w in writes if w.fresh for row in w.rows.get(table.name, ())
        ]
        if fresh_rows:
            conn.execute(insert(table), fresh_rows)
        for w in writes:
            if not w.fresh:
                _replace(conn, table, w.pid, w.rows.get(table.name, []))


def _insert_sql(table: str, pid: str, rows_from: str) -> str:
    """``INSERT`` into index ``table`` of the rows ``rows_from`` gives (as ``r``), with ``pid``."""
    columns = _VALUE_COLUMNS[table]
    return (
        f"INSERT INTO {table} (pid, {', '.join(columns)}) "
        f"SELECT {pid}, {', '.join('r.' + c for c in columns)} FROM {rows_from}"
    )


# Several resources: a JSON array of [pid, rows] pairs, each pair's rows expanded beside it.
_INSERT_MANY_SQL = {
    t.name: _insert_sql(
        t.name,
        "(e->>0)::bigint",
        "json_array_elements(%s::json) AS e "
        f"CROSS JOIN LATERAL json_populate_recordset(NULL::{t.name}, e->1) AS r",
    )
    for t in INDEX_TABLES
}
_DELETE_MANY_SQL = {t.name: f"DELETE FROM {t.name} WHERE pid = ANY(%s)" for t in INDEX_TABLES}
# After the CTE that wrote the resource row (see rows_after).
_INSERT_AFTER_SQL = {
    (source, t.name): _insert_sql(
        t.name,
        "w.pid",
        f"{source} AS w CROSS JOIN json_populate_recordset(NULL::{t.name}, %s) AS r",
    )
    for t in INDEX_TABLES
    for source in ("written", "moved")
}
_DELETE_AFTER_MOVED_SQL = {
    t.name: f"DELETE FROM {t.name} AS t USING moved AS m WHERE t.pid = m.pid" for t in INDEX_TABLES
}


def _write_postgres(conn: Connection, writes: Sequence[IndexWrite]) -> None:
    """PostgreSQL: every DELETE and INSERT of the resources' rows in one statement (one round
    trip; a transaction Bundle's entries are written together).

    The statements are chained as data-modifying CTEs, which all see the same snapshot: each
    DELETE removes only the previous rows, never the ones inserted beside them. Each table's
    rows go in as one JSON array of ``[pid, rows]`` pairs (``json_populate_recordset`` maps the
    rows' keys to the columns by name), serialized by orjson: binding a dozen typed arrays
    through psycopg cost more CPU than PostgreSQL spends inserting the rows.
    """
    parts: list[str] = []
    params: list[Any] = []
    replaced = [w.pid for w in writes if not w.fresh]
    for table in INDEX_TABLES:
        if replaced:
            parts.append(_DELETE_MANY_SQL[table.name])
            params.append(replaced)
        pairs = [(w.pid, new) for w in writes if (new := w.rows.get(table.name))]
        if pairs:
            parts.append(_INSERT_MANY_SQL[table.name])
            params.append(orjson.dumps(pairs).decode())
    _run_chained(conn, parts, params)


def _run_chained(conn: Connection, parts: list[str], params: list[Any]) -> None:
    """Run data-modifying statements as one (all but the last as CTEs), on the DB-API cursor."""
    if not parts:
        return
    *ctes, last = parts
    sql = "".join(
        ("WITH " if i == 0 else ", ") + f"w{i} AS ({part})" for i, part in enumerate(ctes)
    )
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.cursor() as cur:
        cur.execute(f"{sql} {last}" if sql else last, params)


def _key(table: Table, row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(map(row.get, _VALUE_COLUMNS[table.name]))


def _replace(conn: Connection, table: Table, pid: int, new: list[dict[str, Any]]) -> None:
    cols = _VALUE_COLUMNS[table.name]
    old = {
        tuple(r): None
        for r in conn.execute(select(*(table.c[c] for c in cols)).where(table.c.pid == pid))
    }
    wanted = {_key(table, row): row for row in new}
    gone = [k for k in old if k not in wanted]
    added = [row for k, row in wanted.items() if k not in old]
    if gone:
        if len(gone) > len(old) // 2 or len(cols) > 6:
            conn.execute(delete(table).where(table.c.pid == pid))
            added = list(wanted.values())
        else:
            for key in gone:
                conn.execute(
                    delete(table).where(
                        table.c.pid == pid,
                        *(
                            table.c[c].is_(None) if v is None else table.c[c] == v
                            for c, v in zip(cols, key, strict=True)
                        ),
                    )
                )
    if added:
        conn.execute(insert(table), [{"pid": pid, **row} for row in added])
