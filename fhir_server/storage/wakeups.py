"""Wake-up signals between the processes of one deployment: PostgreSQL ``LISTEN/NOTIFY``, and
plain calls within the process on SQLite (where the processes sharing a file are rare and a
poll interval covers them).

Signals carry no data: they only say "look again" (what to look at is in the database, which
stays the one source of truth, so a lost or doubled signal costs latency, never a change). Two
channels exist:

* :data:`FEED`: a change was committed to the change feed. On PostgreSQL a statement trigger on
  ``change_feed`` (migration 0012) notifies it in the writing transaction, so it fires exactly
  when the change becomes visible and costs the writer no round trip; on SQLite the repository's
  ``after_commit`` hook calls :meth:`Wakeups.signal`.
* :data:`EVENTS`: the Subscription dispatcher queued notifications (websocket hubs in every
  process then read those for their sockets). The dispatcher calls :func:`notify` in its
  transaction.

On PostgreSQL a daemon thread holds one connection of its own that ``LISTEN``s on both and
calls the callbacks registered for a channel; after (re)connecting it calls all of them, since
notifications sent while it was disconnected are gone.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text

from fhir_server.hooks import HookPoint, Hooks

log = logging.getLogger(__name__)

FEED = "mso_change_feed"
EVENTS = "mso_subscription_events"
CHANNELS = (FEED, EVENTS)
_RECONNECT_SECONDS = 1.0


def notify(conn: Connection, channel: str) -> None:
    """In ``conn``'s open transaction: wake the listeners of ``channel`` in every process once
    it commits (nothing on SQLite: call :meth:`Wakeups.signal` after the commit)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


class Wakeups:
    """The callbacks of this process per channel, and (PostgreSQL) the thread that calls them
    on notifications from any process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._callbacks: dict[str, list[Callable[[], None]]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()
        """Set while the listening connection is up (tests wait for it)."""

    def on(self, channel: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (quick, non-blocking: it runs on the listening thread) whenever
        ``channel`` is signalled."""
        self._callbacks[channel].append(callback)

    def signal(self, channel: str) -> None:
        """Call this process's callbacks of ``channel`` now."""
        for callback in self._callbacks.get(channel, ()):
            try:
                callback()
            except Exception:  # one bad callback must not starve the others
                log.exception("Wake-up callback failed")

    def follow_commits(self, hooks: Hooks) -> None:
        """On SQLite, signal :data:`FEED` after every committed write (PostgreSQL's trigger
        does it there)."""
        if not self.postgres:
            hooks.register(HookPoint.AFTER_COMMIT, lambda _event: self.signal(FEED))

    def start(self) -> None:
        """Start listening (PostgreSQL only; idempotent)."""
        if self.postgres and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._listen, name="wakeups", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop listening."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception:  # connection lost: reconnect after a pause
                log.warning("Wake-up listener lost its connection; reconnecting", exc_info=True)
            finally:
                self.listening.clear()
            self._stop.wait(_RECONNECT_SECONDS)

    def _listen_once(self) -> None:
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert driver is not None
            raw.detach()  # a connection of its own: closed, never returned to the pool
            driver.rollback()
            driver.autocommit = True
            for channel in CHANNELS:
                driver.execute(f"LISTEN {channel}")
            self.listening.set()
            for channel in CHANNELS:  # whatever was signalled while nobody listened
                self.signal(channel)
            while not self._stop.is_set():
                for note in driver.notifies(timeout=1.0):
                    self.signal(note.channel)
                    if self._stop.is_set():
                        break
        finally:
            raw.close()
