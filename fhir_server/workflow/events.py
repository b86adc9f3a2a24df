"""Case events: what the workflow announces, inside the transaction that caused it.

The state machine and the case operations emit a :class:`CaseEvent` for every transition and
case-level happening (new case, assigned, accepted, rejected, returned, done, cancelled, new
appointment, new issue, invoice …). Subscribers (notifications, billing) run in the same
database transaction, so an event and its consequences commit or roll back together, and a
failing subscriber fails the request rather than leaving half a case behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fhir_server.workflow.event_kinds import CaseEventKind

if TYPE_CHECKING:
    from fhir_server.storage.repository import Tx
    from fhir_server.workflow.status import CaseState

__all__ = ["CaseEvent", "CaseEventKind", "CaseEvents", "Subscriber", "case_event"]


@dataclass(frozen=True, slots=True)
class CaseEvent:
    """One case event.

    ``case_id`` is the case ServiceRequest's id and ``case_number`` its ``CASE-XXXXXX``;
    ``task_id`` the case Task's; ``actor`` the principal who caused it (``None`` for the
    server); ``requester`` / ``provider`` the ``Type/id`` references of the case's requester
    and assigned PractitionerRole (or ``None``); ``subject`` the resource the event is about
    when it is not the case itself (an Appointment, a case issue Task, an Invoice).
    """

    kind: CaseEventKind
    case_id: str
    case_number: str
    task_id: str | None = None
    actor: Any = None
    requester: str | None = None
    requester_org: str | None = None
    provider: str | None = None
    subject: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[["Tx", CaseEvent], None]


class CaseEvents:
    """Subscribers per event kind (``None``: every kind), called in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[CaseEventKind | None, Subscriber]] = []

    def subscribe(self, subscriber: Subscriber, kind: CaseEventKind | None = None) -> None:
        """Call ``subscriber(tx, event)`` for events of ``kind`` (every kind when ``None``)."""
        self._subscribers.append((kind, subscriber))

    def emit(self, tx: Tx, event: CaseEvent) -> None:
        """Announce ``event`` inside ``tx``; subscribers run as server work (no caller limits)."""
        with tx.internal():
            for kind, subscriber in self._subscribers:
                if kind is None or kind is event.kind:
                    subscriber(tx, event)


def case_event(
    kind: CaseEventKind,
    case: CaseState,
    *,
    actor: Any,
    provider: str | None = None,
    subject: str | None = None,
    detail: dict[str, Any] | None = None,
) -> CaseEvent:
    """The :class:`CaseEvent` of ``kind`` about ``case`` (its requester and assigned provider;
    ``provider`` names the PractitionerRole id when it is not yet the case's owner)."""
    provider = provider or case.owner
    return CaseEvent(
        kind=kind,
        case_id=case.case_id,
        case_number=case.case_number,
        task_id=case.task_id,
        actor=actor,
        requester=case.requester_ref,
        requester_org=case.requester_org,
        provider=f"PractitionerRole/{provider}" if provider else None,
        subject=subject,
        detail=detail or {},
    )
