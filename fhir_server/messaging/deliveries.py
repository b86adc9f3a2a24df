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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import func, select

from fhir_server.auth.principal import Principal
from fhir_server.auth.tokens import refusal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.notification_bundle import Event
from fhir_server.messaging.subscriptions import Spec, spec_of
from fhir_server.search.budget import current_limits
from fhir_server.storage.records import as_utc
from fhir_server.storage.subscription_schema import subscription_delivery, subscription_owner

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

LISTENING = ("active", "error")
"""The statuses of a Subscription that hears changes."""

_d = subscription_delivery.c


@dataclass(frozen=True, slots=True)
class Listening:
    """A Subscription that listens now: its stored body, parsed spec and owner."""

    sub_id: str
    body: dict[str, Any]
    spec: Spec
    owner: Principal


def owner_of(conn: Connection, sub_id: str) -> Principal | None:
    """Who created the Subscription ``sub_id`` (``None``: not created through the API)."""
    row = conn.execute(
        select(subscription_owner.c.principal).where(subscription_owner.c.sub_id == sub_id)
    ).first()
    return Principal.from_dict(orjson.loads(row.principal)) if row else None


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
    with repo.unit(snapshot=False) as tx:
        stored = tx.current("Subscription", sub_id)
        if stored is None or stored.deleted:
            return None
        body = stored.resource
        if body.get("status") not in LISTENING:
            return None
        owner = owner_of(tx.conn, sub_id)
    if owner is None or not still_enabled(repo, owner):
        return None
    return Listening(sub_id, body, spec_of(body), owner)


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
