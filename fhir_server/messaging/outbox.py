"""The transactional email outbox (``mail_outbox``): enqueue, claim, settle.

Emails are enqueued on the connection of the transaction that caused them, so they commit or
roll back with it: no email for a case change that failed, none lost for one that committed.

Delivery is claimed, not just read. :func:`claim` moves due rows to ``sending`` in one write
transaction (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so concurrent workers take disjoint rows
without waiting; SQLite: the write transaction is exclusive), which also counts the attempt
and sets a lease. The worker then talks SMTP outside any transaction and settles each row
with :func:`mark_sent` only after the server accepted the message, or :func:`mark_failed`
(retry with exponential backoff, or give up). Settling is fenced by the attempt number, so a
worker whose lease expired cannot overwrite the row's newer state.

A worker that dies between the SMTP server's acceptance and :func:`mark_sent` leaves its row in
``sending``; once the lease expires another worker sends it again. That window is one round
trip wide, and the retry carries the same ``Message-ID``, so receiving systems can recognize it.
The alternative, never retrying an expired claim, would silently lose every email of a crash.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.storage.engine import write_connection
from fhir_server.storage.messaging_schema import mail_outbox
from fhir_server.storage.repository import as_utc, utc_now

_o = mail_outbox.c


class MailStatus(StrEnum):
    """States of an outbox row."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """An email to enqueue."""

    to_addr: str
    subject: str
    body: str
    event: str
    case_id: str | None = None
    username: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedMail:
    """An outbox row claimed for delivery by one worker; ``attempts`` fences its settlement."""

    id: int
    message_id: str
    to_addr: str
    subject: str
    body: str
    attempts: int


def enqueue(
    conn: Connection,
    mails: Iterable[OutgoingMail],
    *,
    domain: str = "mso.invalid",
    now: datetime | None = None,
) -> int:
    """Add ``mails`` to the outbox on ``conn`` (in the caller's transaction); how many."""
    now = now or utc_now()
    rows = [
        {
            "message_id": f"<{uuid.uuid4().hex}@{domain}>",
            "created": now,
            "event": mail.event,
            "case_id": mail.case_id,
            "username": mail.username,
            "to_addr": mail.to_addr,
            "subject": mail.subject,
            "body": mail.body,
            "status": MailStatus.PENDING.value,
            "attempts": 0,
            "due": now,
        }
        for mail in mails
    ]
    if rows:
        conn.execute(insert(mail_outbox), rows)
    return len(rows)


def claim(
    engine: Engine, *, limit: int, lease: float, now: datetime | None = None
) -> list[ClaimedMail]:
    """Claim up to ``limit`` due rows (pending, or sending with an expired lease) for delivery."""
    now = now or utc_now()
    due = _due(now)
    candidates = select(_o.id).where(due).order_by(_o.due, _o.id).limit(limit)
    if engine.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    stmt = (
        update(mail_outbox)
        .where(_o.id.in_(candidates.scalar_subquery()), due)
        .values(
            status=MailStatus.SENDING.value,
            attempts=_o.attempts + 1,
            due=now + timedelta(seconds=lease),
        )
        .returning(_o.id, _o.message_id, _o.to_addr, _o.subject, _o.body, _o.attempts)
    )
    with write_connection(engine) as conn, conn.begin():
        rows = conn.execute(stmt).all()
    claimed = [
        ClaimedMail(r.id, r.message_id, r.to_addr, r.subject, r.body, r.attempts) for r in rows
    ]
    return sorted(claimed, key=lambda m: m.id)


def _due(now: datetime) -> ColumnElement[bool]:
    """SQL: the row is due for a delivery attempt at ``now``."""
    return _o.status.in_((MailStatus.PENDING.value, MailStatus.SENDING.value)) & (_o.due <= now)


def _settle(engine: Engine, mail: ClaimedMail, **values: object) -> bool:
    stmt = (
        update(mail_outbox)
        .where(
            _o.id == mail.id,
            _o.status == MailStatus.SENDING.value,
            _o.attempts == mail.attempts,
        )
        .values(**values)
    )
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(stmt).rowcount == 1


def mark_sent(engine: Engine, mail: ClaimedMail, *, now: datetime | None = None) -> bool:
    """The SMTP server accepted ``mail``; False if the claim was lost meanwhile."""
    now = now or utc_now()
    return _settle(engine, mail, status=MailStatus.SENT.value, sent=now, due=now, last_error=None)


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base, 2 base, 4 base … cap."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def mark_failed(
    engine: Engine,
    mail: ClaimedMail,
    error: str,
    *,
    permanent: bool,
    max_attempts: int,
    retry_base: float,
    retry_max: float,
    now: datetime | None = None,
) -> MailStatus:
    """An attempt failed: retry later with backoff, or give up (permanent or out of attempts)."""
    now = now or utc_now()
    if permanent or mail.attempts >= max_attempts:
        status, due = MailStatus.FAILED, now
    else:
        status = MailStatus.PENDING
        due = now + timedelta(seconds=backoff(mail.attempts, base=retry_base, cap=retry_max))
    _settle(engine, mail, status=status.value, due=due, last_error=error[:2000])
    return status


def release(engine: Engine, mails: Iterable[ClaimedMail], *, now: datetime | None = None) -> None:
    """Give back claims that were never attempted (shutdown): pending again, attempt uncounted."""
    now = now or utc_now()
    for mail in mails:
        _settle(engine, mail, status=MailStatus.PENDING.value, attempts=_o.attempts - 1, due=now)


def purge_sent(engine: Engine, *, older_than: float, now: datetime | None = None) -> int:
    """Delete sent rows older than ``older_than`` seconds (failed rows stay for inspection)."""
    cutoff = (now or utc_now()) - timedelta(seconds=older_than)
    stmt = delete(mail_outbox).where(_o.status == MailStatus.SENT.value, _o.sent < cutoff)
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(stmt).rowcount


def counts(conn: Connection) -> dict[str, int]:
    """Rows per status (monitoring, tests)."""
    rows = conn.execute(select(_o.status, func.count()).group_by(_o.status))
    return {status: n for status, n in rows}


@dataclass(frozen=True, slots=True)
class MailProblem:
    """An email whose last attempt failed: still to retry (pending) or given up (failed)."""

    id: int
    event: str
    status: str
    attempts: int
    created: datetime
    due: datetime  # pending: the next attempt; failed: when it was given up
    last_error: str


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What ``mso outbox status`` reports; no addresses, subjects or bodies."""

    counts: dict[str, int]
    oldest_pending: datetime | None  # created time of the oldest email not yet delivered
    problems: list[MailProblem]


def status(conn: Connection, *, problems: int = 10) -> OutboxStatus:
    """Counts per status, the oldest undelivered email and the ``problems`` latest failures."""
    undelivered = _o.status.in_((MailStatus.PENDING.value, MailStatus.SENDING.value))
    oldest = conn.execute(select(func.min(_o.created)).where(undelivered)).scalar()
    failing = conn.execute(
        select(_o.id, _o.event, _o.status, _o.attempts, _o.created, _o.due, _o.last_error)
        .where(_o.last_error.is_not(None), _o.status != MailStatus.SENT.value)
        .order_by(_o.due.desc(), _o.id.desc())
        .limit(problems)
    ).all()
    return OutboxStatus(
        counts={s.value: 0 for s in MailStatus} | counts(conn),
        oldest_pending=as_utc(oldest) if oldest is not None else None,
        problems=[
            MailProblem(
                r.id, r.event, r.status, r.attempts, as_utc(r.created), as_utc(r.due), r.last_error
            )
            for r in failing
        ],
    )
