"""Database engines for SQLite (the embedded default) and PostgreSQL (production).

On both, the driver's own transaction handling is switched off and the engine emits ``BEGIN``
itself when SQLAlchemy opens a transaction. SQLite runs in WAL mode, so that the repository can
open write transactions with ``BEGIN IMMEDIATE`` (taking the write lock up front rather than
failing with SQLITE_BUSY when a reader later tries to write). A connection given the
:data:`AUTOCOMMIT_OPTION` runs each statement on its own, with no ``BEGIN``: a read made of one
statement needs no snapshot, and switching the driver's autocommit flag back and forth on every
request (SQLAlchemy's ``isolation_level="AUTOCOMMIT"``) cost about 4% of a search's CPU.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

WRITE_OPTION = "mso_write"
AUTOCOMMIT_OPTION = "mso_autocommit"
_engines: list[Engine] = []


def build_engine(url: str, *, pool_size: int = 16) -> Engine:
    """Create the engine for ``url``; for SQLite, create the file's folder and set the pragmas."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, parsed.database)
    else:
        # The driver in autocommit mode (SQLAlchemy also restores it when a connection goes back
        # to the pool); psycopg still COMMITs / ROLLBACKs a transaction opened by BEGIN (it asks
        # the server's transaction status) and skips the round trip when none is open.
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_recycle=3600,
            isolation_level="AUTOCOMMIT",
        )
        event.listen(engine, "begin", _emit_begin)
    _engines.append(engine)
    return engine


def dispose_all() -> None:
    """Close every pooled connection of the engines this process built (tests, shutdown)."""
    while _engines:
        _engines.pop().dispose()


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    event.listen(engine, "begin", _emit_begin)
    return engine


def _emit_begin(conn: Connection) -> None:
    """Open the transaction SQLAlchemy begins (none on an :data:`AUTOCOMMIT_OPTION` connection)."""
    options = conn.get_execution_options()
    if options.get(AUTOCOMMIT_OPTION) or options.get("isolation_level") == "AUTOCOMMIT":
        return
    sqlite_write = options.get(WRITE_OPTION) and conn.dialect.name == "sqlite"
    conn.exec_driver_sql("BEGIN IMMEDIATE" if sqlite_write else "BEGIN")


def is_postgres(engine: Engine) -> bool:
    """True for a PostgreSQL engine."""
    return engine.dialect.name == "postgresql"
