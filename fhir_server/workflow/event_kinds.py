"""The kinds of case event (:class:`CaseEventKind`): what can happen to a case.

A module of its own so that the state machine (:mod:`fhir_server.workflow.status`, whose
transitions name the event they cause) and the event bus (:mod:`fhir_server.workflow.events`,
whose events carry a :class:`~fhir_server.workflow.status.CaseState`) import it without
importing each other: the arrow goes ``events`` -> ``status`` -> ``event_kinds`` only.
"""

from __future__ import annotations

from enum import StrEnum


class CaseEventKind(StrEnum):
    """What happened to a case."""

    SUBMITTED = "submitted"
    ASSIGNED = "assigned"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STARTED = "started"
    RETURNED = "returned"
    RESUMED = "resumed"
    DONE = "done"
    CANCELLED = "cancelled"
    ISSUE_OPENED = "issue-opened"
    ISSUE_RESOLVED = "issue-resolved"
    APPOINTMENT_PROPOSED = "appointment-proposed"
    APPOINTMENT_ANSWERED = "appointment-answered"
    INVOICE_ISSUED = "invoice-issued"
    INVOICE_PAID = "invoice-paid"
    FEEDBACK = "feedback"
    CHAT_MESSAGE = "chat-message"
