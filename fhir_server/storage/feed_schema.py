"""The change feed table (:mod:`fhir_server.storage.change_feed`): every committed write, once.

A row per resource write (create, update, delete), inserted in the transaction of the write, so
it commits or rolls back with it. ``id`` numbers rows in insertion order; ``xid`` is the writing
transaction's PostgreSQL id (``pg_current_xact_id()``; 0 on SQLite, whose writers are serialized
and whose ids are therefore in commit order). A reader orders by ``(xid, id)`` and reads only
below the oldest transaction still running: see the module of the feed for why.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table

from fhir_server.storage.base_schema import PidType, metadata

change_feed = Table(
    "change_feed",
    metadata,
    Column("id", PidType, primary_key=True, autoincrement=True),
    Column("xid", BigInteger, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("method", String(8), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index(None, "xid", "id"),
    # never reuse an id: after a pruning emptied the table's end, a reused id would fall at
    # or below a reader's position and the change would never be read
    sqlite_autoincrement=True,
)

feed_cursor = Table(
    "feed_cursor",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("xid", BigInteger, nullable=False),
    Column("id", BigInteger, nullable=False),
)
"""Where each named consumer of the feed has read up to (its last ``(xid, id)``)."""
