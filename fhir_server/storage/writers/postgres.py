"""PostgreSQL: single writes in one statement, held-back writes as arrays.

A single create, update or delete stores its resource row, its history row and its search index
rows in one statement: the CTE writing the resource row (``written`` / ``moved``), the history
row after it, and the index writes chained after that (:func:`fhir_server.storage.indexer.
rows_after`), so a create-on-update that finds its id taken writes nothing and a deletion
drops the rows. A transaction Bundle's versions (:meth:`Tx.batched_writes`) are stored from
one array per column: one statement for its first versions, one for its later ones.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.extract import RowsByTable
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage import indexer
from fhir_server.storage.records import StoredResource
from fhir_server.storage.writers.base import ConcurrentCreate


class PostgresWriter:
    """:class:`~fhir_server.storage.writers.ResourceWriter` of PostgreSQL."""

    chains_index = True
    holds_versions = True

    def __init__(self, registry: SearchRegistry) -> None:
        self.registry = registry

    def insert_first(
        self, conn: Connection, values: dict[str, Any], method: str, body: dict[str, Any]
    ) -> int | None:
        """Insert version 1, its history row and its index rows in one statement.

        A concurrent create-on-update of the same id must not fail with a 500: whoever loses
        the race sees no row returned and the caller retries as an update.
        """
        rows = indexer.index_rows(self.registry, body)
        params = [values[c] for c in ("res_type", "res_id", "last_updated", "content")]
        return _write_with_index(
            conn, _INSERT_FIRST[method == "PUT"], "written", [*params, method], rows
        )

    def move(
        self,
        conn: Connection,
        current: StoredResource,
        values: dict[str, Any],
        method: str,
        body: dict[str, Any] | None,
    ) -> bool:
        """Move the row, record the history row and replace the index rows, one statement."""
        rows = None if body is None else indexer.index_rows(self.registry, body)
        params = [
            values["version"],
            values["last_updated"],
            values["deleted"],
            values["content"],
            current.pid,
            current.version,
        ]
        return _write_with_index(conn, _MOVE_ONE, "moved", [*params, method], rows) is not None

    def draw_pids(self, conn: Connection, count: int) -> list[int]:
        """``count`` pids from the resource sequence, one round trip."""
        return [pid for (pid,) in conn.exec_driver_sql(_DRAW_PIDS, (count,))]

    def insert_versions(self, conn: Connection, versions: list[dict[str, Any]]) -> None:
        """Insert held-back first versions and their history rows in one statement; a unit
        that finds one of its new ids taken is run again (:class:`ConcurrentCreate`)."""
        columns = ("pid", "res_type", "res_id", "last_updated", "content", "h_method")
        arrays = tuple([v[c] for v in versions] for c in columns)
        if conn.exec_driver_sql(_INSERT_VERSIONS, arrays).rowcount != len(versions):
            raise ConcurrentCreate("a resource of this unit was created meanwhile by another")

    def move_versions(self, conn: Connection, moves: list[dict[str, Any]]) -> None:
        """Move the resources with held-back later versions in one statement."""
        columns = ("b_pid", "b_version", "version", "last_updated", "deleted", "content")
        arrays = tuple([m[c] for m in moves] for c in (*columns, "h_method"))
        if conn.exec_driver_sql(_MOVE_VERSIONS, arrays).rowcount != len(moves):
            raise FhirError(
                409,
                "conflict",
                "A resource of this transaction was changed by another request; retry",
                code="MSO-REST-409",
            )


def _write_with_index(
    conn: Connection, write: str, source: str, params: list[Any], rows: RowsByTable | None
) -> int | None:
    """Run ``write`` (the CTE ``source`` writing a resource row, and its history row) with the
    index writes chained after it, on the DB-API cursor; the pid written, or ``None``."""
    parts, index_params = indexer.rows_after(source, rows)
    sql = write + "".join(f", i{i} AS ({part})" for i, part in enumerate(parts))
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.cursor() as cursor:
        cursor.execute(f"{sql} SELECT pid FROM {source}", [*params, *index_params])
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def _insert_first(unless_exists: bool) -> str:
    """The start of the statement inserting a first version (``ON CONFLICT DO NOTHING`` if
    ``unless_exists``) as the CTE ``written`` and its history row; the index rows are chained
    after it (``indexer.rows_after``)."""
    return (
        "WITH written AS (INSERT INTO resource (res_type, res_id, version, last_updated, deleted,"
        " content) VALUES (%s, %s, 1, %s, false, %s)"
        + (" ON CONFLICT DO NOTHING" if unless_exists else "")
        + " RETURNING pid, res_type, res_id, last_updated, content),"
        " history AS (INSERT INTO resource_history (pid, version, res_type, res_id, last_updated,"
        " deleted, content, method) SELECT pid, 1, res_type, res_id, last_updated, false,"
        " content, %s FROM written)"
    )


_INSERT_FIRST = {unless: _insert_first(unless) for unless in (False, True)}
# A later version (or a deletion) moves the row from the version it was read at, as the CTE
# ``moved``, and records the history row; the index writes are chained after it.
_MOVE_ONE = (
    "WITH moved AS (UPDATE resource SET version = %s, last_updated = %s, deleted = %s,"
    " content = %s WHERE pid = %s AND version = %s"
    " RETURNING pid, res_type, res_id, version, last_updated, deleted, content),"
    " history AS (INSERT INTO resource_history (pid, version, res_type, res_id, last_updated,"
    " deleted, content, method) SELECT pid, version, res_type, res_id, last_updated, deleted,"
    " content, %s FROM moved)"
)
_DRAW_PIDS = "SELECT nextval(pg_get_serial_sequence('resource', 'pid')) FROM generate_series(1, %s)"
# First versions held back by a transaction, as one array per column: an id taken meanwhile
# inserts nothing (ON CONFLICT), which the row count tells.
_INSERT_VERSIONS = (
    "WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[],"
    " %s::bytea[], %s::text[]) AS v(pid, res_type, res_id, last_updated, content, method)),"
    " written AS (INSERT INTO resource (pid, res_type, res_id, version, last_updated, deleted,"
    " content) SELECT pid, res_type, res_id, 1, last_updated, false, content FROM v"
    " ON CONFLICT DO NOTHING RETURNING pid)"
    " INSERT INTO resource_history (pid, version, res_type, res_id, last_updated, deleted,"
    " content, method) SELECT v.pid, 1, v.res_type, v.res_id, v.last_updated, false, v.content,"
    " v.method FROM v JOIN written USING (pid)"
)
# New versions of existing resources held back, likewise: each moves only from the version it
# was read at (the row count tells if one did not).
_MOVE_VERSIONS = (
    "WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::timestamptz[],"
    " %s::bool[], %s::bytea[], %s::text[]) AS v(pid, b_version, version, last_updated, deleted,"
    " content, method)),"
    " moved AS (UPDATE resource AS r SET version = v.version, last_updated = v.last_updated,"
    " deleted = v.deleted, content = v.content FROM v"
    " WHERE r.pid = v.pid AND r.version = v.b_version RETURNING r.pid, r.res_type, r.res_id)"
    " INSERT INTO resource_history (pid, version, res_type, res_id, last_updated, deleted,"
    " content, method) SELECT v.pid, v.version, m.res_type, m.res_id, v.last_updated,"
    " v.deleted, v.content, v.method FROM v JOIN moved AS m USING (pid)"
)
