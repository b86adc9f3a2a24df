"""Tables of the case chat (:mod:`fhir_server.messaging.chat`): what each user has read.

A chat message is a ``Communication`` resource (stored like any other); what is kept here is
per user and case the last message the user has read, as a position in the thread order:
``read_ms`` is the server ``sent`` instant of that message in epoch milliseconds and
``read_pid`` its ``resource.pid``, the tie-breaker of messages sent in the same millisecond
(the order of ``Communication?based-on=…&_sort=sent``). Every message at or before that
position counts as read (``$mark-read`` only moves it forward; see
:mod:`fhir_server.messaging.read_state`). ``username`` is the caller's subject (the user name).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, String, Table

from fhir_server.storage.base_schema import metadata

chat_read_state = Table(
    "chat_read_state",
    metadata,
    Column("username", String(128), primary_key=True),
    Column("case_id", String(64), primary_key=True),
    Column("read_ms", BigInteger, nullable=False),
    Column("read_pid", BigInteger, nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)
