"""The Subscriptions R5 Backport IG's notification Bundles and subscription status, on R4
(http://hl7.org/fhir/uv/subscriptions-backport/notifications.html).

A notification is a ``history`` Bundle whose first entry is the subscription status: in R4 a
``Parameters`` resource of the profile ``backport-subscription-status-r4`` (``subscription``,
``topic``, ``status``, ``type`` — handshake, heartbeat, event-notification, query-status or
query-event —, ``events-since-subscription-start`` and one ``notification-event`` per event with
its ``event-number``, ``timestamp`` and, unless the content is ``empty``, its ``focus``). With
``id-only`` content an entry per focus follows with its ``fullUrl`` and request; with
``full-resource`` the resource too (as the subscriber may read it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_server.messaging.subscriptions import BACKPORT, Spec
from fhir_server.storage.records import format_instant, utc_now

STATUS_PROFILE = f"{BACKPORT}backport-subscription-status-r4"
NOTIFICATION_PROFILE = f"{BACKPORT}backport-subscription-notification-r4"


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a Subscription: its number, when it was queued, and its focus."""

    number: int
    at: datetime
    res_type: str
    res_id: str


def status_parameters(
    base: str,
    sub_id: str,
    subscription: dict[str, Any],
    spec: Spec,
    kind: str,
    total: int,
    events: Sequence[Event] = (),
) -> dict[str, Any]:
    """The subscription status (``Parameters``) of a notification of ``kind`` carrying
    ``events``, ``total`` events having been queued since the Subscription began."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{sub_id}"}},
        {"name": "topic", "valueCanonical": spec.topic.url if spec.topic else ""},
        {"name": "status", "valueCode": subscription.get("status") or "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(total)},
    ]
    if spec.topic is None:
        parameters.pop(1)  # an R4 Subscription has no topic
    for event in events:
        part: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": format_instant(event.at)},
        ]
        if spec.content != "empty":
            part.append(
                {
                    "name": "focus",
                    "valueReference": {"reference": f"{base}/{event.res_type}/{event.res_id}"},
                }
            )
        parameters.append({"name": "notification-event", "part": part})
    if subscription.get("status") == "error" and subscription.get("error"):
        parameters.append(
            {"name": "error", "valueCodeableConcept": {"text": subscription["error"]}}
        )
    return {
        "resourceType": "Parameters",
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameters,
    }


def notification_bundle(
    base: str,
    sub_id: str,
    subscription: dict[str, Any],
    spec: Spec,
    kind: str,
    total: int,
    events: Sequence[Event] = (),
    resources: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A notification Bundle of ``kind`` with ``events`` (their focus resources, as the owner
    reads them, from ``resources`` for ``full-resource`` content)."""
    status = status_parameters(base, sub_id, subscription, spec, kind, total, events)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": status,
            "request": {"method": "GET", "url": f"{base}/Subscription/{sub_id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if spec.content != "empty":
        seen: set[tuple[str, str]] = set()
        for event in events:
            key = (event.res_type, event.res_id)
            if key in seen:
                continue
            seen.add(key)
            entry: dict[str, Any] = {
                "fullUrl": f"{base}/{event.res_type}/{event.res_id}",
                "request": {"method": "PUT", "url": f"{event.res_type}/{event.res_id}"},
                "response": {"status": "200"},
            }
            found = (resources or {}).get(key)
            if spec.content == "full-resource" and found is not None:
                entry["resource"] = found
            entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": format_instant(utc_now()),
        "entry": entries,
    }
