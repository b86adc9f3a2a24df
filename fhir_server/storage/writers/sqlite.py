"""SQLite: a resource row and its history row, one statement each.

SQLite write transactions are serialized by the database lock, and its statements are cheap
(no round trip): the index rows are written after the resource row by
:mod:`fhir_server.storage.indexer`, and nothing is held back by a transaction Bundle but
those (see :meth:`Tx.batched_writes`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, insert, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from fhir_server.storage.records import StoredResource
from fhir_server.storage.resource_schema import resource, resource_history

_VERSION_COLUMNS = ("res_type", "res_id", "version", "last_updated", "deleted", "content")


class SqliteWriter:
    """:class:`~fhir_server.storage.writers.ResourceWriter` of SQLite."""

    chains_index = False
    holds_versions = False

    def insert_first(
        self, conn: Connection, values: dict[str, Any], method: str, body: dict[str, Any]
    ) -> int | None:
        """Insert version 1 and its history row; ``None`` when a create-on-update (PUT) finds
        the id taken."""
        statement = _INSERT_UNLESS_EXISTS if method == "PUT" else _INSERT_RESOURCE
        row = conn.execute(statement, values).first()
        if row is None:
            return None
        _insert_history(conn, {**values, "pid": row.pid}, method)
        return int(row.pid)

    def move(
        self,
        conn: Connection,
        current: StoredResource,
        values: dict[str, Any],
        method: str,
        body: dict[str, Any] | None,
    ) -> bool:
        """Move the row from the version it was read at, then record the history row."""
        if conn.execute(_BUMP_RESOURCE, values).rowcount != 1:
            return False
        row = {"pid": current.pid, "res_type": current.res_type, "res_id": current.res_id}
        _insert_history(conn, {**values, **row}, method)
        return True

    def draw_pids(self, conn: Connection, count: int) -> list[int]:
        """Not used: SQLite holds no resource rows back."""
        raise NotImplementedError

    def insert_versions(self, conn: Connection, versions: list[dict[str, Any]]) -> None:
        """Not used: SQLite holds no resource rows back."""
        raise NotImplementedError

    def move_versions(self, conn: Connection, moves: list[dict[str, Any]]) -> None:
        """Not used: SQLite holds no resource rows back."""
        raise NotImplementedError


def _insert_history(conn: Connection, version: dict[str, Any], method: str) -> None:
    """Record a version (the row's columns in ``version``) in the history."""
    conn.execute(
        _INSERT_HISTORY,
        {column: version[column] for column in ("pid", *_VERSION_COLUMNS)} | {"method": method},
    )


# Statements built once: executing a constant statement hits SQLAlchemy's compiled cache
# without rebuilding and hashing a new statement object on every write.
_INSERT_RESOURCE = insert(resource).returning(resource.c.pid)
_INSERT_UNLESS_EXISTS = sqlite_insert(resource).on_conflict_do_nothing().returning(resource.c.pid)
_INSERT_HISTORY = insert(resource_history)
_BUMP_RESOURCE = (
    update(resource)
    .where(resource.c.pid == bindparam("b_pid"), resource.c.version == bindparam("b_version"))
    .values(
        version=bindparam("version"),
        last_updated=bindparam("last_updated"),
        deleted=bindparam("deleted"),
        content=bindparam("content"),
    )
)
