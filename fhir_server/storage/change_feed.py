"""The change feed: every committed resource write, readable in full and each once.

Subscriptions (and anything else that must react to changes across processes) read the feed
instead of listening to writes in memory: a listener misses what happens while it is down, and
a process killed between a commit and its notification loses the notification. Every write adds
a :data:`~fhir_server.storage.feed_schema.change_feed` row in its own transaction (gathered over
the unit and inserted in one statement just before it commits), so the row exists exactly when
the write does.

Reading it without loss is the hard part on PostgreSQL. Row ids come from a sequence when a row
is inserted, not when its transaction commits: transaction A may take id 10 and commit after
transaction B took id 11 and committed, so a reader that remembers "up to id 11" never sees
10. The reader therefore orders rows by the writing transaction's id (``xid``) and reads only
rows whose transaction is older than the oldest one still running (``pg_snapshot_xmin`` of the
current snapshot): every such transaction has ended, so the set of rows below that bound can no
longer grow, and a position ``(xid, id)`` within it is final. A transaction left open delays
the feed (its rows, and those after it, wait for it to end) but loses nothing. On SQLite writers
are serialized, ids follow commit order, ``xid`` is 0 and the position is the id alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Insert,
    and_,
    bindparam,
    delete,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)

from fhir_server.hooks import HookEvent, HookPoint, Hooks, written_version
from fhir_server.storage.engine import execute_constant_many
from fhir_server.storage.feed_schema import change_feed, feed_cursor
from fhir_server.storage.records import as_utc, utc_now

if TYPE_CHECKING:
    from fhir_server.storage.repository import Tx

_PENDING = "change_feed.pending"
_METHODS = {
    HookPoint.AFTER_CREATE: "create",
    HookPoint.AFTER_UPDATE: "update",
    HookPoint.AFTER_DELETE: "delete",
}
_PG_XID = literal_column("pg_current_xact_id()::text::bigint")
_PG_HORIZON = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the feed: after the row ``(xid, id)`` (``(0, 0)``: the beginning)."""

    xid: int = 0
    id: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write: which resource, its new version, ``create`` / ``update`` /
    ``delete``, when, and where it is in the feed."""

    position: Position
    res_type: str
    res_id: str
    version: int
    method: str
    at: datetime


def register(hooks: Hooks) -> None:
    """Record every resource write of every unit in the feed (the repository's assembly,
    :func:`fhir_server.wiring.build_repository`, calls this once)."""
    for point in _METHODS:
        hooks.register(point, _record)


def _record(event: HookEvent) -> None:
    tx: Tx = event.tx
    pending: list[dict[str, Any]] | None = tx.unit_state.get(_PENDING)
    if pending is None:
        # one INSERT for all the unit's writes, those of its deferred work included
        pending = tx.unit_state[_PENDING] = []
        tx.at_commit(_PENDING, partial(_write, tx))
    pending.append(
        {
            "res_type": event.resource_type,
            "res_id": event.resource_id or "",
            "version": written_version(event),
            "method": _METHODS[event.point],
            "at": utc_now(),
        }
    )


def _write(tx: Tx) -> None:
    rows = tx.unit_state.pop(_PENDING, None)
    if rows:
        # on the DB-API cursor: the write path's statements are counted in CPU (engine.py)
        execute_constant_many(tx.conn, _insert(tx.repo.postgres), rows)


@functools.cache
def _insert(postgres: bool) -> Insert:
    """The feed's INSERT, one constant statement per dialect."""
    return insert(change_feed).values(
        xid=_PG_XID if postgres else literal(0),
        **{name: bindparam(name) for name in ("res_type", "res_id", "version", "method", "at")},
    )


def read(conn: Connection, after: Position, limit: int = 1000) -> list[Change]:
    """Up to ``limit`` changes after ``after``, in feed order, of transactions that have all
    ended (on PostgreSQL: older than the oldest one running)."""
    c = change_feed.c
    conditions = [or_(c.xid > after.xid, and_(c.xid == after.xid, c.id > after.id))]
    if conn.dialect.name == "postgresql":
        conditions.append(c.xid < int(conn.execute(_PG_HORIZON).scalar_one()))
    rows = conn.execute(
        select(c.id, c.xid, c.res_type, c.res_id, c.version, c.method, c.at)
        .where(*conditions)
        .order_by(c.xid, c.id)
        .limit(limit)
    ).all()
    return [
        Change(
            Position(int(r.xid), int(r.id)), r.res_type, r.res_id, r.version, r.method, as_utc(r.at)
        )
        for r in rows
    ]


def position_of(conn: Connection, name: str, *, for_update: bool = False) -> Position:
    """Where the consumer ``name`` has read up to (the beginning for a new one). With
    ``for_update``, in a write transaction, its row is created if need be and locked until the
    transaction ends (one writer of the position at a time); without, nothing is written."""
    stmt = select(feed_cursor.c.xid, feed_cursor.c.id).where(feed_cursor.c.name == name)
    if for_update:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        if for_update:
            conn.execute(insert(feed_cursor).values(name=name, xid=0, id=0))
        return Position()
    return Position(int(row.xid), int(row.id))


def save_position(conn: Connection, name: str, position: Position) -> None:
    """Record that the consumer ``name`` has read up to ``position``."""
    conn.execute(
        update(feed_cursor)
        .where(feed_cursor.c.name == name)
        .values(xid=position.xid, id=position.id)
    )


def prune(conn: Connection, upto: Position, before: datetime) -> int:
    """Delete the changes at or before ``upto`` (read by every consumer) that were made before
    ``before``; how many went."""
    c = change_feed.c
    read_by_all = or_(c.xid < upto.xid, and_(c.xid == upto.xid, c.id <= upto.id))
    return conn.execute(delete(change_feed).where(read_by_all, c.at < before)).rowcount or 0
