"""Which case event notifies whom, and with which words (issue 5, Notifications).

The words are fixed templates whose variables are the case number and, for a chat message, the
name of its sender: a notification and its email never carry clinical details (no diagnosis,
question, reason or patient name), whatever the event's ``detail`` holds. Users are told what
happened and open the case to see more.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from fhir_server.workflow.events import CaseEvent, CaseEventKind


class Audience(StrEnum):
    """Who an event is for, relative to its case."""

    ADMINS = "admins"
    """Every enabled user with the admin role."""
    REQUESTER = "requester"
    """The case's requester (its users; the requesting organization's when none matches)."""
    PROVIDER = "provider"
    """The users acting as the case's assigned PractitionerRole."""
    REQUESTER_ORG = "requester-org"
    """Every requester user of the requesting organization (or the self-requesting patient)."""
    OTHER_PARTY = "other-party"
    """The requester when the provider acted, the provider when the requester did (both when
    neither did, e.g. an admin or the server)."""


@dataclass(frozen=True, slots=True)
class Notice:
    """What one audience is told: an email subject and a one-sentence text (``{case}`` is the
    case number, ``{sender}`` the display of a chat message's sender)."""

    audience: Audience
    subject: str
    text: str

    def render(self, case_number: str, sender: str = "") -> tuple[str, str]:
        """The subject and text for ``case_number`` (and a chat message's ``sender``)."""
        names = {"case": case_number, "sender": sender or "the other party"}
        return self.subject.format(**names), self.text.format(**names)


def _n(audience: Audience, subject: str, text: str) -> Notice:
    return Notice(audience, subject, text)


K, A = CaseEventKind, Audience

RULES: MappingProxyType[CaseEventKind, tuple[Notice, ...]] = MappingProxyType(
    {
        K.SUBMITTED: (
            _n(A.ADMINS, "New case {case}", "New case {case} was submitted and awaits assignment."),
        ),
        K.ASSIGNED: (
            _n(A.PROVIDER, "Case {case} assigned to you", "Case {case} was assigned to you."),
            _n(
                A.REQUESTER,
                "Case {case} assigned",
                "Case {case} was assigned to a specialist.",
            ),
        ),
        K.ACCEPTED: (
            _n(
                A.REQUESTER,
                "Case {case} accepted",
                "Case {case} was accepted by the specialist.",
            ),
        ),
        K.REJECTED: (
            _n(
                A.REQUESTER,
                "Case {case} declined by the specialist",
                "Case {case} was declined by the assigned specialist and will be reassigned.",
            ),
            _n(
                A.ADMINS,
                "Case {case} rejected: reassignment needed",
                "Case {case} was rejected by the assigned specialist and needs a new assignment.",
            ),
        ),
        K.RETURNED: (
            _n(
                A.REQUESTER,
                "Case {case} returned to you",
                "Case {case} was returned to you: the specialist needs more information.",
            ),
        ),
        K.DONE: (
            _n(
                A.REQUESTER,
                "Second opinion ready for case {case}",
                "The second opinion for case {case} is ready.",
            ),
        ),
        K.CANCELLED: (_n(A.PROVIDER, "Case {case} cancelled", "Case {case} was cancelled."),),
        K.ISSUE_OPENED: (
            _n(
                A.REQUESTER,
                "New issue on case {case}",
                "An issue was raised on case {case}.",
            ),
        ),
        K.ISSUE_RESOLVED: (
            _n(
                A.PROVIDER,
                "Question answered on case {case}",
                "The requester answered your question on case {case}.",
            ),
        ),
        K.APPOINTMENT_PROPOSED: (
            _n(
                A.OTHER_PARTY,
                "Appointment proposed for case {case}",
                "An appointment was proposed for case {case}.",
            ),
        ),
        K.APPOINTMENT_ANSWERED: (
            _n(
                A.OTHER_PARTY,
                "Appointment answered for case {case}",
                "The appointment proposal for case {case} was answered.",
            ),
        ),
        K.CHAT_MESSAGE: (
            _n(
                A.OTHER_PARTY,
                "New message on case {case}",
                "New message from {sender} on case {case}.",
            ),
        ),
        K.INVOICE_ISSUED: (
            _n(
                A.REQUESTER_ORG,
                "Invoice for case {case}",
                "An invoice was issued for case {case}.",
            ),
        ),
    }
)
"""The notices of each event kind; kinds absent here notify nobody."""

del K, A


def notices_for(event: CaseEvent) -> tuple[Notice, ...]:
    """What ``event`` tells whom. The issue a ``$return`` opens notifies nobody itself: the
    RETURNED notice already told the requester (one action, one message)."""
    if event.kind is CaseEventKind.ISSUE_OPENED and event.detail.get("return"):
        return ()
    return RULES.get(event.kind, ())
