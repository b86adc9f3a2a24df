"""What one search may cost: limits checked when the query is parsed, and the per-request
budget (statement timeout, cancellation when the client has gone).

http://hl7.org/fhir/R4/search.html leaves a server free to refuse a search it finds too costly
(``too-costly``). The REST layer makes a :class:`SearchBudget` current for each request
(:func:`budget_scope`); the storage layer registers the database connection a search statement
runs on (:meth:`SearchBudget.running`), so that the REST layer can cancel that statement when
the client disconnects. Without a current budget (in-process callers, tests) the default
limits apply and nothing is cancelled.

Pure: no engine, no connection of its own; a cancel function is whatever the caller hands in.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fhir_server.fhir.outcome import FhirError

log = logging.getLogger(__name__)

TOO_MANY_CRITERIA = "MSO-SEARCH-020"
TOO_MANY_VALUES = "MSO-SEARCH-021"
CHAIN_TOO_DEEP = "MSO-SEARCH-022"
TOO_MANY_INCLUDES = "MSO-SEARCH-023"
TOO_MANY_INCLUDED = "MSO-SEARCH-024"
TIMED_OUT = "MSO-SEARCH-025"
CANCELLED = "MSO-SEARCH-026"


@dataclass(frozen=True, slots=True)
class SearchLimits:
    """Bounds on what one search may ask for (the defaults of the ``MSO_SEARCH_MAX_*``
    settings)."""

    max_criteria: int = 40  # AND-ed criteria (each _filter leaf counts)
    max_values: int = 100  # OR-ed values of one criterion
    max_chain_depth: int = 3  # chained and _has links in one criterion
    max_includes: int = 10  # _include and _revinclude parameters
    max_included: int = 1000  # resources _include / _revinclude may add to a page


@dataclass(slots=True)
class SearchBudget:
    """One request's search budget: its limits, the statement timeout (milliseconds, 0: none)
    and the cancel functions of the statements running for it."""

    limits: SearchLimits = field(default_factory=SearchLimits)
    timeout_ms: int = 0
    cancelled: bool = False
    timed_out: bool = False
    _running: dict[int, Callable[[], None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def running(self, cancel: Callable[[], None]) -> Iterator[None]:
        """Register ``cancel`` (it stops the statement about to run) for the block; a
        :data:`CANCELLED` error at once when the budget was already cancelled."""
        key = id(cancel)
        with self._lock:
            if self.cancelled:
                raise timeout_error() if self.timed_out else cancelled_error()
            self._running[key] = cancel
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Stop the statements registered in the block once it has lasted ``timeout_ms``
        (for connections that cannot keep a ``statement_timeout`` of their own)."""
        if self.timeout_ms <= 0:
            yield
            return
        entry = _WATCHDOG.arm(time.monotonic() + self.timeout_ms / 1000, self.expire)
        try:
            yield
        finally:
            entry[2] = None

    def expire(self) -> int:
        """The timeout passed: stop the registered statements, refuse later ones."""
        self.timed_out = True
        return self.cancel()

    def cancel(self) -> int:
        """Stop every registered statement and refuse later ones; how many were stopped."""
        with self._lock:
            self.cancelled = True
            cancels = list(self._running.values())
        for cancel in cancels:
            try:
                cancel()
            except Exception:  # the statement ended meanwhile, or its connection did
                log.debug("Could not cancel a search statement", exc_info=True)
        return len(cancels)


class _Watchdog:
    """One daemon thread calling functions at their deadlines (arming one costs a heap push,
    not a thread; a disarmed entry is dropped when its time comes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, call: Callable[[], object]) -> list[Any]:
        """Call ``call`` at ``deadline`` (monotonic) unless the entry's third item is set to
        ``None`` before."""
        entry = [deadline, next(self._order), call]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="search-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                call = heapq.heappop(self._heap)[2]
            try:
                call()
            except Exception:
                log.exception("A search watchdog call failed")


_WATCHDOG = _Watchdog()
_current: ContextVar[SearchBudget | None] = ContextVar("mso_search_budget", default=None)
_DEFAULT = SearchLimits()


def current_budget() -> SearchBudget | None:
    """The budget of the request being served (``None`` outside one)."""
    return _current.get()


def current_limits() -> SearchLimits:
    """The limits of the request being served, else the defaults."""
    budget = _current.get()
    return budget.limits if budget is not None else _DEFAULT


@contextmanager
def budget_scope(budget: SearchBudget) -> Iterator[SearchBudget]:
    """Make ``budget`` current for the block (in this context: a worker thread's too, when it
    runs in a copy of this context)."""
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


def limit_error(code: str, message: str, name: str | None = None) -> FhirError:
    """The 400 of a search over one of its limits (``too-costly``, naming the limit's code)."""
    return FhirError(
        400, "too-costly", message, code=code, expression=[name] if name is not None else None
    )


def timeout_error() -> FhirError:
    """The 503 of a search stopped by the statement timeout (``MSO_SEARCH_TIMEOUT_MS``)."""
    return FhirError(
        503,
        "too-costly",
        "The search took longer than the server allows; narrow it (fewer or more selective "
        "criteria, a smaller _count)",
        code=TIMED_OUT,
    )


def cancelled_error() -> FhirError:
    """The error of a search stopped because its client disconnected (nobody reads it)."""
    return FhirError(
        503, "too-costly", "The search was cancelled: the client disconnected", code=CANCELLED
    )
