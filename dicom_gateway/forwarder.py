"""Forwarding the spool to Orthanc, outside any DICOM association.

The SCP answered Success once an instance was spooled (PS3.4 B.2.3); from then on it is this
module's job to get it into Orthanc, in order per study: a study is held by one forwarder at a
time, which sends its instances oldest first, while other studies go in parallel on other
threads. When Orthanc is unavailable every forwarder waits (exponential backoff, capped at
``retry_max`` seconds) and the instances stay in the spool. An instance Orthanc already has is a
success; one it rejects for good (HTTP 400) is set aside in ``failed/``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from dicom_gateway.orthanc import OrthancRejected
from dicom_gateway.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)

BATCH = 32  # instances of one study sent before the study yields its thread to another one
FIRST_DELAY = 0.25
PROGRESS_EVERY = 10.0  # seconds between two progress log lines while busy


class Uploader(Protocol):
    """What a forwarder needs from Orthanc (see :class:`dicom_gateway.orthanc.OrthancClient`)."""

    def store(self, data: bytes) -> object:
        """Store one instance; raise ``OrthancRejected`` for good, anything else to retry."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class ForwarderPool:
    """``threads`` forwarders draining ``spool`` into Orthanc, one study per thread at a time."""

    def __init__(
        self,
        spool: Spool,
        uploader_factory: Callable[[], Uploader],
        *,
        threads: int = 4,
        retry_max: float = 30.0,
    ) -> None:
        self.spool = spool
        self._uploader_factory = uploader_factory
        self._thread_count = max(1, threads)
        self._retry_max = max(FIRST_DELAY, retry_max)
        self._cond = threading.Condition()
        self._queues: dict[str, list[SpoolEntry]] = {}
        self._ready: deque[str] = deque()
        self._busy: set[str] = set()
        self._known: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._delay = 0.0
        self._resume_at = 0.0
        self.forwarded = 0
        self.rejected = 0
        self._last_progress = 0.0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Take over what the spool holds, then start the threads."""
        for entry in self.spool.subscribe(self.add):
            self.add(entry)
        for number in range(self._thread_count):
            thread = threading.Thread(target=self._run, name=f"forwarder-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking new work, let each thread finish the attempt it is making, and wait."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    # -- work in -------------------------------------------------------------------------

    def add(self, entry: SpoolEntry) -> None:
        """Queue a spooled entry behind the others of its study (ignored when known)."""
        with self._cond:
            if entry.seq in self._known:
                return
            self._known.add(entry.seq)
            queue = self._queues.setdefault(entry.study_key, [])
            bisect.insort(queue, entry)
            if len(queue) == 1 and entry.study_key not in self._busy:
                self._ready.append(entry.study_key)
                self._cond.notify()

    def pending(self) -> int:
        """Instances waiting (or being sent)."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def status(self) -> dict[str, int | float]:
        """Counts for logs: forwarded and rejected since start, pending, current retry delay."""
        return {
            "forwarded": self.forwarded,
            "rejected": self.rejected,
            "pending": self.pending(),
            "retry_delay": self._delay,
        }

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending; return whether that happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(self._queues.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # -- the threads -------------------------------------------------------------------------

    def _run(self) -> None:
        uploader = self._uploader_factory()
        try:
            while (study := self._claim()) is not None:
                self._drain(study, uploader)
        finally:
            uploader.close()

    def _claim(self) -> str | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                wait = self._resume_at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                elif self._ready:
                    study = self._ready.popleft()
                    self._busy.add(study)
                    return study
                else:
                    self._cond.wait()

    def _drain(self, study: str, uploader: Uploader) -> None:
        """Send up to BATCH instances of ``study`` in order, then hand the study back."""
        try:
            for _ in range(BATCH):
                with self._cond:
                    queue = self._queues.get(study)
                    if not queue or self._stopping or self._resume_at > time.monotonic():
                        return
                    entry = queue[0]
                if not self._forward(entry, uploader):
                    return
                with self._cond:
                    queue.pop(0)
                    self._known.discard(entry.seq)
        finally:
            with self._cond:
                self._busy.discard(study)
                if self._queues.get(study):
                    self._ready.append(study)
                else:
                    self._queues.pop(study, None)
                self._cond.notify_all()

    def _forward(self, entry: SpoolEntry, uploader: Uploader) -> bool:
        """One attempt; True when the entry is done with (stored, already gone or failed)."""
        try:
            data = self.spool.read(entry)
        except FileNotFoundError:
            return True
        try:
            uploader.store(data)
        except OrthancRejected:
            target = self.spool.move_to_failed(entry)
            with self._cond:
                self.rejected += 1
            log.error("Orthanc rejected a spooled file for good; moved to %s", target)
            return True
        except Exception as exc:
            self._back_off(exc)
            return False
        self.spool.remove(entry)
        self._succeeded()
        return True

    def _succeeded(self) -> None:
        with self._cond:
            self.forwarded += 1
            if self._delay:
                log.info("Orthanc is back; forwarding %d pending instances", self.pending())
                self._delay = 0.0
                self._cond.notify_all()
            now = time.monotonic()
            if now - self._last_progress >= PROGRESS_EVERY:
                self._last_progress = now
                log.info("forwarded %d instances, %d pending", self.forwarded, self.pending())

    def _back_off(self, exc: Exception) -> None:
        with self._cond:
            now = time.monotonic()
            if now < self._resume_at:
                return  # another thread already failed in this round
            self._delay = min(self._retry_max, self._delay * 2 if self._delay else FIRST_DELAY)
            self._resume_at = now + self._delay
            log.warning(
                "Orthanc unavailable (%s); %d instances wait in the spool, next try in %.1f s",
                type(exc).__name__,
                self.pending(),
                self._delay,
            )
