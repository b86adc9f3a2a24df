"""Tables of FHIR Subscriptions (:mod:`fhir_server.messaging.subscriptions`).

``subscription_owner``: who each Subscription resource belongs to. A notification is sent only
for what its owner may read, by the same access policy as a read: ``principal`` is the owner as
a serialized :class:`~fhir_server.auth.principal.Principal` (its role, organization, identity
and scopes when it created the Subscription), ``created`` the moment from which changes count
for it, and ``events`` how many notifications it has had (each delivery's ``event_no``).

``subscription_delivery``: a queue of notifications to send, one row per (Subscription,
matching change), filled from the change feed in the transaction that moves the feed cursor
(:mod:`fhir_server.messaging.dispatch`), so a change is turned into notifications exactly once.
``status`` moves ``pending`` -> ``sending`` (claimed under a lease until ``due``) -> ``sent`` |
``failed`` (given up after the retry window) | ``dropped`` (no longer readable by the owner);
``attempts`` and ``last_error`` record failed tries, ``first_try`` starts the retry window.
``channel`` is the Subscription's channel type when the row was queued: rest-hook rows are
claimed and settled by one sender; websocket rows stay ``pending`` and are read (not claimed) by
every process holding a socket bound to the Subscription. The rows of a Subscription, by
``event_no``, are also its event log: ``$events`` replays them.

``subscription_binding``: the websocket binding tokens of ``$get-ws-binding-token`` (only a
SHA-256 digest of each is kept), for whom (``principal``, as in ``subscription_owner``), which
Subscriptions (``subs``, a JSON list) and until when.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table, Text

from fhir_server.storage.base_schema import PidType, metadata

subscription_owner = Table(
    "subscription_owner",
    metadata,
    Column("sub_id", String(64), primary_key=True),
    Column("principal", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("events", BigInteger, nullable=False),
)

subscription_delivery = Table(
    "subscription_delivery",
    metadata,
    Column("id", PidType, primary_key=True, autoincrement=True),
    Column("sub_id", String(64), nullable=False),
    Column("event_no", BigInteger, nullable=False),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("due", DateTime(timezone=True), nullable=False),
    Column("first_try", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("channel", String(16), nullable=False, server_default="rest-hook"),
    Index(None, "status", "due"),
    Index(None, "sub_id", "id"),
    sqlite_autoincrement=True,  # ids order a Subscription's notifications: never reused
)

subscription_binding = Table(
    "subscription_binding",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("principal", Text, nullable=False),
    Column("subs", Text, nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
    Index(None, "expires"),
)
