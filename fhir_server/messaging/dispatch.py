"""From the change feed to notifications: which Subscription hears of which change.

A dispatcher reads the next committed changes (:mod:`fhir_server.storage.change_feed`) and,
for every active (or erroring) Subscription whose criteria's type is the changed resource's,
asks the search engine whether the resource matches — the criteria plus ``_id``, searched as
the Subscription's owner, so the access policy decides exactly as for the owner's own search (a
resource the owner may not read matches nothing: not even its id is ever sent). Each match
becomes a row of the delivery queue
(:data:`~fhir_server.storage.subscription_schema.subscription_delivery`) with the
Subscription's next event number. The rows and the moved cursor commit together, in a short
transaction that first checks, under the cursor's row lock, that no other dispatcher moved it
meanwhile (then this round's work is dropped and redone from the new position): a change
becomes notifications once, whichever worker dies when, and the searches run outside any
write transaction.

Only changes made after a Subscription was created count for it. A deletion matches nothing
(the resource is gone; R4 criteria select resources that exist).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import and_, delete, insert, select, update

from fhir_server.auth.principal import Principal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.subscriptions import Criteria, parse_criteria
from fhir_server.storage import change_feed
from fhir_server.storage.engine import write_connection
from fhir_server.storage.records import as_utc, utc_now
from fhir_server.storage.schema import resource
from fhir_server.storage.subscription_schema import subscription_delivery, subscription_owner

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Connection

    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

CURSOR = "subscriptions"
LISTENING = ("active", "error")


@dataclass(frozen=True, slots=True)
class Listener:
    """A Subscription that hears changes: its criteria, owner and creation time."""

    sub_id: str
    criteria: Criteria
    owner: Principal
    since: datetime


def dispatch_once(repo: Repository, *, batch: int = 500) -> int:
    """Turn the next committed changes into queued notifications; how many changes were
    handled (0: the feed is drained, or another dispatcher moved first)."""
    with repo.engine.connect() as conn:
        position = change_feed.position_of(conn, CURSOR)
        changes = change_feed.read(conn, position, limit=batch)
    if not changes:
        return 0
    # matching searches run outside the write transaction (SQLite has one writer at a time)
    listeners = _listeners(repo)
    matched = [
        (listener.sub_id, change)
        for change in changes
        for listener in listeners.get(change.res_type, ())
        if change.method != "delete"
        and change.at >= listener.since
        and _matches(repo, listener, change.res_id)
    ]
    with write_connection(repo.engine) as conn, conn.begin():
        if change_feed.position_of(conn, CURSOR, for_update=True) != position:
            return 0  # another dispatcher handled these changes meanwhile
        for sub_id, change in matched:
            _enqueue(conn, sub_id, change)
        change_feed.save_position(conn, CURSOR, changes[-1].position)
    return len(changes)


def _listeners(repo: Repository) -> dict[str, list[Listener]]:
    """The Subscriptions listening now, by the type of their criteria: one query for all
    (a round with changes runs it; per Subscription it would grow with their number)."""
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
        criteria = parse_criteria(str(body.get("criteria") or ""))
        principal = Principal.from_dict(orjson.loads(row.principal))
        found[criteria.res_type].append(
            Listener(row.sub_id, criteria, principal, as_utc(row.created))
        )
    return found


def _matches(repo: Repository, listener: Listener, res_id: str) -> bool:
    """Whether the resource matches the criteria in the owner's own search."""
    params = [*listener.criteria.params, ("_id", res_id)]
    try:
        with repo.unit(caller=listener.owner, snapshot=False) as tx:
            return bool(tx.find(listener.criteria.res_type, params, limit=1))
    except FhirError as err:  # the owner's scopes no longer allow the search, a bad value …
        log.info("Subscription %s matches nothing: %s", listener.sub_id, err.code)
        return False


def _enqueue(conn: Connection, sub_id: str, change: Any) -> None:
    number = conn.execute(
        update(subscription_owner)
        .where(subscription_owner.c.sub_id == sub_id)
        .values(events=subscription_owner.c.events + 1)
        .returning(subscription_owner.c.events)
    ).scalar_one()
    now = utc_now()
    conn.execute(
        insert(subscription_delivery).values(
            sub_id=sub_id,
            event_no=number,
            res_type=change.res_type,
            res_id=change.res_id,
            version=change.version,
            status="pending",
            attempts=0,
            due=now,
            created=now,
        )
    )


def prune_feed(repo: Repository, retention_hours: float) -> int:
    """Delete what is older than ``retention_hours`` (``MSO_CHANGE_FEED_RETENTION_HOURS``) and
    done with: the feed's changes the dispatcher has read, and settled notifications (sent,
    dropped or given up); how many rows went."""
    before = utc_now() - timedelta(hours=retention_hours)
    d = subscription_delivery.c
    with write_connection(repo.engine) as conn, conn.begin():
        read = change_feed.position_of(conn, CURSOR, for_update=True)
        gone = change_feed.prune(conn, read, before)
        settled = delete(subscription_delivery).where(
            d.status.in_(("sent", "dropped", "failed")), d.created < before
        )
        return gone + (conn.execute(settled).rowcount or 0)
