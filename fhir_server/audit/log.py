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
"""

from __future__ import annotations

import logging
import queue
import threading
from functools import partial
from typing import Any

from fhir_server.audit import events, store
from fhir_server.audit.events import Interaction
from fhir_server.auth.principal import Principal
from fhir_server.hooks import HookEvent, HookPoint, Hooks
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


class AuditLog:
    """Queue of AuditEvents with a background writer, and the Provenance write hooks."""

    def __init__(
        self,
        repo: Repository,
        *,
        flush_interval: float = 0.2,
        batch_size: int = 200,
        capacity: int = 20_000,
    ) -> None:
        self.repo = repo
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=capacity)  # rows
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # -- recording ---------------------------------------------------------------------------

    def record(self, audit_event: dict[str, Any]) -> None:
        """Queue one AuditEvent resource for storage (never fails the caller's request)."""
        try:
            row = store.prepare(audit_event)[1]
        except Exception as exc:
            _log_failure(exc, audit_event.get("id"))
            return
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
        if event.point is HookPoint.AFTER_DELETE:
            previous = int(((event.previous or {}).get("meta") or {}).get("versionId") or 0)
            version = str(previous + 1)
        else:
            version = ((event.resource or {}).get("meta") or {}).get("versionId") or "1"
        target = f"{event.resource_type}/{event.resource_id}/_history/{version}"
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
        cost of waking this thread: a hand-off per AuditEvent was about 5% of a search's CPU."""
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            pending: list[dict[str, Any]] = []
            stop = False
            while not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    pending.append(item)
            for start in range(0, len(pending), self.batch_size):
                self._store(pending[start : start + self.batch_size])
            for _ in range(len(pending) + stop):
                self._queue.task_done()
            if stop:
                return

    def _store(self, batch: list[dict[str, Any]]) -> None:
        try:
            self.repo.write(lambda tx: store.write_rows(tx.conn, batch), retries=5)
        except Exception:
            # One bad event must not lose the batch: store them one by one, log what fails.
            for row in batch:
                try:
                    self.repo.write(lambda tx, r=row: store.write_rows(tx.conn, [r]), retries=5)
                except Exception as exc:
                    _log_failure(exc, row.get("id"))


def _log_failure(exc: Exception, event_id: str | None) -> None:
    """Log an AuditEvent that could not be stored by its id and the error's type only: the
    error's text (a database error quotes the row's values) may carry a search's values."""
    log.error("Could not store an AuditEvent (id %s): %s", event_id, type(exc).__name__)
