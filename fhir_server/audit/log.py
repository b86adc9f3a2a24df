"""The audit log: writes AuditEvents in the background and Provenance inside every write.

AuditEvents are queued by the request that caused them and stored in batches by one writer
thread per process (one transaction and one COPY a batch, into the audit trail's own table:
:mod:`fhir_server.audit.store`), so auditing a read costs the read no database round trip. The
request turns its event into the table row before queueing it: done by the writer for a whole
batch at once, that work held the interpreter lock for tens of milliseconds, and a request
arriving meanwhile waited that long (p99 of a read at one client: 46 → 6 ms). The queue is
bounded: when the writer falls behind, requests wait for room rather than events being dropped.
``close()`` (application shutdown) drains it. A hard crash can lose at most the events of the
last flush interval; the Provenance of a write, by contrast, commits in the same transaction as
the write itself.

No input keeps an event out of the trail: values that do not fit a column are cut with a marker
(:func:`fhir_server.audit.store.fit`); a batch the database refuses is stored event by event,
and an event it still refuses is stored with its searchable columns emptied (found by ``_id``
and ``date``; the JSON is whole). When even that fails the database is taken to be unavailable:
the events are kept and retried with a doubling wait (``retry_initial`` up to ``retry_max``),
and the queue behind them fills until requests wait for room. Every failure is counted
(:meth:`AuditLog.stats`) and logged at ERROR with the count so far: that log line is the alarm.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from fhir_server.audit import events, store
from fhir_server.audit.events import Interaction
from fhir_server.auth.principal import Principal
from fhir_server.hooks import HookEvent, HookPoint, Hooks, written_version
from fhir_server.storage.repository import Repository, Tx, format_instant, utc_now

log = logging.getLogger(__name__)

# Resources whose own writes are not given a Provenance (it would recurse, or is the trail).
_NO_PROVENANCE = frozenset({"Provenance", "AuditEvent"})
_PENDING_PROVENANCE = "audit.provenance"  # Tx.unit_state key: activity -> target references
_ACTIVITY = {
    HookPoint.AFTER_CREATE: "CREATE",
    HookPoint.AFTER_UPDATE: "UPDATE",
    HookPoint.AFTER_DELETE: "DELETE",
}


def now_instant() -> str:
    """The current instant as FHIR renders it."""
    return format_instant(utc_now())


@dataclass(slots=True)
class WriterStats:
    """What went wrong storing AuditEvents since the process started (see the module text)."""

    failures: int = 0  # attempts (a batch, an event) the database refused
    degraded: int = 0  # events stored without their searchable columns
    waiting: int = 0  # events kept for a retry at this moment
    lost: int = 0  # events still unstored when the writer was stopped


class AuditLog:
    """Queue of AuditEvents with a background writer, and the Provenance write hooks."""

    def __init__(
        self,
        repo: Repository,
        *,
        flush_interval: float = 0.2,
        batch_size: int = 200,
        capacity: int = 20_000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        close_timeout: float = 20.0,
    ) -> None:
        self.repo = repo
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.capacity = capacity
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.close_timeout = close_timeout  # how long close() keeps retrying unstored events
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=capacity)  # rows
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stats = WriterStats()
        self._stats_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        """The writer's counters: ``failures`` (attempts the database refused), ``degraded``
        (events stored without searchable columns), ``waiting`` (events kept for a retry now),
        ``lost`` (events unstored when the writer stopped)."""
        with self._stats_lock:
            return asdict(self._stats)

    def _count(self, name: str, by: int = 1) -> int:
        with self._stats_lock:
            value = getattr(self._stats, name) + by
            setattr(self._stats, name, value)
            return value

    # -- recording ---------------------------------------------------------------------------

    def record(self, audit_event: dict[str, Any]) -> None:
        """Queue one AuditEvent resource for storage (never fails the caller's request; a
        malformed event is stored without its searchable columns, counted and logged)."""
        try:
            row = store.prepare(audit_event)[1]
        except Exception as exc:
            row = store.bare_prepare(audit_event)
            degraded = self._count("degraded")
            log.error(
                "Could not store an AuditEvent (id %s) with its searchable columns: %s; "
                "storing it without them (events stored so: %d)",
                row["id"],
                type(exc).__name__,
                degraded,
            )
        self._ensure_writer()
        self._queue.put(row)

    def interaction(self, principal: Principal | None, event: Interaction) -> None:
        """Audit one FHIR interaction."""
        self.record(events.interaction_event(principal, event, now_instant()))

    def auth_event(
        self,
        kind: str,
        success: bool,
        *,
        subject: str | None = None,
        client_id: str | None = None,
        source: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Audit a login, logout or token event (``kind``: see ``events.AUTH_SUBTYPES``)."""
        self.record(
            events.auth_event(
                kind,
                success,
                now_instant(),
                subject=subject,
                client_id=client_id,
                source=source,
                detail=detail,
            )
        )

    # -- provenance --------------------------------------------------------------------------

    def register(self, hooks: Hooks) -> None:
        """Give every write made for an authenticated caller a Provenance in its transaction."""
        for point in _ACTIVITY:
            hooks.register(point, self._provenance)

    def _provenance(self, event: HookEvent) -> None:
        caller = event.caller
        if not isinstance(caller, Principal) or event.resource_type in _NO_PROVENANCE:
            return
        target = f"{event.resource_type}/{event.resource_id}/_history/{written_version(event)}"
        tx = event.tx
        pending: dict[str, list[str]] | None = tx.unit_state.get(_PENDING_PROVENANCE)
        if pending is None:
            pending = tx.unit_state[_PENDING_PROVENANCE] = {}
            tx.defer(partial(self._write_provenance, tx, caller, pending))
        pending.setdefault(_ACTIVITY[event.point], []).append(target)

    @staticmethod
    def _write_provenance(tx: Tx, caller: Principal, pending: dict[str, list[str]]) -> None:
        """One Provenance per activity for the unit's writes (a transaction Bundle's entries
        share it, as the FHIR transaction pattern does), written before the unit commits."""
        recorded = now_instant()
        with tx.internal():
            for activity, targets in pending.items():
                tx.create(events.provenance(caller, targets, activity, recorded))

    # -- the writer --------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until every AuditEvent queued so far is stored."""
        if self._thread is not None:
            self._wake.set()
            self._queue.join()

    def close(self) -> None:
        """Store what is queued and stop the writer."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            self._wake.set()
            thread.join(timeout=30)

    def _ensure_writer(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        """Store what was queued every ``flush_interval`` (sooner on :meth:`flush` or
        :meth:`close`). Waking on a timer instead of on every event spares each request the
        cost of waking this thread: a hand-off per AuditEvent was about 5% of a search's CPU.
        Events the database could not take wait in ``retry`` (ahead of newer ones) for a
        doubling delay; while ``capacity`` of them wait, the queue is left to fill."""
        retry: list[dict[str, Any]] = []
        delay = self.retry_initial
        stop_by: float | None = None  # set by close(): retry until then, then give up
        while True:
            wait = delay if retry else self.flush_interval
            if stop_by is not None:
                wait = max(0.0, min(wait, stop_by - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            pending, stop = self._take(self.capacity - len(retry))
            if stop:
                stop_by = time.monotonic() + self.close_timeout
            rows = retry + pending
            retry = self._store_all(rows)
            self._set_waiting(len(retry))
            self._done(len(rows) - len(retry))
            delay = min(delay * 2, self.retry_max) if retry else self.retry_initial
            if stop_by is not None and (not retry or time.monotonic() >= stop_by):
                if retry:
                    lost = self._count("lost", len(retry))
                    self._set_waiting(0)
                    log.error(
                        "%d AuditEvents could not be stored before the writer stopped "
                        "(lost so far: %d)",
                        len(retry),
                        lost,
                    )
                    self._done(len(retry))
                self._done(1)  # the stop marker
                return

    def _take(self, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` queued rows, and whether the stop marker came."""
        pending: list[dict[str, Any]] = []
        while len(pending) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return pending, True
            pending.append(item)
        return pending, False

    def _done(self, count: int) -> None:
        for _ in range(count):
            self._queue.task_done()

    def _set_waiting(self, count: int) -> None:
        with self._stats_lock:
            self._stats.waiting = count

    def _store_all(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store ``rows`` in batches; returns those left for a retry (from the first that the
        database could not take at all on)."""
        for start in range(0, len(rows), self.batch_size):
            left = self._store(rows[start : start + self.batch_size])
            if left:
                return left + rows[start + self.batch_size :]
        return []

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.repo.write(lambda tx: store.write_rows(tx.conn, rows), retries=5)

    def _store(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store one batch; returns the rows left for a retry. One bad event must not lose
        the batch: when it fails, each event is stored alone; one that fails alone is stored
        without its searchable columns, and then also under a new id (its own is taken). If
        that fails too, the database is taking nothing: this event and the rest wait."""
        try:
            self._write(batch)
            return []
        except Exception as exc:
            self._failed(exc, f"batch ({len(batch)} events)", "storing them one by one")
        for index, row in enumerate(batch):
            try:
                self._write([row])
                continue
            except Exception as exc:
                self._failed(exc, f"(id {row['id']})", "storing it without searchable columns")
            try:
                self._write([store.bare_row(row)])
                self._count("degraded")
                continue
            except Exception as exc:
                self._failed(exc, f"(id {row['id']}) without searchable columns", "a new id")
            try:
                renamed = store.renamed(row)
                self._write([renamed])
            except Exception as exc:
                left = batch[index:]
                self._failed(exc, f"(id {row['id']}) at all", f"{len(left)} wait for a retry")
                return left
            degraded = self._count("degraded")
            log.error(
                "Stored the AuditEvent %s as %s (degraded so far: %d)",
                row["id"],
                renamed["id"],
                degraded,
            )
        return []

    def _failed(self, exc: Exception, what: str, then: str) -> None:
        """Count and log a refused write by ids and the error's type only: the error's text
        (a database error quotes the row's values) may carry a search's values."""
        failures = self._count("failures")
        log.error(
            "Could not store an AuditEvent %s: %s; %s (audit store failures so far: %d)",
            what,
            type(exc).__name__,
            then,
            failures,
        )
