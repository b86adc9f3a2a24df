"""FHIR R4 Subscriptions: what a Subscription resource may ask for, and whose it is
(http://hl7.org/fhir/R4/subscription.html).

A Subscription names a search (``criteria``, ``Type?params``) and a channel. The server takes a
caller's Subscription (these rules are rows of the one guard table,
:mod:`fhir_server.workflow.guards`, so they hold on every write path) when:

* ``criteria`` is a search this server runs: a known type and parameters the search engine
  accepts, strictly (a criterion silently dropped would notify about more than was asked):
  400 ``MSO-SUB-400`` otherwise, with the search's own reason;
* the channel is ``rest-hook`` (``endpoint`` an absolute ``https`` URL, or ``http``/``https`` to a
  host of ``MSO_SUBSCRIPTION_ALLOWED_HOSTS``: no request into the server's own network on a
  client's say; ``header`` entries ``Name: value``; ``payload`` absent — an empty POST — or a
  FHIR JSON type — a PUT of the resource to ``[endpoint]/[type]/[id]``); other channels are a
  422 ``MSO-SUB-422``;
* its ``status`` is ``requested``, ``active`` or ``off`` (``error`` is the server's to set).

The server then sets ``status`` to ``active`` (``off`` stays off; a Subscription whose ``end``
has passed is ``off``) and clears ``error``: an update by the client reactivates a Subscription
in error. The owner — the caller who created it — is recorded
(:data:`~fhir_server.storage.subscription_schema.subscription_owner`): notifications are for
what the owner may read (:mod:`.dispatch`), and count from its creation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from sqlalchemy import insert

from fhir_server.auth.principal import Principal
from fhir_server.config import Settings
from fhir_server.fhir.outcome import FhirError
from fhir_server.search.query import parse_query
from fhir_server.storage import search_exec
from fhir_server.storage.records import utc_now
from fhir_server.storage.subscription_schema import subscription_owner

if TYPE_CHECKING:
    from fhir_server.hooks import HookEvent
    from fhir_server.search.registry import SearchRegistry

REST_HOOK = "rest-hook"
FHIR_JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
CLIENT_STATUSES = frozenset({"requested", "active", "off"})
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+:[^\r\n]*$")
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding"})
MAX_HEADERS = 10


@dataclass(frozen=True, slots=True)
class Criteria:
    """A Subscription's criteria: the type and the search parameters."""

    res_type: str
    params: list[tuple[str, str]]


def parse_criteria(text: str) -> Criteria:
    """``Type?params`` split (no check of the type or parameters: :func:`check_criteria`)."""
    res_type, _, query = text.strip().partition("?")
    return Criteria(res_type, parse_qsl(query, keep_blank_values=True))


def check_criteria(registry: SearchRegistry, text: Any) -> Criteria:
    """The criteria, or 400 ``MSO-SUB-400`` for one that is not a search this server runs."""
    if not isinstance(text, str) or not text.strip():
        raise _bad("A Subscription's criteria is a search: Type?parameters", "criteria")
    criteria = parse_criteria(text)
    if criteria.res_type not in registry.resource_types:
        raise _bad("The criteria's resource type is not one this server has", "criteria")
    try:
        query = parse_query(registry, (criteria.res_type,), criteria.params)
    except FhirError as err:
        raise _bad(f"The criteria is not a usable search: {err.message}", "criteria") from err
    error = search_exec.strict_error(query) if query.issues else None
    if error is not None:
        raise _bad(f"The criteria is not a usable search: {error.message}", "criteria")
    if query.sort or query.includes:
        raise _bad("The criteria cannot sort or include: it selects resources", "criteria")
    return criteria


def endpoint_allowed(endpoint: str, allowed_hosts: frozenset[str]) -> bool:
    """``https``, or ``http(s)`` to an allowed host (loopback in tests, a partner's gateway)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return False
    return parts.scheme == "https" or parts.hostname.lower() in allowed_hosts


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """``MSO_SUBSCRIPTION_ALLOWED_HOSTS`` as a set of lower-case host names and addresses."""
    raw = settings.subscription_allowed_hosts or ""
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


def headers_of(channel: dict[str, Any]) -> list[tuple[str, str]]:
    """The channel's ``header`` entries as (name, value) pairs (checked by the rules)."""
    pairs = []
    for entry in channel.get("header") or ():
        name, _, value = str(entry).partition(":")
        pairs.append((name.strip(), value.strip()))
    return pairs


class SubscriptionRules:
    """The Subscription rows of the guard table."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def accept(self, event: HookEvent) -> None:
        """Before a caller's Subscription is stored: check it, then set its status."""
        body = event.resource or {}
        check_criteria(event.tx.repo.registry, body.get("criteria"))
        self._check_channel(body.get("channel"))
        status = body.get("status")
        if status not in CLIENT_STATUSES:
            raise _bad(
                "A Subscription's status is requested, active or off (error is the server's)",
                "status",
            )
        body.pop("error", None)
        body["status"] = "off" if status == "off" or _ended(body.get("end")) else "active"

    def own(self, event: HookEvent) -> None:
        """After a caller created a Subscription: record it as the owner."""
        caller = event.caller
        if not isinstance(caller, Principal):
            return
        event.tx.conn.execute(
            insert(subscription_owner).values(
                sub_id=event.resource_id,
                principal=orjson.dumps(caller.to_dict()).decode(),
                created=utc_now(),
                events=0,
            )
        )

    def _check_channel(self, channel: Any) -> None:
        if not isinstance(channel, dict) or channel.get("type") != REST_HOOK:
            raise FhirError(
                422,
                "not-supported",
                "Only rest-hook Subscription channels are supported",
                code="MSO-SUB-422",
                expression=["Subscription.channel.type"],
            )
        endpoint = channel.get("endpoint")
        hosts = allowed_hosts(self.settings)
        if not isinstance(endpoint, str) or not endpoint_allowed(endpoint, hosts):
            raise _bad(
                "A rest-hook endpoint is an absolute https URL (http only to an allowed host)",
                "channel.endpoint",
            )
        headers = channel.get("header") or []
        if len(headers) > MAX_HEADERS or not all(
            isinstance(h, str) and _HEADER.match(h) for h in headers
        ):
            raise _bad(f"Channel headers are at most {MAX_HEADERS} 'Name: value'", "channel.header")
        if any(name.lower() in _FORBIDDEN_HEADERS for name, _ in headers_of(channel)):
            raise _bad(
                "Channel headers may not set Host, Content-Type or lengths", "channel.header"
            )
        payload = channel.get("payload")
        if payload is not None and payload not in FHIR_JSON_TYPES:
            raise _bad("A channel payload is absent or application/fhir+json", "channel.payload")


def _ended(end: Any) -> bool:
    if not isinstance(end, str):
        return False
    try:
        moment = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return False
    return moment.tzinfo is not None and moment <= utc_now()


def _bad(message: str, where: str) -> FhirError:
    return FhirError(
        400, "invalid", message, code="MSO-SUB-400", expression=[f"Subscription.{where}"]
    )
