"""Sending queued notifications to rest-hook endpoints, retried for hours, never lost.

A worker claims due rows of the delivery queue (:mod:`.dispatch` fills it) under a lease
(``sending`` until ``due``; a worker that dies leaves them to the next after the lease), only
the oldest outstanding notification of each Subscription, so one Subscription's notifications
arrive in event order and a failing endpoint holds back only its own. For each it checks,
again and at the moment of sending, that the Subscription still listens and its owner still
holds a token the server still honours (not revoked, its user or client not disabled) and may
read the resource (a subscriber whose access was removed stops receiving at once: the
notification is dropped, not sent), then:

* R4, payload absent: ``POST [endpoint]`` with an empty body;
* R4, payload FHIR JSON: ``PUT [endpoint]/[type]/[id]`` with the resource as its owner reads it;
* topic-based (Backport IG): ``POST [endpoint]`` of the event's notification Bundle
  (:mod:`.notification_bundle`, with the Subscription's payload content);

with the channel's headers. A 2xx answer delivers it; anything else is retried with
exponential backoff (``MSO_SUBSCRIPTION_RETRY_BASE`` doubled each time, at most
``MSO_SUBSCRIPTION_RETRY_MAX``) for ``MSO_SUBSCRIPTION_RETRY_HOURS`` from the first try, then
given up (``failed``). After :data:`ERROR_AFTER` failed tries in a row the Subscription's
``status`` becomes ``error`` with the reason (an HTTP status or an error class, never content);
the next delivered notification makes it ``active`` again, as does the client updating it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from sqlalchemy import and_, exists, func, not_, select, update

from fhir_server.config import Settings
from fhir_server.messaging.deliveries import Listening, listening, read_as, set_status
from fhir_server.messaging.notification_bundle import Event, notification_bundle
from fhir_server.messaging.subscriptions import REST_HOOK, headers_of
from fhir_server.storage.engine import write_connection
from fhir_server.storage.records import as_utc, utc_now
from fhir_server.storage.subscription_schema import subscription_delivery

if TYPE_CHECKING:
    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

ERROR_AFTER = 3
"""Failed tries in a row after which a Subscription shows ``status = error``."""

_d = subscription_delivery.c
_OUTSTANDING = ("pending", "sending")


@dataclass(frozen=True, slots=True)
class Notification:
    """A claimed row of the delivery queue."""

    id: int
    sub_id: str
    event_no: int
    res_type: str
    res_id: str
    attempts: int
    first_try: datetime
    created: datetime


class RestHookSender:
    """Claims due notifications and sends them (one call of :meth:`run_once` a round)."""

    def __init__(self, repo: Repository, settings: Settings) -> None:
        self.repo = repo
        self.settings = settings
        self.client = httpx.Client(timeout=settings.subscription_timeout, follow_redirects=False)

    def close(self) -> None:
        """Release the HTTP connections."""
        self.client.close()

    def run_once(self, limit: int = 20) -> int:
        """Send the notifications due now; how many were claimed."""
        claimed = self._claim(limit)
        for notification in claimed:
            self._send(notification)
        return len(claimed)

    # -- the queue ------------------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Notification]:
        now = utc_now()
        older = subscription_delivery.alias("older")
        first_of_its_subscription = not_(
            exists(
                select(older.c.id).where(
                    older.c.sub_id == _d.sub_id,
                    older.c.id < _d.id,
                    older.c.status.in_(_OUTSTANDING),
                )
            )
        )
        due = and_(_d.channel == REST_HOOK, _d.status.in_(_OUTSTANDING), _d.due <= now)
        candidates = (
            select(_d.id).where(due, first_of_its_subscription).order_by(_d.id).limit(limit)
        )
        if self.repo.postgres:
            candidates = candidates.with_for_update(skip_locked=True)
        lease = timedelta(seconds=self.settings.subscription_timeout + 30)
        stmt = (
            update(subscription_delivery)
            .where(_d.id.in_(candidates.scalar_subquery()), due)
            .values(status="sending", due=now + lease, first_try=func.coalesce(_d.first_try, now))
            .returning(
                _d.id, _d.sub_id, _d.event_no, _d.res_type, _d.res_id, _d.attempts,
                _d.first_try, _d.created,
            )
        )  # fmt: skip
        with write_connection(self.repo.engine) as conn, conn.begin():
            rows = conn.execute(stmt).all()
        claimed = [
            Notification(
                r.id,
                r.sub_id,
                r.event_no,
                r.res_type,
                r.res_id,
                r.attempts,
                as_utc(r.first_try),
                as_utc(r.created),
            )
            for r in rows
        ]
        return sorted(claimed, key=lambda n: n.id)

    def _settle(self, notification: Notification, **values: Any) -> None:
        with write_connection(self.repo.engine) as conn, conn.begin():
            conn.execute(
                update(subscription_delivery)
                .where(_d.id == notification.id, _d.status == "sending")
                .values(**values)
            )

    # -- one notification --------------------------------------------------------------------------

    def _send(self, notification: Notification) -> None:
        target = self._target(notification)
        if target is None:
            self._settle(notification, status="dropped")
            return
        sub, resource = target
        channel = sub.body.get("channel") or {}
        headers = dict(headers_of(channel))
        endpoint = str(channel.get("endpoint") or "")
        try:
            if sub.spec.topic is not None:
                response = self._post_bundle(endpoint, headers, sub, notification, resource)
            elif sub.spec.content == "full-resource":
                url = f"{endpoint.rstrip('/')}/{notification.res_type}/{notification.res_id}"
                headers["Content-Type"] = "application/fhir+json"
                response = self.client.put(url, content=orjson.dumps(resource), headers=headers)
            else:
                response = self.client.post(endpoint, content=b"", headers=headers)
            failure = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            failure = f"could not deliver ({type(exc).__name__})"
        if failure is None:
            self._settle(notification, status="sent", last_error=None)
            if sub.body.get("status") == "error":
                set_status(self.repo, notification.sub_id, "active", None)
            return
        self._failed(notification, sub.body, failure)

    def _post_bundle(
        self,
        endpoint: str,
        headers: dict[str, str],
        sub: Listening,
        notification: Notification,
        resource: dict[str, Any],
    ) -> httpx.Response:
        event = Event(
            notification.event_no, notification.created, notification.res_type,
            notification.res_id,
        )  # fmt: skip
        key = (notification.res_type, notification.res_id)
        bundle = notification_bundle(
            (self.settings.base_url or "").rstrip("/"), sub.sub_id, sub.body, sub.spec,
            "event-notification", notification.event_no, [event], {key: resource},
        )  # fmt: skip
        headers["Content-Type"] = "application/fhir+json"
        return self.client.post(endpoint, content=orjson.dumps(bundle), headers=headers)

    def _failed(
        self, notification: Notification, subscription: dict[str, Any], failure: str
    ) -> None:
        attempts = notification.attempts + 1
        now = utc_now()
        window = timedelta(hours=self.settings.subscription_retry_hours)
        if now - notification.first_try >= window:
            self._settle(notification, status="failed", attempts=attempts, last_error=failure)
        else:
            delay = min(
                self.settings.subscription_retry_base * 2 ** (attempts - 1),
                self.settings.subscription_retry_max,
            )
            self._settle(
                notification,
                status="pending",
                attempts=attempts,
                last_error=failure,
                due=now + timedelta(seconds=delay),
            )
        log.warning(
            "Subscription %s: notification %s not delivered (%s, try %s)",
            notification.sub_id, notification.event_no, failure, attempts,
        )  # fmt: skip
        if attempts >= ERROR_AFTER and subscription.get("status") != "error":
            set_status(
                self.repo, notification.sub_id, "error", f"The rest-hook endpoint failed: {failure}"
            )

    def _target(self, notification: Notification) -> tuple[Listening, dict[str, Any]] | None:
        """The listening Subscription and the resource as its owner reads it now; ``None``
        when the notification is no longer to be sent."""
        sub = listening(self.repo, notification.sub_id)
        if sub is None:
            return None
        key = (notification.res_type, notification.res_id)
        found = read_as(self.repo, sub.owner, [key]).get(key)
        return None if found is None else (sub, found)
