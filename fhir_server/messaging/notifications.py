"""Case-event notifications: an in-app ``Communication`` per recipient, email when offline.

:class:`Notifier` subscribes to the :class:`~fhir_server.workflow.events.CaseEvents` bus and
runs inside the transaction of the event (as server work), so notifications and outbox emails
commit or roll back with the case change that caused them.

An in-app notification is a FHIR ``Communication`` (DESIGN.md: chat is a Communication
``basedOn`` the case; a notification is not chat, so it points at the case with ``about``):
category MSO ``notification``, status ``completed``, ``recipient`` the user's FHIR identity
(``PractitionerRole/…``, ``Patient/…``; an account without one is addressed by
``identifier`` = :data:`USERNAME_SYSTEM` | user name), ``about`` the case ServiceRequest and a
one-sentence payload naming the case number. Users find theirs with
``Communication?category=<system>|notification&recipient=<their fhirUser>``. One Communication
is written per FHIR identity (users sharing an identity share it); one email per user who has
an address and is not online (:mod:`.presence`).
"""

from __future__ import annotations

from email.utils import parseaddr
from typing import Any

from fhir_server.codes import (
    COMMUNICATION_CATEGORY_SYSTEM,
    COMMUNICATION_NOTIFICATION,
    USERNAME_SYSTEM,
    concept,
)
from fhir_server.config import Settings
from fhir_server.messaging import chat, emails, outbox, presence
from fhir_server.messaging.recipients import Recipient, resolve
from fhir_server.messaging.rules import notices_for
from fhir_server.storage.repository import Tx, format_instant, utc_now
from fhir_server.workflow.events import CaseEvent, CaseEventKind, CaseEvents


def notification(event: CaseEvent, text: str, recipient: dict[str, Any], sent: str) -> dict:
    """The in-app notification ``Communication`` telling ``recipient`` about ``event``."""
    return {
        "resourceType": "Communication",
        "status": "completed",
        "category": [
            concept(COMMUNICATION_CATEGORY_SYSTEM, COMMUNICATION_NOTIFICATION, "Notification")
        ],
        "topic": {"text": event.kind.value},
        "about": [{"reference": f"ServiceRequest/{event.case_id}", "display": event.case_number}],
        "recipient": [recipient],
        "sent": sent,
        "payload": [{"contentString": text}],
    }


def recipient_reference(user: Recipient) -> dict[str, Any]:
    """How ``user`` is addressed: its FHIR identity, else its user name as an identifier."""
    if user.identity:
        return {"reference": user.identity}
    return {"identifier": {"system": USERNAME_SYSTEM, "value": user.username}}


class Notifier:
    """The case-event subscriber writing notifications and outbox emails."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "mso.invalid"

    def subscribe(self, events: CaseEvents) -> None:
        """Listen to every event kind on ``events`` (kinds without rules are ignored)."""
        events.subscribe(self.on_event)

    def on_event(self, tx: Tx, event: CaseEvent) -> None:
        """Notify the audiences of ``event`` in ``tx``."""
        notices = notices_for(event)
        if not notices:
            return
        conn = tx.conn
        sent = format_instant(utc_now())
        notified: set[str] = set()
        mails: list[outbox.OutgoingMail] = []
        for notice in notices:
            users = [u for u in resolve(conn, event, notice.audience) if u.username not in notified]
            if not users:
                continue
            notified.update(u.username for u in users)
            subject, text = notice.render(event.case_number, str(event.detail.get("sender", "")))
            addressed: set[str] = set()
            for user in users:
                key = user.identity or f"user:{user.username}"
                if key not in addressed:
                    addressed.add(key)
                    tx.create(notification(event, text, recipient_reference(user), sent))
            mails += self._emails(tx, event, users, subject, text)
        outbox.enqueue(conn, mails, domain=self.domain)

    def _emails(
        self, tx: Tx, event: CaseEvent, users: list[Recipient], subject: str, text: str
    ) -> list[outbox.OutgoingMail]:
        with_address = [u for u in users if u.email]
        if event.kind is CaseEventKind.CHAT_MESSAGE:
            if not chat.starts_burst(event, self.settings.chat_email_quiet_seconds):
                return []  # one email a conversation burst: its first message's
            text = chat.email_text(event, text, self.settings.chat_email_snippet_chars)
        if not with_address:
            return []
        online = presence.online_among(
            tx.conn, (u.username for u in with_address), self.settings.presence_window
        )
        subject, body = emails.compose(
            self.settings, subject=subject, text=text, case_id=event.case_id
        )
        return [
            outbox.OutgoingMail(
                to_addr=u.email or "",
                subject=subject,
                body=body,
                event=event.kind.value,
                case_id=event.case_id,
                username=u.username,
            )
            for u in with_address
            if u.username not in online
        ]
