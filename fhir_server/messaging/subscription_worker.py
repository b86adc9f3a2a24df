"""The Subscription worker: a thread turning the change feed into sent notifications.

Each round dispatches the committed changes (:func:`.dispatch.dispatch_once`, one dispatcher at
a time across processes: the feed cursor's row lock) and sends the due rest-hook notifications
(:class:`.rest_hook.RestHookSender`, claimed with ``SKIP LOCKED`` on PostgreSQL, so any number
of processes share the queue). ``mso serve`` runs one (``MSO_SUBSCRIPTION_WORKER``) and so does
every ``mso worker``. A worker that has caught up looks again when a change is committed (the
:data:`~fhir_server.storage.wakeups.FEED` signal: LISTEN/NOTIFY across processes on PostgreSQL),
but no sooner than ``MSO_SUBSCRIPTION_ROUND_GAP`` after its last round, so that under a stream of
writes it dispatches batches rather than chasing every change (and while no Subscription listens
at all, no sooner than ``MSO_SUBSCRIPTION_POLL_INTERVAL``: the writes are then nobody's
business, and a round for each would cost the API a share of its writes); and at the latest
after ``MSO_SUBSCRIPTION_POLL_INTERVAL`` seconds. After a round that queued notifications it signals
:data:`~fhir_server.storage.wakeups.EVENTS` in this process (the websocket hub; other processes
hear the dispatcher's NOTIFY).
"""

from __future__ import annotations

import logging
import threading
import time

from fhir_server.config import Settings
from fhir_server.messaging.dispatch import (
    Leadership,
    ListenerCache,
    dispatch_once,
    prune_feed,
)
from fhir_server.messaging.rest_hook import RestHookSender
from fhir_server.storage.repository import Repository
from fhir_server.storage.wakeups import EVENTS, FEED, Wakeups

log = logging.getLogger(__name__)

BATCH = 500
"""Changes a dispatch round reads at most."""
SEND_BATCH = 20
"""Notifications a sending round claims at most."""
PRUNE_EVERY = 3600.0
"""Seconds between two prunings of the change feed by one worker."""


class SubscriptionWorker:
    """Dispatch and delivery of Subscription notifications in a background thread."""

    def __init__(
        self, repo: Repository, settings: Settings, wakeups: Wakeups | None = None
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.wakeups = wakeups
        if wakeups is not None:
            wakeups.on(FEED, self._feed_changed)
            wakeups.on(EVENTS, self._events_queued)
        self.sender = RestHookSender(repo, settings)
        self._send_due = True
        self._next_send = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_prune = time.monotonic() + PRUNE_EVERY
        self._listeners = ListenerCache()
        self._leadership = Leadership()

    def run_once(self, *, send: bool = True) -> bool:
        """One round: the committed changes dispatched, the due notifications sent (unless
        ``send`` is false); whether work is left over (a full batch of changes or of
        notifications: no pause before the next round). A worker that keeps up pauses between
        rounds rather than chasing every new change: chasing them cost the API a third of its
        writes (measured, README)."""
        dispatched = self._dispatch()
        while dispatched >= BATCH:
            dispatched = self._dispatch()
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
            prune_feed(self.repo, self.settings.change_feed_retention_hours)
        if not send:
            return False
        return self.sender.run_once(limit=SEND_BATCH) >= SEND_BATCH

    def _leads(self) -> bool:
        return not self.repo.postgres or self._leadership.leading

    def _feed_changed(self) -> None:
        # only the leading process dispatches: the others need not wake for a commit
        if self._leads():
            self._wake.set()

    def _events_queued(self) -> None:
        self._send_due = True
        self._wake.set()

    def _dispatch(self) -> int:
        return dispatch_once(
            self.repo,
            batch=BATCH,
            queued=self._queued,
            cache=self._listeners,
            leadership=self._leadership,
        )

    def _queued(self) -> None:
        if self.wakeups is not None:
            self.wakeups.signal(EVENTS)

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="subscription-worker", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Look for work now rather than after the poll interval."""
        self._wake.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after its current round."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
        self.step_down()
        self.sender.close()

    def step_down(self) -> None:
        """Stop leading the dispatch (PostgreSQL), leaving it to another process at its next
        look; this worker leads again only if nobody took over."""
        self._leadership.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            last = time.monotonic()
            # the rest-hook queue is looked at when notifications were queued, else once a
            # poll interval (for retries coming due): not on every commit
            send = self._send_due or last >= self._next_send
            if send:
                self._send_due = False
                self._next_send = last + self.settings.subscription_poll_interval
            try:
                busy = self.run_once(send=send)
            except Exception:  # a database hiccup: logged, and the next round tries again
                log.exception("Subscription worker round failed")
                busy = False
            if not busy:
                self._wake.wait(self.settings.subscription_poll_interval)
                # with nobody listening (or not leading), a commit is no reason to hurry
                pause = (
                    self.settings.subscription_poll_interval
                    if self._listeners.none_listen or not self._leads()
                    else self.settings.subscription_round_gap
                )
                gap = last + pause - time.monotonic()
                if gap > 0:
                    self._stop.wait(gap)
                self._wake.clear()
