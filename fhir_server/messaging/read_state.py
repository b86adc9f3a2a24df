"""What each user has read of the case chats: the unread counters (the viewer's red badge).

The MSO chat rules ask for an unread counter across all cases; the operations
``Communication/$mark-read`` and ``Communication/$unread``
(:mod:`fhir_server.interactions.operations.chat_read`) are built on this module.

A case's thread is ordered by the server's ``sent`` (epoch milliseconds, the ``sent`` search
parameter's ``idx_date`` row) and then by ``resource.pid``, as ``_sort=sent`` orders it
(:mod:`.thread`; :mod:`.chat` explains why that order is stable under concurrent posts). Per
user (the caller's subject) and case, ``chat_read_state``
(:mod:`fhir_server.storage.chat_schema`) holds a position in that order; the messages at or
before it are read. :func:`mark_read` only moves it forward:

* to a ``message`` of the case: that message and every one before it;
* to an instant ``until`` (no later than now): every message sent then or before;
* with neither: to the case's latest message (all of the case as it is now; a message still
  being sent is stamped after it).

:func:`unread` counts, per case, the chat messages the caller may see (the access policy's own
search condition, so a provider who rejected or was reassigned counts nothing of that case and
an administrator nothing at all) that it did not send (``sender`` is not its fhirUser) and
that lie after its position. One grouped query over the index rows, no message loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, exists, func, literal, or_, select

from fhir_server.auth.principal import Principal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging import chat, thread
from fhir_server.messaging.thread import Position
from fhir_server.storage.chat_schema import chat_read_state
from fhir_server.storage.index_schema import idx_reference
from fhir_server.storage.repository import as_utc, utc_now

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from fhir_server.search.registry import SearchRegistry
    from fhir_server.storage.repository import Tx

MAX_PID = 2**63 - 1
"""``read_pid`` of a position given by an instant: after every message of that millisecond."""


@dataclass(frozen=True, slots=True)
class Unread:
    """How many messages of one case the caller has not read."""

    case_id: str
    count: int


def mark_read(
    tx: Tx,
    caller: Any,
    case_id: str,
    *,
    until: datetime | None = None,
    message_id: str | None = None,
) -> int:
    """Move ``caller``'s position in case ``case_id`` forward (see the module); the number of
    messages of the case it has still not read.

    404 ``MSO-CHAT-404`` when the caller sees no such ServiceRequest, 422 ``MSO-CHAT-422``
    when it is not a case or ``message_id`` is not a message of it, 403 ``MSO-CHAT-403`` when
    the caller is not a party of its chat.
    """
    _party_case(tx, caller, case_id)
    if message_id is not None:
        position: Position | None = _message_position(tx, case_id, message_id)
    elif until is not None:
        now = utc_now()
        position = Position(_epoch_ms(min(as_utc(until), now)), MAX_PID)
    else:
        position = thread.latest(tx, case_id)
    if position is not None:
        _advance(tx.conn, _username(caller), case_id, position)
    return sum(u.count for u in unread(tx, caller, case_id=case_id))


def unread(tx: Tx, caller: Any, *, case_id: str | None = None) -> list[Unread]:
    """Per case (in case id order; only ``case_id`` when given) the chat messages ``caller``
    may see, did not send and has not read; cases without any are left out."""
    m = thread.Thread(tx)
    state = chat_read_state.c
    after = or_(
        state.case_id.is_(None),
        m.sent > state.read_ms,
        and_(m.sent == state.read_ms, m.r.c.pid > state.read_pid),
    )
    stmt = (
        select(m.case_id, func.count())
        .select_from(
            m.joined.outerjoin(
                chat_read_state,
                and_(state.username == _username(caller), state.case_id == m.case_id),
            )
        )
        .where(*m.conditions, after, *_not_sent_by(tx.repo.registry, caller, m.r))
        .group_by(m.case_id)
        .order_by(m.case_id)
    )
    if case_id is not None:
        stmt = stmt.where(m.case_id == case_id)
    return [Unread(str(cid), int(count)) for cid, count in tx.conn.execute(stmt)]


# -- helpers ------------------------------------------------------------------------------------


def _not_sent_by(registry: SearchRegistry, caller: Any, r: Any) -> list[ColumnElement[bool]]:
    """SQL: ``r``'s ``sender`` is not the caller's FHIR identity (nothing to exclude without)."""
    fhir_user = caller.fhir_user if isinstance(caller, Principal) else None
    if not fhir_user or fhir_user.count("/") != 1:
        return []
    sender_type, sender_id = fhir_user.split("/")
    s = idx_reference.alias("chat_sender")
    return [
        ~exists(
            select(literal(1)).where(
                s.c.pid == r.c.pid,
                s.c.hash_identity == thread.identity(registry, "sender"),
                s.c.target_type == sender_type,
                s.c.target_id == sender_id,
            )
        )
    ]


def _message_position(tx: Tx, case_id: str, message_id: str) -> Position:
    """Where message ``message_id`` is in case ``case_id``'s thread (422 when it is not a
    message of that case the caller may see)."""
    wrong = FhirError(
        422,
        "business-rule",
        f"Communication/{message_id} is not a chat message of ServiceRequest/{case_id}",
        code="MSO-CHAT-422",
        expression=["message"],
    )
    try:
        stored = tx.read("Communication", message_id)
    except FhirError as exc:
        if exc.status in (404, 410):
            raise wrong from None
        raise
    if not chat.is_chat_message(stored.resource) or chat.case_of(stored.resource) != case_id:
        raise wrong
    position = thread.position_of(tx, case_id, stored.pid)
    if position is None:
        raise wrong
    return position


def _party_case(tx: Tx, caller: Any, case_id: str) -> None:
    """The caller sees case ``case_id`` and is a party of its chat (see :func:`mark_read`)."""
    try:
        tx.read("ServiceRequest", case_id)
    except FhirError as exc:
        if exc.status in (404, 410):
            raise FhirError(
                404,
                "not-found",
                f"ServiceRequest/{case_id} is not known",
                code="MSO-CHAT-404",
                expression=["case"],
            ) from None
        raise
    case = chat.chat_case(tx, case_id)
    if case is None:
        raise FhirError(
            422,
            "business-rule",
            f"ServiceRequest/{case_id} is not a case",
            code="MSO-CHAT-422",
            expression=["case"],
        )
    chat.require_party(caller, case)


def _advance(conn: Connection, username: str, case_id: str, position: Position) -> None:
    """Insert or move forward (never back) the read position of ``username`` in ``case_id``."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    state = chat_read_state.c
    stmt = dialect_insert(chat_read_state).values(
        username=username,
        case_id=case_id,
        read_ms=position.ms,
        read_pid=position.pid,
        updated=utc_now(),
    )
    new = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=[state.username, state.case_id],
        set_={"read_ms": new.read_ms, "read_pid": new.read_pid, "updated": new.updated},
        where=or_(
            new.read_ms > state.read_ms,
            and_(new.read_ms == state.read_ms, new.read_pid > state.read_pid),
        ),
    )
    conn.execute(stmt)


def _username(caller: Any) -> str:
    if not isinstance(caller, Principal):
        raise FhirError(403, "forbidden", "Read state is kept for users", code="MSO-CHAT-403")
    return caller.subject


def _epoch_ms(value: datetime) -> int:
    return int(as_utc(value).timestamp() * 1000)
