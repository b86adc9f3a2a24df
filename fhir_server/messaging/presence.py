"""Who is online: the last authenticated request of each user, recorded cheaply.

The REST layer calls :func:`touch_presence` after authenticating a user's request. Each process
writes a user's ``user_presence`` row at most once per :data:`TOUCH_INTERVAL` (a dictionary
lookup otherwise), so presence costs one small UPSERT per user per minute per process, whatever
the request rate. The UPSERT runs on a background thread: a request (possibly on the event
loop) never waits for it, not even behind a long SQLite write lock. A user is online when the
row is younger than ``Settings.presence_window``; online users get in-app notifications but no
email.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from fhir_server.storage.engine import WRITE_OPTION
from fhir_server.storage.messaging_schema import user_presence
from fhir_server.storage.repository import utc_now

log = logging.getLogger(__name__)

TOUCH_INTERVAL = 60.0
"""Seconds during which a process does not write the same user's presence again."""

_touched: dict[tuple[int, str], float] = {}
_lock = threading.Lock()
_writer: ThreadPoolExecutor | None = None


def touch_presence(
    engine: Engine, username: str, *, now: datetime | None = None, wait: bool = False
) -> bool:
    """Record that ``username`` made an authenticated request now; True if a write was queued.

    Returns at once (``wait``: once the row is written). Never raises: presence is a hint for
    email, not worth failing a request over.
    """
    key = (id(engine), username)
    tick = time.monotonic()
    with _lock:
        last = _touched.get(key)
        if last is not None and tick - last < TOUCH_INTERVAL:
            return False
        _touched[key] = tick  # claimed before writing: concurrent requests do not all write
        global _writer
        if _writer is None:
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="presence")
        future: Future[None] = _writer.submit(_write, engine, username, now or utc_now())
    if wait:
        future.result()
    return True


def _write(engine: Engine, username: str, seen: datetime) -> None:
    try:
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                _upsert(conn, username, seen)
    except SQLAlchemyError:
        log.warning("Could not record the presence of user %s", username, exc_info=True)


def _upsert(conn: Connection, username: str, seen: datetime) -> None:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(user_presence).values(username=username, last_seen=seen)
    stmt = stmt.on_conflict_do_update(
        index_elements=[user_presence.c.username],
        set_={"last_seen": stmt.excluded.last_seen},
        where=user_presence.c.last_seen < stmt.excluded.last_seen,
    )
    conn.execute(stmt)


def online_among(
    conn: Connection, usernames: Iterable[str], window: float, *, now: datetime | None = None
) -> set[str]:
    """Those of ``usernames`` who made an authenticated request within ``window`` seconds."""
    names = sorted(set(usernames))
    if not names:
        return set()
    since = (now or utc_now()) - timedelta(seconds=window)
    rows = conn.execute(
        select(user_presence.c.username).where(
            user_presence.c.username.in_(names), user_presence.c.last_seen >= since
        )
    )
    return {row.username for row in rows}


def flush_presence() -> None:
    """Wait until the presence writes queued so far are done (its one writer thread runs them
    in order)."""
    with _lock:
        writer = _writer
    if writer is not None:
        writer.submit(lambda: None).result()


def forget_touches() -> None:
    """Clear this process's write throttle (tests, or after a clock jump)."""
    with _lock:
        _touched.clear()
