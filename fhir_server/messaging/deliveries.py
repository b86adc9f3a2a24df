"""The notification queue and event log, as its senders read it: who owns a Subscription, whether
it still listens, what its owner may read now, and its events by number.

:mod:`.dispatch` fills :data:`~fhir_server.storage.subscription_schema.subscription_delivery`;
:mod:`.rest_hook` and :mod:`.websocket` send from it and ``$events`` replays it. Every one of them
checks here, at the moment of sending, that the Subscription is still listening, that its owner
still holds a token the server honours (not revoked, its user or client not disabled: a
subscriber whose access is removed stops receiving at once) and may read each focus resource,
with the same search and access policy as the owner's own requests
(:func:`readable_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import and_, func, select

from fhir_server.auth.principal import Principal
from fhir_server.auth.tokens import refusal, refused_among
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.notification_bundle import Event
from fhir_server.messaging.subscriptions import Spec, spec_of
from fhir_server.search.budget import current_limits
from fhir_server.storage.records import as_utc
from fhir_server.storage.schema import resource
from fhir_server.storage.subscription_schema import subscription_delivery, subscription_owner

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Connection

    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

LISTENING = ("active", "error")
"""The statuses of a Subscription that hears changes."""

_d = subscription_delivery.c


@dataclass(frozen=True, slots=True)
class Listening:
    """A Subscription that listens now: its stored body, parsed spec and owner (and since
    when changes count for it)."""

    sub_id: str
    body: dict[str, Any]
    spec: Spec
    owner: Principal
    since: datetime | None = None


def load_listening(repo: Repository, sub_ids: Collection[str] | None = None) -> list[Listening]:
    """The Subscriptions listening now (of ``sub_ids``, or all), in one query: each owner
    joined to its Subscription's current version. Whether the owners' tokens are still
    honoured is not checked here (:func:`still_enabled`)."""
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
    if sub_ids is not None:
        stmt = stmt.where(o.sub_id.in_(sorted(sub_ids)))
    with repo.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    found = []
    for row in rows:
        body = orjson.loads(row.content or b"{}")
        if body.get("status") in LISTENING:
            owner = Principal.from_dict(orjson.loads(row.principal))
            found.append(Listening(row.sub_id, body, spec_of(body), owner, as_utc(row.created)))
    return found


def events_total(conn: Connection, sub_id: str) -> int:
    """How many events the Subscription has had since it began."""
    row = conn.execute(
        select(subscription_owner.c.events).where(subscription_owner.c.sub_id == sub_id)
    ).first()
    return int(row.events) if row else 0


def still_enabled(repo: Repository, owner: Principal) -> bool:
    """The token that created the Subscription is still honoured (not revoked, its user or
    client not disabled: :func:`fhir_server.auth.tokens.refusal`, as for a request; its mere
    expiry does not end the Subscription)."""
    return owner.token_id is None or refusal(repo.engine, owner.token_id) is None


def listening(repo: Repository, sub_id: str) -> Listening | None:
    """The Subscription if it is listening and its owner still enabled, else ``None``."""
    found = listening_among(repo, [sub_id])
    return found.get(sub_id)


def listening_among(repo: Repository, sub_ids: Collection[str]) -> dict[str, Listening]:
    """Those of ``sub_ids`` that listen and whose owners are still enabled, by id."""
    found = {sub.sub_id: sub for sub in load_listening(repo, sub_ids)}
    tokens = {sub.owner.token_id for sub in found.values() if sub.owner.token_id is not None}
    refused = refused_among(repo.engine, tokens)
    return {k: sub for k, sub in found.items() if sub.owner.token_id not in refused}


def visible_focus(repo: Repository, owner: Principal, pids: Collection[int]) -> set[int]:
    """Those of the resource rows ``pids`` that ``owner`` may read now (the read access
    policy, :meth:`~fhir_server.auth.policy.AccessPolicy.visible_pids`)."""
    policy = repo.policy
    if policy is None:
        return set(pids)
    with repo.engine.connect() as conn:
        return policy.visible_pids(conn, owner, sorted(pids))


def readable_ids(
    repo: Repository,
    owner: Principal,
    res_type: str,
    ids: Iterable[str],
    params: list[tuple[str, str]] | None = None,
) -> set[str]:
    """Those of ``ids`` that ``owner`` may read now and that match ``params`` (a search on
    ``res_type``): the owner's own search, ``_id`` added, so the search engine and the access
    policy decide exactly as for the owner's requests. A search the owner may no longer run
    (scopes changed, a value no longer valid) matches nothing."""
    wanted = sorted(set(ids))
    found: set[str] = set()
    size = max(1, current_limits().max_values)
    for start in range(0, len(wanted), size):
        chunk = wanted[start : start + size]
        criteria = [*(params or ()), ("_id", ",".join(chunk))]
        try:
            with repo.unit(caller=owner, snapshot=False) as tx:
                found.update(s.res_id for s in tx.find(res_type, criteria, limit=len(chunk)))
        except FhirError as err:
            log.info("A Subscription search of %s matches nothing: %s", res_type, err.code)
            return set()
    return found


def read_as(
    repo: Repository, owner: Principal, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The current resources ``keys`` (type, id) that ``owner`` may read, as it reads them."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key in dict.fromkeys(keys):
        try:
            with repo.unit(caller=owner, snapshot=False) as tx:
                out[key] = tx.read(*key).resource
        except FhirError:  # gone, or no longer the owner's to read: nothing is said of it
            continue
    return out


def events_of(
    conn: Connection, sub_id: str, first: int, last: int | None, limit: int
) -> list[Event]:
    """The Subscription's events numbered ``first`` to ``last`` (inclusive), oldest first, at
    most ``limit``."""
    conditions = [_d.sub_id == sub_id, _d.event_no >= first]
    if last is not None:
        conditions.append(_d.event_no <= last)
    rows = conn.execute(
        select(_d.event_no, _d.created, _d.res_type, _d.res_id)
        .where(*conditions)
        .order_by(_d.event_no)
        .limit(limit)
    ).all()
    return [Event(int(r.event_no), as_utc(r.created), r.res_type, r.res_id) for r in rows]


def oldest_event(conn: Connection, sub_id: str) -> int | None:
    """The number of the oldest event still kept for the Subscription (older ones were
    pruned after ``MSO_CHANGE_FEED_RETENTION_HOURS``)."""
    value = conn.execute(select(func.min(_d.event_no)).where(_d.sub_id == sub_id)).scalar()
    return int(value) if value is not None else None


def set_status(repo: Repository, sub_id: str, status: str, error: str | None) -> None:
    """Set a Subscription's ``status`` (and ``error``), unless it is gone or ``off``."""

    def work(tx: Any) -> None:
        stored = tx.current("Subscription", sub_id)
        if stored is None or stored.deleted or stored.resource.get("status") == "off":
            return
        body = {k: v for k, v in stored.resource.items() if k != "error"}
        body["status"] = status
        if error:
            body["error"] = error
        tx.update("Subscription", sub_id, body)

    repo.write(work)
