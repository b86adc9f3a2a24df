"""Tables of notification email (:mod:`fhir_server.messaging`): the outbox and user presence.

``mail_outbox`` is the transactional outbox: a case event writes its emails here in the same
transaction as the case change, so an email exists exactly when the change committed, and a
worker thread delivers them over SMTP. ``status`` moves ``pending`` -> ``sending`` (claimed by
one worker) -> ``sent`` or back to ``pending`` (retry later) or ``failed`` (gave up). ``due``
is when the row next needs attention: a pending row's next attempt, a sending row's lease end
(after which a crashed worker's claim may be taken over). ``attempts`` counts claims and
doubles as the fencing token of a claim.

``user_presence`` holds when each user last made an authenticated request (written at most
once a minute per user and process), so that online users get no email.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, Text, UniqueConstraint

from fhir_server.storage.base_schema import PidType, metadata

mail_outbox = Table(
    "mail_outbox",
    metadata,
    Column("id", PidType, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("event", String(32), nullable=False),
    Column("case_id", String(64), nullable=True),
    Column("username", String(128), nullable=True),
    Column("to_addr", String(320), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("due", DateTime(timezone=True), nullable=False),
    Column("sent", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    UniqueConstraint("message_id"),
    Index(None, "status", "due"),
)

user_presence = Table(
    "user_presence",
    metadata,
    Column("username", String(128), primary_key=True),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)
