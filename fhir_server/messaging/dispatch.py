"""From the change feed to notifications: which Subscription hears of which change.

A dispatcher reads the next committed changes (:mod:`fhir_server.storage.change_feed`) and, for
every active (or erroring) Subscription whose search is on the changed resource's type, decides
whether the change is one of its events:

1. a topic-based Subscription's topic must fire on it (its interaction and FHIRPath criterion
   over the written version and the one before, :mod:`.topics`);
2. the search engine's in-memory matcher (:mod:`fhir_server.search.matcher`) evaluates the
   criteria's clauses that need no other resource against the current resource: a cheap
   pre-filter that only ever lets through a superset;
3. for what is left, the owner's own search — the criteria plus ``_id``, one search per
   Subscription and round for all its candidates — decides, so the search engine and the access
   policy decide exactly as for the owner's requests (a resource the owner may not read matches
   nothing: not even its id is ever sent).

Each match becomes a row of the delivery queue
(:data:`~fhir_server.storage.subscription_schema.subscription_delivery`) with the
Subscription's next event number and channel. The rows and the moved cursor commit together, in
a short transaction that first checks, under the cursor's row lock, that no other dispatcher
moved it meanwhile (then this round's work is dropped and redone from the new position): a
change becomes notifications once, whichever worker dies when, and the searches run outside any
write transaction. On PostgreSQL a dispatcher also takes a transaction-level advisory lock for
the round, so that two processes woken by the same change do not both do the matching.

Only changes made after a Subscription was created count for it. A deletion matches nothing
(the resource is gone; R4 criteria select resources that exist).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import bindparam, delete, func, insert, select, tuple_, update

from fhir_server.auth.principal import Principal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.deliveries import load_listening, readable_ids, visible_focus
from fhir_server.messaging.subscriptions import Spec
from fhir_server.search.matcher import MemoryStore
from fhir_server.search.query import Clause, parse_query
from fhir_server.search.types.base import ValueContext, unescape
from fhir_server.storage import change_feed, wakeups
from fhir_server.storage.engine import execute_constant_many, write_connection
from fhir_server.storage.index_schema import idx_reference
from fhir_server.storage.records import utc_now
from fhir_server.storage.schema import resource, resource_history
from fhir_server.storage.subscription_schema import subscription_delivery, subscription_owner

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Connection

    from fhir_server.search.registry import SearchRegistry
    from fhir_server.storage.change_feed import Change
    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

CURSOR = "subscriptions"
_ROUND_LOCK = 0x4D534F5355424453  # "MSOSUBDS": one dispatcher's matching at a time (PostgreSQL)
_LEADER_LOCK = 0x4D534F5355424C44  # "MSOSUBLD": the leading dispatcher (Leadership)
_LOAD_CHUNK = 200
LEADER_RETRY = 1.0
"""Seconds between two attempts of a process that does not dispatch to become the leader."""


@dataclass(frozen=True, slots=True)
class Listener:
    """A Subscription that hears changes: what it listens for, its owner, since when; its
    anchor: a reference the resource must hold (``based-on=ServiceRequest/1``), if it has one,
    matched on the resource's stored index rows; the other clauses of its search that the
    in-memory matcher evaluates; and whether anchor and matcher judge all of them (``exact``:
    only the access policy is then left to ask)."""

    sub_id: str
    spec: Spec
    owner: Principal
    since: datetime
    local: tuple[Clause, ...]  # the local clauses but the anchor's
    exact: bool
    anchor: tuple[int, str, str] | None  # (hash identity, target type, target id)


class Listeners:
    """The listening Subscriptions of a round, found per change without looking at each: those
    with an anchor by the reference they need, the others by type."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.types: set[str] = set()
        self.topic_types: set[str] = set()
        self._anchored: dict[tuple[str, int, str, str], list[Listener]] = defaultdict(list)
        self._others: dict[str, list[Listener]] = defaultdict(list)
        for listener in listeners:
            res_type = listener.spec.criteria.res_type
            self.types.add(res_type)
            if listener.spec.topic is not None:
                self.topic_types.add(res_type)
            if listener.anchor is not None:
                self._anchored[(res_type, *listener.anchor)].append(listener)
            else:
                self._others[res_type].append(listener)

    @property
    def anchor_identities(self) -> set[int]:
        """The hash identities of the reference parameters some listener is anchored on."""
        return {key[1] for key in self._anchored}

    def for_change(self, res_type: str, refs: Iterable[tuple[int, str, str]]) -> list[Listener]:
        """The listeners a resource of ``res_type`` holding the references ``refs`` (hash
        identity, target type, target id) may concern."""
        found = list(self._others.get(res_type, ()))
        for ref in refs:
            found.extend(self._anchored.get((res_type, *ref), ()))
        return found


@dataclass(slots=True)
class _Loaded:
    """A changed resource as the round sees it: its row id and current content, and for topics
    its versions written in the round and the ones before them, and the stored references the
    listeners are anchored on."""

    pid: int
    current: dict[str, Any] | None = None
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    refs: list[tuple[int, str, str]] = field(default_factory=list)
    _store: MemoryStore | None = None

    def store(self, registry: SearchRegistry) -> MemoryStore | None:
        """The current resource in the in-memory matcher (its index rows extracted once, when
        a listener first needs them)."""
        if self._store is None and self.current is not None:
            self._store = MemoryStore(registry, [self.current])
        return self._store


class Leadership:
    """Which process dispatches (PostgreSQL): the one holding a session advisory lock on a
    connection of its own. Any process may dispatch, and correctness never depends on who
    does (the feed cursor's row lock and position check do that), but rounds that alternate
    between processes each find their cache of listeners stale and their compiled access
    statements cold: one leader keeps both warm. The lock goes with the leader's connection
    (a killed process's too), and another process takes it at its next look, at most
    :data:`LEADER_RETRY` seconds later. On SQLite every dispatcher may go."""

    def __init__(self) -> None:
        self._conn: Any = None  # the connection holding the lock
        self._spare: Any = None  # a connection of its own that tried and failed: kept
        self._next_try = 0.0

    @property
    def leading(self) -> bool:
        """Whether this dispatcher held the lock at its last look (PostgreSQL)."""
        return self._conn is not None

    def holds(self, repo: Repository) -> bool:
        """Whether this dispatcher leads now (trying to become leader if it is time)."""
        if not repo.postgres:
            return True
        now = time.monotonic()
        if self._conn is not None:
            if now < self._next_try:
                return True
            self._next_try = now + LEADER_RETRY
            try:  # still connected, so still holding the lock?
                self._conn.execute("SELECT 1")
                return True
            except Exception:  # the connection is gone, and the lock with it
                self.release()
        if now < self._next_try:
            return False
        self._next_try = now + LEADER_RETRY
        driver, self._spare = self._spare, None
        if driver is None:
            raw = repo.engine.raw_connection()
            driver = raw.driver_connection
            raw.detach()  # a connection of its own: the lock lives as long as it does
            driver.autocommit = True
        try:
            got = driver.execute("SELECT pg_try_advisory_lock(%s)", (_LEADER_LOCK,)).fetchone()
        except Exception:
            with contextlib.suppress(Exception):
                driver.close()
            raise
        if got and got[0]:
            self._conn = driver
            return True
        self._spare = driver  # for the next try: no new connection every second
        return False

    def release(self) -> None:
        """Give up leadership (closing the connection releases the lock)."""
        for conn in (self._conn, self._spare):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conn = self._spare = None


class ListenerCache:
    """The listening Subscriptions, kept from one round to the next by one dispatcher.

    Loading and parsing them each round would cost more than the round's matching once there
    are hundreds. A Subscription is a resource, so any change to one (created, switched off,
    set to error, deleted) is itself in the feed: the cache is reloaded when a round's changes
    include a Subscription, or when the round does not start where this cache's last round
    ended (another process's dispatcher handled the changes in between)."""

    def __init__(self) -> None:
        self._found: Listeners | None = None
        self._at: change_feed.Position | None = None

    def get(
        self, repo: Repository, start: change_feed.Position, changes: list[Change]
    ) -> Listeners:
        """The listeners for a round over ``changes``, which starts after ``start``."""
        if (
            self._found is None
            or self._at != start
            or any(c.res_type == "Subscription" for c in changes)
        ):
            self._found = _listeners(repo)
        self._at = changes[-1].position if changes else start
        return self._found

    def forget(self) -> None:
        """Reload on the next round (its round was not committed)."""
        self._found = None

    @property
    def none_listen(self) -> bool:
        """The last round found no listening Subscription at all."""
        return self._found is not None and not self._found.types


def dispatch_once(
    repo: Repository,
    *,
    batch: int = 500,
    queued: Callable[[], None] | None = None,
    cache: ListenerCache | None = None,
    leadership: Leadership | None = None,
) -> int:
    """Turn the next committed changes into queued notifications; how many changes were
    handled (0: the feed is drained, or another dispatcher is at it). ``queued`` is called
    after a commit that queued notifications (the local websocket hub's wake-up; other
    processes are woken by a NOTIFY on PostgreSQL); ``cache`` keeps the listening
    Subscriptions between the rounds of one dispatcher; with ``leadership`` only the leading
    process dispatches (:class:`Leadership`)."""
    if leadership is not None and not leadership.holds(repo):
        return 0  # another process dispatches
    with repo.engine.connect() as conn:
        position = change_feed.position_of(conn, CURSOR)
        changes = change_feed.read(conn, position, limit=batch)
    if not changes:
        return 0  # (an idle poll takes no lock)
    with _round_lock(repo, leadership is None) as mine:
        if not mine:
            return 0
        # the matching searches run outside the write transaction (SQLite has one writer)
        listeners = (cache or ListenerCache()).get(repo, position, changes)
        matched = _match(repo, listeners, changes)
        with write_connection(repo.engine) as conn, conn.begin():
            if change_feed.position_of(conn, CURSOR, for_update=True) != position:
                if cache is not None:
                    cache.forget()
                return 0  # another dispatcher handled these changes meanwhile
            if matched:
                _enqueue(conn, matched)
            change_feed.save_position(conn, CURSOR, changes[-1].position)
            if matched:
                wakeups.notify(conn, wakeups.EVENTS)
    if matched and queued is not None:
        queued()
    return len(changes)


@contextmanager
def _round_lock(repo: Repository, needed: bool = True) -> Iterator[bool]:
    """Whether this dispatcher may do a round now (on PostgreSQL, unless a leader does it
    anyway: an advisory lock held for the round by a transaction that writes nothing, so it
    holds back no change-feed horizon)."""
    if not repo.postgres or not needed:
        yield True
        return
    with repo.engine.connect() as conn, conn.begin():
        yield bool(conn.execute(select(func.pg_try_advisory_xact_lock(_ROUND_LOCK))).scalar_one())


def _listeners(repo: Repository) -> Listeners:
    """The Subscriptions listening now: one query for all (a round with changes runs it; per
    Subscription it would grow with their number)."""
    found = []
    for sub in load_listening(repo):
        local, exact, anchor = _clauses(repo.registry, sub.spec)
        assert sub.since is not None
        found.append(Listener(sub.sub_id, sub.spec, sub.owner, sub.since, local, exact, anchor))
    return Listeners(found)


def _clauses(
    registry: SearchRegistry, spec: Spec
) -> tuple[tuple[Clause, ...], bool, tuple[int, str, str] | None]:
    """The clauses of the Subscription's search that the in-memory matcher evaluates on the
    resource alone (no chain, reverse chain, ``_filter`` or ``_list``), whether that is all of
    them, and an anchor among them: a plain reference parameter with one ``Type/id`` value."""
    res_type = spec.criteria.res_type
    try:
        query = parse_query(registry, (res_type,), spec.criteria.params)
    except FhirError:
        return (), False, None
    local = tuple(
        c
        for c in query.clauses
        if c.chain is None and c.has is None and c.filter is None and c.code != "_list"
    )
    exact = len(local) == len(query.clauses)
    for clause in local:
        param = registry.get(res_type, clause.code) if clause.param is not None else None
        if param is None or param.type != "reference" or clause.modifier or len(clause.values) != 1:
            continue
        target_type, slash, target_id = unescape(clause.values[0]).partition("/")
        if slash and target_type in registry.resource_types and "/" not in target_id:
            rest = tuple(c for c in local if c is not clause)
            return rest, exact, (param.identity(res_type), target_type, target_id)
    return local, exact, None


def _match(
    repo: Repository, listeners: Listeners, changes: list[Change]
) -> list[tuple[Listener, Change]]:
    """The (listener, change) pairs that are events, in feed order."""
    relevant = [c for c in changes if c.method != "delete" and c.res_type in listeners.types]
    if not relevant:
        return []
    loaded = _load(repo, relevant, listeners.topic_types, listeners.anchor_identities)
    vc = ValueContext()
    fired: dict[tuple[str, int], bool] = {}
    pairs: list[tuple[Listener, Change, _Loaded, bool]] = []
    for index, change in enumerate(relevant):
        seen = loaded.get((change.res_type, change.res_id))
        if seen is None or seen.current is None:
            continue  # deleted since
        for listener in listeners.for_change(change.res_type, seen.refs):
            if change.at < listener.since:
                continue
            topic = listener.spec.topic
            if topic is not None:
                memo = (topic.url, index)
                if memo not in fired:  # once per topic and change, however many listen
                    fired[memo] = topic.fires(
                        change.method, seen.versions.get(change.version),
                        seen.versions.get(change.version - 1),
                    )  # fmt: skip
                if not fired[memo]:
                    continue
            judged = _prefilter(repo.registry, seen, listener, vc)
            if judged is not False:  # True, or None: the search decides
                pairs.append((listener, change, seen, judged is None or not listener.exact))
    if not pairs:
        return []
    decided = _decide(repo, pairs)
    return [(lst, c) for lst, c, seen, _ in pairs if (lst.sub_id, seen.pid) in decided]


def _decide(
    repo: Repository, pairs: list[tuple[Listener, Change, _Loaded, bool]]
) -> set[tuple[str, int]]:
    """The (Subscription, resource row) pairs that are events. Where the matcher judged the
    whole criteria, the owner's read access decides (one query per listener); elsewhere the
    owner's own search, ``_id`` added (:func:`~.deliveries.readable_ids`)."""
    checks: dict[tuple[str, bool], tuple[Listener, dict[int, str]]] = {}
    for listener, change, seen, searched in pairs:
        entry = checks.setdefault((listener.sub_id, searched), (listener, {}))
        entry[1][seen.pid] = change.res_id
    decided: set[tuple[str, int]] = set()
    for (_, searched), (listener, rows) in checks.items():
        if not searched:
            allowed = visible_focus(repo, listener.owner, rows.keys())
        else:
            ids = readable_ids(
                repo, listener.owner, listener.spec.criteria.res_type, rows.values(),
                listener.spec.criteria.params,
            )  # fmt: skip
            allowed = {pid for pid, res_id in rows.items() if res_id in ids}
        decided.update((listener.sub_id, pid) for pid in allowed)
    return decided


def _prefilter(
    registry: SearchRegistry, seen: _Loaded, listener: Listener, vc: ValueContext
) -> bool | None:
    """Whether the listener's local clauses (its anchor matched already) hold for the current
    resource; ``None`` when the matcher could not judge one (the search then decides)."""
    if not listener.local:
        return True
    store = seen.store(registry)
    if store is None or seen.current is None:
        return True
    key = (seen.current["resourceType"], seen.current["id"])
    try:
        return all(store.matches(key, clause, vc) for clause in listener.local)
    except Exception:  # a value the matcher does not take (the search answers properly)
        log.info("Subscription %s: the matcher could not judge a clause", listener.sub_id)
        return None


def _load(
    repo: Repository, changes: list[Change], topic_types: set[str], anchors: set[int]
) -> dict[tuple[str, str], _Loaded]:
    """The changed resources' row ids and current content, and for ``topic_types`` the versions
    written in the round with the ones before them (for the topics' criteria), in a few
    queries."""
    keys = sorted({(c.res_type, c.res_id) for c in changes})
    out: dict[tuple[str, str], _Loaded] = {}
    r = resource.c
    with repo.engine.connect() as conn:
        for start in range(0, len(keys), _LOAD_CHUNK):
            chunk = keys[start : start + _LOAD_CHUNK]
            rows = conn.execute(
                select(r.pid, r.res_type, r.res_id, r.deleted, r.content).where(
                    tuple_(r.res_type, r.res_id).in_(chunk)
                )
            ).all()
            for row in rows:
                body = None if row.deleted or row.content is None else orjson.loads(row.content)
                out[(row.res_type, row.res_id)] = _Loaded(int(row.pid), body)
        versions = {
            (c.res_type, c.res_id, v)
            for c in changes
            if c.res_type in topic_types
            for v in (c.version, c.version - 1)
            if v > 0
        }
        written = _versions(conn, versions)
        if anchors:
            by_pid = {seen.pid: seen for seen in out.values() if seen.current is not None}
            for pid, ref in _references(conn, list(by_pid), anchors):
                by_pid[pid].refs.append(ref)
    for (res_type, res_id, version), body in written.items():
        if (res_type, res_id) in out:
            out[(res_type, res_id)].versions[version] = body
    return out


def _references(
    conn: Connection, pids: list[int], identities: set[int]
) -> list[tuple[int, tuple[int, str, str]]]:
    """The stored reference index rows of the resources ``pids`` for the parameters
    ``identities``: what the search engine matches a reference criterion on."""
    x = idx_reference.c
    out = []
    for start in range(0, len(pids), _LOAD_CHUNK):
        rows = conn.execute(
            select(x.pid, x.hash_identity, x.target_type, x.target_id).where(
                x.pid.in_(pids[start : start + _LOAD_CHUNK]),
                x.hash_identity.in_(sorted(identities)),
            )
        ).all()
        out.extend((int(r.pid), (int(r.hash_identity), r.target_type, r.target_id)) for r in rows)
    return out


def _versions(
    conn: Connection, wanted: set[tuple[str, str, int]]
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The stored content of the given (type, id, version)s."""
    h, r = resource_history.c, resource.c
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    items = sorted(wanted)
    for start in range(0, len(items), _LOAD_CHUNK):
        chunk = items[start : start + _LOAD_CHUNK]
        rows = conn.execute(
            select(r.res_type, r.res_id, h.version, h.content)
            .select_from(resource_history.join(resource, r.pid == h.pid))
            .where(tuple_(r.res_type, r.res_id, h.version).in_(chunk))
        ).all()
        for row in rows:
            if row.content is not None:
                out[(row.res_type, row.res_id, row.version)] = orjson.loads(row.content)
    return out


def _enqueue(conn: Connection, matched: list[tuple[Listener, Change]]) -> None:
    """Queue the round's events: each Subscription's count moved once for all its events (they
    take the numbers after it, in feed order), then one INSERT for every row."""
    per_sub: dict[str, int] = defaultdict(int)
    for listener, _ in matched:
        per_sub[listener.sub_id] += 1
    next_number: dict[str, int] = {}
    for sub_id, count in per_sub.items():
        last = conn.execute(
            update(subscription_owner)
            .where(subscription_owner.c.sub_id == sub_id)
            .values(events=subscription_owner.c.events + count)
            .returning(subscription_owner.c.events)
        ).scalar_one()
        next_number[sub_id] = int(last) - count + 1
    now = utc_now()
    rows = []
    for listener, change in matched:
        number = next_number[listener.sub_id]
        next_number[listener.sub_id] = number + 1
        rows.append(
            {
                "sub_id": listener.sub_id,
                "event_no": number,
                "res_type": change.res_type,
                "res_id": change.res_id,
                "version": change.version,
                "due": now,
                "created": now,
                "channel": listener.spec.channel,
            }
        )
    execute_constant_many(conn, _QUEUE_INSERT, rows)


_QUEUE_INSERT = insert(subscription_delivery).values(
    status="pending",
    attempts=0,
    **{
        name: bindparam(name)
        for name in ("sub_id", "event_no", "res_type", "res_id", "version", "due", "created",
                     "channel")
    },
)  # fmt: skip


def prune_feed(repo: Repository, retention_hours: float) -> int:
    """Delete what is older than ``retention_hours`` (``MSO_CHANGE_FEED_RETENTION_HOURS``) and
    done with: the feed's changes the dispatcher has read, and settled notifications (sent,
    dropped or given up; websocket events, which are read rather than settled, once they are
    that old: ``$events`` replays the retention window); how many rows went."""
    before = utc_now() - timedelta(hours=retention_hours)
    d = subscription_delivery.c
    with write_connection(repo.engine) as conn, conn.begin():
        read = change_feed.position_of(conn, CURSOR, for_update=True)
        gone = change_feed.prune(conn, read, before)
        settled = delete(subscription_delivery).where(
            d.created < before,
            (d.channel == "websocket") | d.status.in_(("sent", "dropped", "failed")),
        )
        return gone + (conn.execute(settled).rowcount or 0)
