"""The Subscriptions R5 Backport IG's operations on R4 Subscriptions
(http://hl7.org/fhir/uv/subscriptions-backport/operations.html):

* ``GET [base]/Subscription/[id]/$status`` and ``GET [base]/Subscription/$status?id=…`` (without
  ``id``: every Subscription the caller may read): a ``searchset`` Bundle of subscription
  status Parameters (type ``query-status``: status, topic, events since the start, error).
* ``GET [base]/Subscription/[id]/$events?eventsSinceNumber=&eventsUntilNumber=&content=``: the
  Subscription's past events as a notification Bundle (type ``query-event``), oldest first, at
  most :data:`MAX_EVENTS` a call (ask again from the last number + 1), from the log kept for
  ``MSO_CHANGE_FEED_RETENTION_HOURS``. A client that was disconnected replays exactly what it
  missed: event numbers have no gaps. Each event's focus is checked against the caller's access
  now, as a read would be (an event about what the caller may no longer read is left out,
  focus and all).
* ``[base]/Subscription/$get-ws-binding-token?id=…`` and ``[base]/Subscription/[id]/$get-ws-
  binding-token``: a token for ``bind-with-token`` on the websocket (:mod:`fhir_server.
  messaging.ws_binding`), for websocket Subscriptions the caller owns; Parameters with
  ``token``, ``expiration``, ``subscription`` and ``websocket-url``.

Errors: a malformed number or content 400 ``MSO-SUB-400``; a Subscription the caller may not
read 404; one it may not bind 403 ``MSO-SUB-403``.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from itertools import islice
from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read
from fhir_server.interactions.operations import Operation, register
from fhir_server.messaging import ws_binding
from fhir_server.messaging.deliveries import events_of, events_total, read_as, readable_ids
from fhir_server.messaging.notification_bundle import (
    Event,
    notification_bundle,
    status_parameters,
)
from fhir_server.messaging.subscriptions import CONTENTS, spec_of
from fhir_server.messaging.websocket import websocket_url
from fhir_server.storage.records import ID_PATTERN, format_instant

_IG = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/"
MAX_EVENTS = 1000
"""Events one ``$events`` call returns at most."""
MAX_STATUSES = 1000
"""Subscriptions one ``$status`` call without ``id`` reports at most."""


def _bad(message: str, where: str) -> FhirError:
    return FhirError(400, "invalid", message, code="MSO-SUB-400", expression=[where])


def _number(req: FhirRequest, name: str) -> int | None:
    value = req.param(name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise _bad(f"'{name}' is a non-negative event number", name)
    return int(value)


def _subscription(ctx: InteractionContext, sub_id: str) -> dict[str, Any]:
    """The Subscription as the caller reads it (404 when it may not)."""
    return run_read(ctx, lambda tx: tx.read("Subscription", sub_id).resource, snapshot=False)


def _status(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/Subscription/[id]/$status, GET [base]/Subscription/$status?id=…"""
    ids = [req.resource_id] if req.resource_id else _ids(req)
    if ids:
        found = [(sub_id, _subscription(ctx, sub_id)) for sub_id in dict.fromkeys(ids)]
    else:
        found = run_read(
            ctx,
            lambda tx: [
                (s.res_id, s.resource)
                for s in islice(tx.iter_search("Subscription", []), MAX_STATUSES)
            ],
        )
    entries = []
    for sub_id, body in found:
        total = run_read(ctx, lambda tx, s=sub_id: events_total(tx.conn, s))
        status = status_parameters(ctx.base_url, sub_id, body, spec_of(body), "query-status", total)
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status})
    return FhirResponse(
        resource={
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(entries),
            "entry": entries,
        }
    )


def _events(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/Subscription/[id]/$events"""
    sub_id = req.resource_id or ""
    body = _subscription(ctx, sub_id)
    first = _number(req, "eventsSinceNumber") or 1
    last = _number(req, "eventsUntilNumber")
    spec = spec_of(body)
    content = req.param("content")
    if content is not None:
        if content not in CONTENTS:
            raise _bad("'content' is empty, id-only or full-resource", "content")
        spec = replace(spec, content=content)
    events, total = run_read(
        ctx,
        lambda tx: (
            events_of(tx.conn, sub_id, first, last, MAX_EVENTS),
            events_total(tx.conn, sub_id),
        ),
    )
    events = _readable(ctx, events)
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    if spec.content == "full-resource":
        resources = read_as(ctx.repo, ctx.caller, [(e.res_type, e.res_id) for e in events])
    bundle = notification_bundle(
        ctx.base_url, sub_id, body, spec, "query-event", total, events, resources
    )
    return FhirResponse(resource=bundle)


def _readable(ctx: InteractionContext, events: list[Event]) -> list[Event]:
    """The events whose focus the caller may read now."""
    if ctx.caller is None:
        return events
    by_type: dict[str, set[str]] = {}
    for event in events:
        by_type.setdefault(event.res_type, set()).add(event.res_id)
    readable = {
        (res_type, res_id)
        for res_type, ids in by_type.items()
        for res_id in readable_ids(ctx.repo, ctx.caller, res_type, ids)
    }
    return [e for e in events if (e.res_type, e.res_id) in readable]


def _binding_token(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """[base]/Subscription/$get-ws-binding-token, [base]/Subscription/[id]/$get-ws-binding-token"""
    ids = [req.resource_id] if req.resource_id else _ids(req)
    if not ids:
        raise _bad("Name the Subscriptions to bind: 'id' (one or more)", "id")
    if ctx.caller is None:
        raise FhirError(
            401, "login", "A binding token is for an authenticated caller", code="MSO-AUTH-001"
        )
    for sub_id in ids:
        _subscription(ctx, sub_id)  # 404 when the caller may not read it
        refused = ws_binding.bindable(ctx.repo, ctx.caller, sub_id)
        if isinstance(refused, str):
            raise FhirError(403, "forbidden", refused, code="MSO-SUB-403")
    seconds = ctx.settings.subscription_ws_token_seconds
    token, expires = ws_binding.issue(ctx.repo, ctx.caller, ids, seconds)
    parameters: list[dict[str, Any]] = [
        {"name": "token", "valueString": token},
        {"name": "expiration", "valueDateTime": format_instant(expires)},
        *({"name": "subscription", "valueString": sub_id} for sub_id in ids),
        {"name": "websocket-url", "valueUrl": websocket_url(ctx.base_url)},
    ]
    return FhirResponse(resource={"resourceType": "Parameters", "parameter": parameters})


def _ids(req: FhirRequest) -> list[str]:
    ids: list[str] = []
    for key, value in req.params:
        if key == "id":
            ids.extend(v for v in value.split(",") if v)
    body = req.body
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        ids.extend(
            str(p.get("valueId") or p.get("valueString") or "")
            for p in body.get("parameter") or ()
            if p.get("name") == "id"
        )
    for sub_id in ids:
        if not ID_PATTERN.match(sub_id):
            raise _bad("'id' is a Subscription id", "id")
    return list(dict.fromkeys(ids))


_SUBSCRIPTION = frozenset({"Subscription"})
register(
    Operation(
        name="status",
        levels=frozenset({"type", "instance"}),
        handler=_status,
        definition=f"{_IG}backport-subscription-status",
        resource_types=_SUBSCRIPTION,
        documentation="Subscriptions Backport: the status of Subscriptions and their event count",
    )
)
register(
    Operation(
        name="events",
        levels=frozenset({"instance"}),
        handler=_events,
        definition=f"{_IG}backport-subscription-events",
        resource_types=_SUBSCRIPTION,
        documentation="Subscriptions Backport: replay a Subscription's events by event number",
    )
)
register(
    Operation(
        name="get-ws-binding-token",
        levels=frozenset({"type", "instance"}),
        handler=_binding_token,
        definition=f"{_IG}backport-subscription-get-ws-binding-token",
        resource_types=_SUBSCRIPTION,
        documentation="Subscriptions Backport: a token to bind websocket Subscriptions with",
    )
)
