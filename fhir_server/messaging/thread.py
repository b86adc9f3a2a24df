"""A case's chat thread in SQL: its messages, their case and server ``sent``, in thread order.

Thread order (:mod:`.chat`) is the server's ``Communication.sent`` — read from the ``sent``
search parameter's ``idx_date`` row, epoch milliseconds — then ``resource.pid``, as
``Communication?based-on=…&_sort=sent`` orders. A message is a chat message by its ``CHAT``
access row (what the access policy hides from admins) and belongs to the case its
``based-on`` index row names. The unit's caller sees only what the access policy's search
condition lets it see; server work (``tx.internal()``) sees every message. Index rows exist
for current versions only, so nothing here loads a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Select, and_, exists, literal, select, union_all

from fhir_server.storage.access_schema import ScopeKind, access_scope
from fhir_server.storage.index_schema import idx_date, idx_reference
from fhir_server.storage.schema import resource

if TYPE_CHECKING:
    from fhir_server.search.registry import SearchRegistry
    from fhir_server.storage.repository import Tx


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a thread: a message's ``sent`` (epoch ms) and pid."""

    ms: int
    pid: int


class Thread:
    """SQL parts over the chat messages the unit's caller may see: the message row ``r``,
    its ``case_id`` and ``sent`` columns, the ``joined`` FROM clause and the ``conditions``."""

    def __init__(self, tx: Tx) -> None:
        registry = tx.repo.registry
        self.r = resource.alias("chat_msg")
        based = idx_reference.alias("chat_case")
        sent = idx_date.alias("chat_sent")
        self.case_id = based.c.target_id
        self.sent = sent.c.low
        self.joined = self.r.join(
            based,
            and_(
                based.c.pid == self.r.c.pid,
                based.c.hash_identity == identity(registry, "based-on"),
                based.c.target_type == "ServiceRequest",
            ),
        ).join(
            sent,
            and_(sent.c.pid == self.r.c.pid, sent.c.hash_identity == identity(registry, "sent")),
        )
        chat_row = access_scope.alias("chat_row")
        self.conditions: list[ColumnElement[bool]] = [
            self.r.c.res_type == "Communication",
            exists(
                select(literal(1)).where(
                    chat_row.c.pid == self.r.c.pid, chat_row.c.kind == int(ScopeKind.CHAT)
                )
            ),
        ]
        access = tx.repo.search_access_filter(tx.caller)
        if access is not None:
            self.conditions.append(access(self.r))

    def in_case(self, case_id: str) -> Select:
        """``sent`` and pid of the case's messages, latest first."""
        return (
            select(self.sent, self.r.c.pid)
            .select_from(self.joined)
            .where(*self.conditions, self.case_id == case_id)
            .order_by(self.sent.desc(), self.r.c.pid.desc())
        )


def latest(
    tx: Tx, case_id: str, *, recipient: str | None = None, other_than: str | None = None
) -> Position | None:
    """Where the case's latest message (that the unit's caller may see) is; only of those
    addressed to ``recipient`` (``Type/id``), and not message ``other_than`` (an id), when
    given."""
    thread = Thread(tx)
    stmt = thread.in_case(case_id)
    if recipient is not None:
        stmt = stmt.where(_addressed(tx, thread, recipient))
    if other_than is not None:
        stmt = stmt.where(thread.r.c.res_id != other_than)
    row = tx.conn.execute(stmt.limit(1)).first()
    return Position(int(row[0]), int(row[1])) if row else None


def latest_and_latest_to(
    tx: Tx, case_id: str, recipient: str
) -> tuple[Position | None, Position | None]:
    """:func:`latest` of the case, and of its messages addressed to ``recipient``, in one
    query (what a new message's write needs: its stamp and where its burst starts)."""
    thread = Thread(tx)
    addressed = _addressed(tx, thread, recipient)
    newest = thread.in_case(case_id).add_columns(literal(0).label("which")).limit(1)
    newest_to = (
        thread.in_case(case_id).where(addressed).add_columns(literal(1).label("which")).limit(1)
    )
    rows = tx.conn.execute(
        union_all(newest.subquery().select(), newest_to.subquery().select())
    ).all()
    found: dict[int, Position] = {int(r[2]): Position(int(r[0]), int(r[1])) for r in rows}
    return found.get(0), found.get(1)


def _addressed(tx: Tx, thread: Thread, recipient: str) -> ColumnElement[bool]:
    """SQL: the thread's message is addressed to ``recipient`` (``Type/id``)."""
    rtype, _, rid = recipient.partition("/")
    to = idx_reference.alias("chat_to")
    return exists(
        select(literal(1)).where(
            to.c.pid == thread.r.c.pid,
            to.c.hash_identity == identity(tx.repo.registry, "recipient"),
            to.c.target_type == rtype,
            to.c.target_id == rid,
        )
    )


def position_of(tx: Tx, case_id: str, pid: int) -> Position | None:
    """Where the message stored as ``pid`` is in the case's thread (``None``: not in it)."""
    thread = Thread(tx)
    row = tx.conn.execute(thread.in_case(case_id).where(thread.r.c.pid == pid)).first()
    return Position(int(row[0]), int(row[1])) if row else None


def identity(registry: SearchRegistry, code: str) -> int:
    """``hash_identity`` of the Communication search parameter ``code``."""
    param = registry.get("Communication", code)
    if param is None:  # R4 defines every one used here; a registry without them is a bug
        raise LookupError(f"search parameter Communication:{code} is not registered")
    return param.identity("Communication")
