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

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.sql import Executable

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.budget import (
    SearchBudget,
    cancelled_error,
    current_budget,
    timeout_error,
)

WRITE_OPTION = "mso_write"
AUTOCOMMIT_OPTION = "mso_autocommit"
_engines: list[Engine] = []


def build_engine(url: str, *, pool_size: int = 16, generic_plans: bool = False) -> Engine:
    """Create the engine for ``url``; for SQLite, create the file's folder and set the pragmas.

    ``generic_plans`` (PostgreSQL): every statement is prepared on its first execution and
    planned once per connection, for no particular values (``plan_cache_mode``); only for
    statements whose plan does not depend on their values (see ``search.compile``). Such a
    pool serves searches only: a connection taken from it during a request runs under that
    request's search budget (:func:`_enter_search_budget`).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, parsed.database)
    else:
        connect_args: dict[str, Any] = {}
        if generic_plans:
            connect_args = {
                "options": "-c plan_cache_mode=force_generic_plan",
                "prepare_threshold": 0,
            }
        # The driver in autocommit mode (SQLAlchemy also restores it when a connection goes back
        # to the pool); psycopg still COMMITs / ROLLBACKs a transaction opened by BEGIN (it asks
        # the server's transaction status) and skips the round trip when none is open.
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_recycle=3600,
            isolation_level="AUTOCOMMIT",
            connect_args=connect_args,
            hide_parameters=True,  # a statement's values (resource JSON) stay out of errors
        )
        event.listen(engine, "begin", _emit_begin)
        if generic_plans:
            event.listen(engine.pool, "checkout", _enter_search_budget)
            event.listen(engine.pool, "checkin", _leave_search_budget)
    _engines.append(engine)
    return engine


# -- what a search may cost: statement timeout and cancellation ---------------------------------
#
# A search-only pooled connection (the generic-plan pool) keeps the statement timeout of the
# last search that used it (one SET when it changes: none per query); a search on a unit's own
# connection, which writes use too, sets it for the search and resets it afterwards
# (:func:`search_guard`). While a statement runs for a request, its connection's cancel
# function is registered with the request's budget, which the REST layer calls when the client
# disconnects.

_TIMEOUT_KEY = "mso_statement_timeout"
_BUDGET_KEY = "mso_search_budget"
QUERY_CANCELED = "57014"  # PostgreSQL: canceling statement due to statement timeout / user request


def canceller(dbapi_conn: Any) -> Callable[[], None]:
    """A function that stops the statement running on ``dbapi_conn`` from another thread:
    psycopg's cancel request (a separate connection to the server), SQLite's interrupt."""
    cancel_safe = getattr(dbapi_conn, "cancel_safe", None)
    if cancel_safe is not None:
        return lambda: cancel_safe(timeout=5)
    return dbapi_conn.interrupt  # type: ignore[no-any-return]


def _set_timeout(dbapi_conn: Any, info: dict[str, Any], timeout_ms: int) -> None:
    """PostgreSQL: the connection's ``statement_timeout`` (one round trip, only on a change)."""
    if info.get(_TIMEOUT_KEY, 0) == timeout_ms:
        return
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"SET statement_timeout = {int(timeout_ms)}")
    finally:
        cursor.close()
    info[_TIMEOUT_KEY] = timeout_ms


def _enter_search_budget(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """Pool checkout on a search-only pool: the current budget's timeout (none outside a
    request) and its cancel registration, until checkin."""
    budget = current_budget()
    _set_timeout(dbapi_conn, record.info, budget.timeout_ms if budget is not None else 0)
    if budget is not None:
        scope = budget.running(canceller(dbapi_conn))
        try:
            scope.__enter__()
        except FhirError:  # cancelled meanwhile: the caller finds out at its next statement
            return
        record.info[_BUDGET_KEY] = scope


def _leave_search_budget(_dbapi_conn: Any, record: Any) -> None:
    scope = record.info.pop(_BUDGET_KEY, None)
    if scope is not None:
        scope.__exit__(None, None, None)


@contextmanager
def search_guard(conn: Connection, budget: SearchBudget | None) -> Iterator[Connection]:
    """Run search statements on ``conn`` (a unit's connection, which writes use too: it keeps
    no ``statement_timeout``) under ``budget``: its statements are cancelled when the budget's
    timeout has passed (a watchdog thread, no round trip) or the client has gone."""
    if budget is None:
        yield conn
        return
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    with budget.running(canceller(dbapi_conn)), budget.timed():
        yield conn


def cost_error(exc: BaseException, budget: SearchBudget | None) -> FhirError | None:
    """The OperationOutcome error of a statement stopped by the budget (timeout or cancelled
    for a client that has gone), else ``None``."""
    if budget is None:
        return None
    orig = getattr(exc, "orig", None) or exc
    stopped = getattr(orig, "sqlstate", None) == QUERY_CANCELED or "interrupted" in str(orig)
    if not stopped:
        return None
    return timeout_error() if budget.timed_out or not budget.cancelled else cancelled_error()


def dispose_all() -> None:
    """Close every pooled connection of the engines this process built (tests, shutdown)."""
    while _engines:
        _engines.pop().dispose()


def _sqlite_engine(url: str, database: str | None) -> Engine:
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        hide_parameters=True,  # a statement's values (resource JSON) stay out of errors
    )

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


def write_connection(engine: Engine) -> Connection:
    """A connection of ``engine`` for a write transaction (on SQLite its ``BEGIN`` is
    ``BEGIN IMMEDIATE``, so two writers queue instead of failing at their first write)."""
    conn = engine.connect()
    conn.execution_options(**{WRITE_OPTION: True})
    return conn


def is_postgres(engine: Engine) -> bool:
    """True for a PostgreSQL engine."""
    return engine.dialect.name == "postgresql"


@functools.lru_cache(maxsize=1024)  # the access statements of Subscription owners among them
def _driver_sql(statement: Executable, dialect: Dialect) -> tuple[str, Any]:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    return str(compiled), compiled


def driver_params(statement: Executable, dialect: Dialect, values: dict[str, Any]) -> tuple:
    """The SQL text of a constant ``statement`` for ``dialect`` (compiled once) and ``values``
    in the driver's parameter style, for running it on a DB-API cursor. Expanding lists
    (``IN``) are rendered into the text for the values at hand."""
    sql, compiled = _driver_sql(statement, dialect)
    bound = compiled.construct_params(values)
    if compiled.post_compile_params:
        state = compiled.construct_expanded_state(bound)
        if compiled.positional:
            return state.statement, tuple(state.positional_parameters)
        return state.statement, state.parameters
    if compiled.positional:
        return sql, tuple(bound[k] for k in compiled.positiontup or ())
    return sql, bound


def fetch_on_its_own(engine: Engine, statement: Executable, values: dict[str, Any]) -> list[Any]:
    """The rows (tuples) of ``statement`` with ``values``, run with no transaction around it on
    a pooled DB-API connection of ``engine`` (SQL compiled once: :func:`driver_params`).

    For single-statement reads on every request, where SQLAlchemy's Connection and result
    machinery cost more CPU than the query. The engine's connections run statements on their
    own unless SQLAlchemy begins a transaction (:func:`build_engine`): no BEGIN, no ROLLBACK.
    A connection whose statement failed is discarded, not returned to the pool.
    """
    sql, params = driver_params(statement, engine.dialect, values)
    pooled = engine.raw_connection()
    try:
        cursor = pooled.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, params)
            return cursor.fetchall()
        finally:
            cursor.close()
    except Exception:
        pooled.invalidate()
        raise
    finally:
        pooled.close()


def execute_constant(conn: Connection, statement: Executable, values: dict[str, Any]) -> None:
    """Run a constant ``statement`` (compiled once) with ``values`` on the DB-API cursor of
    ``conn``, inside its transaction: for statements on a write's hot path, where SQLAlchemy's
    per-execution work (parameter processing, result setup) cost more CPU than the database
    spent on them."""
    sql, params = driver_params(statement, conn.dialect, values)
    _on_cursor(conn, lambda cursor: cursor.execute(sql, params))


def execute_constant_many(
    conn: Connection, statement: Executable, rows: Sequence[dict[str, Any]]
) -> None:
    """:func:`execute_constant` for several rows of values at once (``executemany``)."""
    if not rows:
        return
    prepared = [driver_params(statement, conn.dialect, values) for values in rows]
    sql = prepared[0][0]
    _on_cursor(conn, lambda cursor: cursor.executemany(sql, [params for _, params in prepared]))


def _on_cursor(conn: Connection, work: Callable[[Any], Any]) -> None:
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        work(cursor)
    finally:
        cursor.close()


def fetch_unprepared(conn: Connection, statement: Executable, values: dict[str, Any]) -> Any:
    """PostgreSQL: the first row of ``statement`` run as an unnamed statement, planned for
    ``values`` and the table's current size (a named tuple, or ``None``).

    psycopg prepares a statement after a few executions, and PostgreSQL may then keep one
    generic plan for it. A generic plan made while a table was nearly empty stays until the
    table's statistics change: on a fresh database the lookup of a resource by type and id
    was planned on the ``(res_type, last_updated)`` index and read every row of the type on
    each write (measured: 0.3 ms and 85 buffers per lookup after 3,500 Patients, growing).
    Planning each time costs about 0.04 ms.
    """
    rows = fetch_rows(conn, statement, values, prepare=False)
    return rows[0] if rows else None


def fetch_rows(
    conn: Connection, statement: Executable, values: dict[str, Any], *, prepare: bool | None = None
) -> list[Any]:
    """PostgreSQL: the rows (named tuples) of a constant ``statement`` run with ``values`` on
    the DB-API cursor of ``conn``, inside its transaction (SQL compiled once, as for
    :func:`execute_constant`). ``prepare=False``: planned for these values, never prepared
    (see :func:`fetch_unprepared`); ``None``: psycopg prepares it once it has run a few
    times."""
    from psycopg.rows import namedtuple_row

    sql, params = driver_params(statement, conn.dialect, values)
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.cursor(row_factory=namedtuple_row) as cursor:  # type: ignore[call-arg]
        cursor.execute(sql, params, prepare=prepare)
        return cursor.fetchall()
