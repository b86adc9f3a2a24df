"""Websocket binding tokens (Subscriptions R5 Backport IG, ``$get-ws-binding-token``).

A browser cannot set an ``Authorization`` header on a websocket, so a client asks for a binding
token over the authenticated REST API and sends ``bind-with-token <token>`` on the socket. The
token is 256 random bits, kept only as its SHA-256 digest with the caller (as the Subscription
owner is kept) and the Subscriptions it binds, and honoured until it expires
(``MSO_SUBSCRIPTION_WS_TOKEN_SECONDS``) — for any number of reconnects, so a client that lost its
socket binds again with the same token and replays what it missed with ``$events`` — as long as
the access token it was issued under is still honoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import orjson
from sqlalchemy import delete, insert, select

from fhir_server.auth.principal import Principal
from fhir_server.auth.secrets import digest, new_token
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging.deliveries import Listening, listening, still_enabled
from fhir_server.messaging.subscriptions import WEBSOCKET
from fhir_server.storage.engine import write_connection
from fhir_server.storage.records import as_utc, utc_now
from fhir_server.storage.subscription_schema import subscription_binding

if TYPE_CHECKING:
    from fhir_server.storage.repository import Repository

_b = subscription_binding.c


@dataclass(frozen=True, slots=True)
class Binding:
    """What a redeemed token binds: whose, which Subscriptions."""

    principal: Principal
    subs: tuple[str, ...]


def issue(
    repo: Repository, principal: Principal, subs: list[str], seconds: float
) -> tuple[str, datetime]:
    """A new binding token for ``subs`` and when it expires (expired tokens are deleted)."""
    token = new_token()
    expires = utc_now() + timedelta(seconds=seconds)
    with write_connection(repo.engine) as conn, conn.begin():
        conn.execute(delete(subscription_binding).where(_b.expires < utc_now()))
        conn.execute(
            insert(subscription_binding).values(
                digest=digest(token),
                principal=orjson.dumps(principal.to_dict()).decode(),
                subs=orjson.dumps(subs).decode(),
                expires=expires,
            )
        )
    return token, expires


def redeem(repo: Repository, token: str) -> Binding | None:
    """What ``token`` binds, or ``None`` when it is unknown, expired, or its access token is
    no longer honoured."""
    with repo.engine.connect() as conn:
        row = conn.execute(
            select(_b.principal, _b.subs, _b.expires).where(_b.digest == digest(token))
        ).first()
    if row is None or as_utc(row.expires) <= utc_now():
        return None
    principal = Principal.from_dict(orjson.loads(row.principal))
    if not still_enabled(repo, principal):
        return None
    return Binding(principal, tuple(orjson.loads(row.subs)))


def bindable(repo: Repository, principal: Principal, sub_id: str) -> Listening | str:
    """The Subscription ``sub_id`` if ``principal`` may bind it to a websocket — it may read
    it (the access policy), owns it, and it is an active websocket Subscription — else why not
    (the same words whatever the reason: nothing is said about others' Subscriptions)."""
    refused = f"Subscription/{sub_id} is not an active websocket Subscription of yours"
    try:
        with repo.unit(caller=principal, snapshot=False) as tx:
            tx.read("Subscription", sub_id)
    except FhirError:
        return refused
    sub = listening(repo, sub_id)
    if sub is None or sub.spec.channel != WEBSOCKET or sub.owner.subject != principal.subject:
        return refused
    return sub
