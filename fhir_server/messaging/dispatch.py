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

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import and_, delete, func, insert, select, tuple_, update

from fhir_server.auth.principal import Principal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.deliveries import LISTENING, readable_ids
from fhir_server.messaging.subscriptions import Spec, spec_of
from fhir_server.search.matcher import MemoryStore
from fhir_server.search.query import Clause, parse_query
from fhir_server.search.types.base import ValueContext
from fhir_server.storage import change_feed, wakeups
from fhir_server.storage.engine import write_connection
from fhir_server.storage.records import as_utc, utc_now
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
_LOAD_CHUNK = 200


@dataclass(frozen=True, slots=True)
class Listener:
    """A Subscription that hears changes: what it listens for, its owner, since when, and
    the clauses of its search the in-memory matcher can pre-filter with."""

    sub_id: str
    spec: Spec
    owner: Principal
    since: datetime
    local: tuple[Clause, ...]


@dataclass(slots=True)
class _Loaded:
    """A changed resource as the round sees it: current content, and for topics its versions
    written in the round and the ones before them."""

    current: dict[str, Any] | None = None
    store: MemoryStore | None = None
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)


class ListenerCache:
    """The listening Subscriptions, kept from one round to the next by one dispatcher.

    Loading and parsing them each round would cost more than the round's matching once there
    are hundreds. A Subscription is a resource, so any change to one (created, switched off,
    set to error, deleted) is itself in the feed: the cache is reloaded when a round's changes
    include a Subscription, or when the round does not start where this cache's last round
    ended (another process's dispatcher handled the changes in between)."""

    def __init__(self) -> None:
        self._found: dict[str, list[Listener]] | None = None
        self._at: change_feed.Position | None = None

    def get(
        self, repo: Repository, start: change_feed.Position, changes: list[Change]
    ) -> dict[str, list[Listener]]:
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


def dispatch_once(
    repo: Repository,
    *,
    batch: int = 500,
    queued: Callable[[], None] | None = None,
    cache: ListenerCache | None = None,
) -> int:
    """Turn the next committed changes into queued notifications; how many changes were
    handled (0: the feed is drained, or another dispatcher is at it). ``queued`` is called
    after a commit that queued notifications (the local websocket hub's wake-up; other
    processes are woken by a NOTIFY on PostgreSQL); ``cache`` keeps the listening
    Subscriptions between the rounds of one dispatcher."""
    with repo.engine.connect() as conn:
        position = change_feed.position_of(conn, CURSOR)
        changes = change_feed.read(conn, position, limit=batch)
    if not changes:
        return 0  # (an idle poll takes no lock)
    with _round_lock(repo) as mine:
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
            for listener, change in matched:
                _enqueue(conn, listener, change)
            change_feed.save_position(conn, CURSOR, changes[-1].position)
            if matched:
                wakeups.notify(conn, wakeups.EVENTS)
    if matched and queued is not None:
        queued()
    return len(changes)


@contextmanager
def _round_lock(repo: Repository) -> Iterator[bool]:
    """Whether this dispatcher may do a round now (on PostgreSQL: an advisory lock held for the
    round by a transaction that writes nothing, so it holds back no change-feed horizon)."""
    if not repo.postgres:
        yield True
        return
    with repo.engine.connect() as conn, conn.begin():
        yield bool(conn.execute(select(func.pg_try_advisory_xact_lock(_ROUND_LOCK))).scalar_one())


def _listeners(repo: Repository) -> dict[str, list[Listener]]:
    """The Subscriptions listening now, by the type their search is on: one query for all (a
    round with changes runs it; per Subscription it would grow with their number)."""
    o, r = subscription_owner.c, resource.c
    stmt = (
        select(o.sub_id, o.principal, o.created, r.content)
        .select_from(
            subscription_owner.join(
                resource, and_(r.res_type == "Subscription", r.res_id == o.sub_id)
            )
        )
        .where(r.deleted.is_(False))
    )
    found: dict[str, list[Listener]] = defaultdict(list)
    with repo.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    for row in rows:
        body = orjson.loads(row.content or b"{}")
        if body.get("status") not in LISTENING:
            continue
        spec = spec_of(body)
        principal = Principal.from_dict(orjson.loads(row.principal))
        local = _local_clauses(repo.registry, spec)
        found[spec.criteria.res_type].append(
            Listener(row.sub_id, spec, principal, as_utc(row.created), local)
        )
    return found


def _local_clauses(registry: SearchRegistry, spec: Spec) -> tuple[Clause, ...]:
    """The clauses of the Subscription's search that the in-memory matcher evaluates on the
    resource alone (no chain, reverse chain, ``_filter`` or ``_list``)."""
    try:
        query = parse_query(registry, (spec.criteria.res_type,), spec.criteria.params)
    except FhirError:
        return ()
    return tuple(
        c
        for c in query.clauses
        if c.chain is None and c.has is None and c.filter is None and c.code != "_list"
    )


def _match(
    repo: Repository, listeners: dict[str, list[Listener]], changes: list[Change]
) -> list[tuple[Listener, Change]]:
    """The (listener, change) pairs that are events, in feed order."""
    relevant = [c for c in changes if c.method != "delete" and listeners.get(c.res_type)]
    if not relevant:
        return []
    loaded = _load(repo, relevant, listeners)
    vc = ValueContext()
    candidates: dict[str, set[str]] = defaultdict(set)
    pairs: list[tuple[Listener, Change]] = []
    for change in relevant:
        seen = loaded.get((change.res_type, change.res_id))
        if seen is None or seen.current is None:
            continue  # deleted since
        for listener in listeners[change.res_type]:
            if change.at < listener.since:
                continue
            topic = listener.spec.topic
            if topic is not None and not topic.fires(
                change.method, seen.versions.get(change.version),
                seen.versions.get(change.version - 1),
            ):  # fmt: skip
                continue
            if not _prefilter(seen, listener, vc):
                continue
            candidates[listener.sub_id].add(change.res_id)
            pairs.append((listener, change))
    if not pairs:
        return []
    matched: dict[str, set[str]] = {}
    for listener in {p[0].sub_id: p[0] for p in pairs}.values():
        matched[listener.sub_id] = readable_ids(
            repo,
            listener.owner,
            listener.spec.criteria.res_type,
            candidates[listener.sub_id],
            listener.spec.criteria.params,
        )
    return [(lst, c) for lst, c in pairs if c.res_id in matched[lst.sub_id]]


def _prefilter(seen: _Loaded, listener: Listener, vc: ValueContext) -> bool:
    if not listener.local or seen.store is None or seen.current is None:
        return True
    key = (seen.current["resourceType"], seen.current["id"])
    try:
        return all(seen.store.matches(key, clause, vc) for clause in listener.local)
    except Exception:  # anything the matcher cannot judge goes to the search
        return True


def _load(
    repo: Repository, changes: list[Change], listeners: dict[str, list[Listener]]
) -> dict[tuple[str, str], _Loaded]:
    """The changed resources' current content (and, where a topic's criterion needs them, the
    version written and the one before), in a few queries."""
    keys = sorted({(c.res_type, c.res_id) for c in changes})
    out: dict[tuple[str, str], _Loaded] = {}
    r = resource.c
    with repo.engine.connect() as conn:
        for start in range(0, len(keys), _LOAD_CHUNK):
            chunk = keys[start : start + _LOAD_CHUNK]
            rows = conn.execute(
                select(r.res_type, r.res_id, r.deleted, r.content).where(
                    tuple_(r.res_type, r.res_id).in_(chunk)
                )
            ).all()
            for row in rows:
                body = None if row.deleted or row.content is None else orjson.loads(row.content)
                out[(row.res_type, row.res_id)] = _Loaded(current=body)
        versions = {
            (c.res_type, c.res_id, v)
            for c in changes
            if any(lst.spec.topic for lst in listeners[c.res_type])
            for v in (c.version, c.version - 1)
            if v > 0
        }
        written = _versions(conn, versions)
    for (res_type, res_id, version), body in written.items():
        if (res_type, res_id) in out:
            out[(res_type, res_id)].versions[version] = body
    for seen in out.values():
        if seen.current is not None:
            seen.store = MemoryStore(repo.registry, [seen.current])
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


def _enqueue(conn: Connection, listener: Listener, change: Change) -> None:
    number = conn.execute(
        update(subscription_owner)
        .where(subscription_owner.c.sub_id == listener.sub_id)
        .values(events=subscription_owner.c.events + 1)
        .returning(subscription_owner.c.events)
    ).scalar_one()
    now = utc_now()
    conn.execute(
        insert(subscription_delivery).values(
            sub_id=listener.sub_id,
            event_no=number,
            res_type=change.res_type,
            res_id=change.res_id,
            version=change.version,
            status="pending",
            attempts=0,
            due=now,
            created=now,
            channel=listener.spec.channel,
        )
    )


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
