"""FHIR Subscriptions: what a Subscription resource may ask for, and whose it is.

Two kinds, told apart by ``criteria``:

* R4 (http://hl7.org/fhir/R4/subscription.html): ``criteria`` is a search, ``Type?params``.
* Topic-based, per the Subscriptions R5 Backport IG 1.1.0: ``criteria`` is the canonical URL of
  one of the server's topics (:mod:`.topics`), narrowed by ``backport-filter-criteria``
  extensions on ``_criteria`` (each ``Type?params`` on the topic's type; all must hold), and the
  notification content by ``backport-payload-content`` on ``_payload`` (``empty``, ``id-only``
  — the default — or ``full-resource``). Notifications are the IG's notification Bundles.

The server takes a caller's Subscription (these rules are rows of the one guard table,
:mod:`fhir_server.workflow.guards`, so they hold on every write path) when:

* its search (R4 ``criteria`` or the topic's filters) is one this server runs: a known type and
  parameters the search engine accepts, strictly (a criterion silently dropped would notify
  about more than was asked): 400 ``MSO-SUB-400`` otherwise, with the search's own reason; an
  unknown topic is a 400 too;
* the channel is ``rest-hook`` (``endpoint`` an absolute ``https`` URL, or ``http``/``https`` to a
  host of ``MSO_SUBSCRIPTION_ALLOWED_HOSTS``: no request into the server's own network on a
  client's say; ``header`` entries ``Name: value``; ``payload`` absent — an empty POST — or a
  FHIR JSON type — for R4 a PUT of the resource to ``[endpoint]/[type]/[id]``, for a topic a
  POST of the notification Bundle) or ``websocket`` (no endpoint: clients connect to the
  server's websocket URL and bind, :mod:`.websocket`); other channels are a 422
  ``MSO-SUB-422``;
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
from fhir_server.messaging.topics import Topic, topic_of
from fhir_server.search.query import parse_query
from fhir_server.storage import search_exec
from fhir_server.storage.records import utc_now
from fhir_server.storage.subscription_schema import subscription_owner

if TYPE_CHECKING:
    from fhir_server.hooks import HookEvent
    from fhir_server.search.registry import SearchRegistry

REST_HOOK = "rest-hook"
WEBSOCKET = "websocket"
CHANNELS = frozenset({REST_HOOK, WEBSOCKET})
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FILTER_CRITERIA = f"{BACKPORT}backport-filter-criteria"
PAYLOAD_CONTENT = f"{BACKPORT}backport-payload-content"
CONTENTS = ("empty", "id-only", "full-resource")
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


@dataclass(frozen=True, slots=True)
class Spec:
    """What an accepted Subscription listens for and how it is told: its search (R4 criteria or
    the topic's filters), its topic (``None`` for R4), channel type and notification content
    (``empty``, ``id-only`` or ``full-resource``)."""

    criteria: Criteria
    topic: Topic | None
    channel: str
    content: str


def spec_of(body: dict[str, Any]) -> Spec:
    """The :class:`Spec` of a stored (so accepted) Subscription."""
    channel = body.get("channel") or {}
    kind = str(channel.get("type") or REST_HOOK)
    text = str(body.get("criteria") or "").strip()
    topic = topic_of(text) if _is_url(text) else None
    if topic is None:
        content = "full-resource" if channel.get("payload") in FHIR_JSON_TYPES else "empty"
        return Spec(parse_criteria(text), None, kind, content)
    params = [p for f in filters_of(body) for p in parse_criteria(f).params]
    content = _extension(channel.get("_payload"), PAYLOAD_CONTENT, "valueCode") or "id-only"
    return Spec(Criteria(topic.res_type, params), topic, kind, content)


def filters_of(body: dict[str, Any]) -> list[str]:
    """The ``backport-filter-criteria`` values of a topic-based Subscription."""
    return [
        str(e.get("valueString") or "")
        for e in (body.get("_criteria") or {}).get("extension") or ()
        if isinstance(e, dict) and e.get("url") == FILTER_CRITERIA
    ]


def _extension(element: Any, url: str, value: str) -> Any:
    for e in (element or {}).get("extension") or () if isinstance(element, dict) else ():
        if isinstance(e, dict) and e.get("url") == url:
            return e.get(value)
    return None


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", "urn:"))


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
        registry = event.tx.repo.registry
        text = body.get("criteria")
        if isinstance(text, str) and _is_url(text.strip()):
            self._check_topic(registry, body)
        else:
            check_criteria(registry, text)
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

    def _check_topic(self, registry: SearchRegistry, body: dict[str, Any]) -> None:
        """A topic-based Subscription: a topic of this server, filters on its type that the
        search engine runs, a known payload content."""
        topic = topic_of(str(body["criteria"]).strip())
        if topic is None:
            raise _bad("The criteria names no subscription topic of this server", "criteria")
        for text in filters_of(body):
            criteria = check_criteria(registry, text)
            if criteria.res_type != topic.res_type:
                raise _bad(f"A filter of this topic is a search on {topic.res_type}", "criteria")
        payload = (body.get("channel") or {}).get("_payload")
        content = _extension(payload, PAYLOAD_CONTENT, "valueCode")
        if content is not None and content not in CONTENTS:
            raise _bad("The payload content is empty, id-only or full-resource", "channel.payload")

    def _check_channel(self, channel: Any) -> None:
        if not isinstance(channel, dict) or channel.get("type") not in CHANNELS:
            raise FhirError(
                422,
                "not-supported",
                "Subscription channels are rest-hook or websocket",
                code="MSO-SUB-422",
                expression=["Subscription.channel.type"],
            )
        if channel["type"] == WEBSOCKET:
            if channel.get("endpoint") is not None or channel.get("header"):
                raise _bad(
                    "A websocket channel has no endpoint or headers: clients connect to the "
                    "server's websocket URL",
                    "channel.endpoint",
                )
            return
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
