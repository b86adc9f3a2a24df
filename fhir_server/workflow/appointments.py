"""Appointments of a case: proposed by one party, accepted or declined by the other (issue 5, 9).

FHIR R4 Appointment and AppointmentResponse (http://hl7.org/fhir/R4/appointment.html, the
"Request-Response" workflow in http://hl7.org/fhir/R4/appointment.html#statuses): DESIGN.md maps
an MSO appointment to an Appointment ``basedOn`` the case ServiceRequest, answered with
AppointmentResponses. The rules, in one place, enforced by guards (rows of
:mod:`fhir_server.workflow.guards`) so that REST, transaction Bundles and every other path obey
them (writes by the server itself, ``caller`` ``None``, pass):

* **Proposing** (create an Appointment ``basedOn`` a case): only the case's requester side or
  its assigned provider (:func:`fhir_server.workflow.status.parties_of`), only while the case is
  Accepted, In progress, Returned or Done (:data:`APPOINTMENT_CASE_STATUSES`: the provider is
  assigned and working on the case, or the recommendation is delivered and the requester may
  want to discuss it — the manual's "appointments for discussion or clarification" follow the
  recommendation). Status ``proposed``; ``start`` and ``end`` required, ``end`` after ``start``,
  ``start`` in the future; the participants are exactly the requester side (its
  PractitionerRole, or the Patient of a self-request) and the provider's PractitionerRole. The
  server sets the proposer's participation ``accepted`` and the other's ``needs-action``.
* **Answering** (create an AppointmentResponse): each party answers for its own participation,
  ``accepted`` or ``declined``; the server puts the case in the answer (extension
  ``case-reference``, search parameter ``AppointmentResponse?case=``) so both parties see it.
  The server then updates the Appointment: ``booked`` once every participant accepted,
  ``cancelled`` when one declines. A booked appointment may still be declined (cancelled) by
  either party.
* **Conflicts**: an appointment overlapping another ``booked`` (arrived, checked-in)
  appointment of the same provider is refused (409 naming the other appointment's id), when
  proposed and again when it would become booked, under a per-provider lock
  (:meth:`~fhir_server.storage.repository.Tx.lock_criteria` on PostgreSQL; SQLite write
  transactions are serialized) so two concurrent bookings of one slot cannot both succeed.
  Pending proposals do not block each other: whichever is accepted first books the slot.
* **Plain writes**: a party may PUT an Appointment to change free text or to cancel it; its
  case, participants, times and participation statuses change only through proposals and
  answers. Case appointments are cancelled, not deleted; answers are final.

Events: ``APPOINTMENT_PROPOSED`` when proposed, ``APPOINTMENT_ANSWERED`` when answered or
cancelled (subject: the Appointment).

Errors (stable codes): ``MSO-APPT-403`` not a party of the case, or answering for someone else
(403); ``MSO-APPT-409`` the case's status allows no appointments, or the appointment is no
longer open (409); ``MSO-APPT-410`` the provider is booked at that time (409);
``MSO-APPT-411`` an element only proposals and answers change (409); ``MSO-APPT-422`` invalid
proposal or answer (times, participants, status; 422).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fhir_server.codes import EXT_CASE_REFERENCE, CaseStatus
from fhir_server.fhir.outcome import FhirError
from fhir_server.hooks import HookEvent
from fhir_server.storage.repository import as_utc, format_instant, utc_now
from fhir_server.workflow.cases import case_number_of, current, is_case_request, state_of_case
from fhir_server.workflow.events import CaseEventKind, CaseEvents, case_event
from fhir_server.workflow.status import CaseState, Party, parties_of, ref_id

if TYPE_CHECKING:
    from fhir_server.storage.repository import StoredResource, Tx

APPOINTMENT_CASE_STATUSES = frozenset(
    {CaseStatus.ACCEPTED, CaseStatus.IN_PROGRESS, CaseStatus.RETURNED, CaseStatus.DONE}
)
"""Case statuses in which appointments are proposed and answered (see the module docstring)."""
OCCUPYING_STATUSES = ("booked", "arrived", "checked-in")
"""Appointment statuses that hold the provider's time."""
OPEN_STATUSES = frozenset({"proposed", "pending"})
"""Appointment statuses still waiting for answers."""
ANSWERS = frozenset({"accepted", "declined"})
"""``AppointmentResponse.participantStatus`` values a party may answer with."""


def _forbidden(message: str) -> FhirError:
    return FhirError(403, "forbidden", message, code="MSO-APPT-403")


def _conflict(message: str, code: str = "MSO-APPT-409", expression: str | None = None) -> FhirError:
    return FhirError(
        409, "business-rule", message, code=code, expression=[expression] if expression else None
    )


def _invalid(message: str, expression: str) -> FhirError:
    return FhirError(422, "business-rule", message, code="MSO-APPT-422", expression=[expression])


# -- who is who -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sides:
    """The two participants of a case appointment, as ``Type/id`` references."""

    requester: str
    provider: str

    def both(self) -> tuple[str, str]:
        """Both references, requester first."""
        return self.requester, self.provider


def sides_of(case: CaseState) -> Sides:
    """The requester side (PractitionerRole, or Patient for self-requests) and the provider."""
    if not case.requester_ref or not case.owner:
        raise _conflict(f"Case {case.case_number} has no requester and assigned provider")
    return Sides(requester=case.requester_ref, provider=f"PractitionerRole/{case.owner}")


def party_of(caller: Any, case: CaseState) -> Party:
    """Which side of the case ``caller`` acts for: its provider or its requester (else 403)."""
    parties = parties_of(caller, case)
    if Party.PROVIDER in parties:
        return Party.PROVIDER
    if Party.REQUESTER in parties:
        return Party.REQUESTER
    raise _forbidden(
        f"Only the requester and the assigned provider of case {case.case_number} propose and "
        "answer its appointments"
    )


def participant_of(party: Party, sides: Sides) -> str:
    """The participant reference of ``party``."""
    return sides.provider if party is Party.PROVIDER else sides.requester


def check_case_status(case: CaseState) -> None:
    """Appointments exist while the case is accepted, in progress, returned or done (409)."""
    if case.status not in APPOINTMENT_CASE_STATUSES:
        allowed = ", ".join(sorted(s.value for s in APPOINTMENT_CASE_STATUSES))
        raise _conflict(
            f"Case {case.case_number} is '{case.status.value}': appointments are made only "
            f"while a case is {allowed}",
            expression="Appointment.basedOn",
        )


def case_id_of(appointment: dict[str, Any]) -> str | None:
    """The case ServiceRequest an Appointment is ``basedOn`` (``None``: not a case's)."""
    return next(
        (cid for b in appointment.get("basedOn") or () if (cid := ref_id(b, "ServiceRequest"))),
        None,
    )


def _actor(participant: dict[str, Any]) -> str | None:
    return ((participant or {}).get("actor") or {}).get("reference")


# -- times ------------------------------------------------------------------------------------


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return as_utc(parsed) if parsed.tzinfo is not None else None


def period_of(appointment: dict[str, Any]) -> tuple[datetime, datetime] | None:
    """``(start, end)`` of an Appointment as UTC datetimes (``None`` when either is missing)."""
    start, end = _instant(appointment.get("start")), _instant(appointment.get("end"))
    return (start, end) if start is not None and end is not None else None


def check_times(appointment: dict[str, Any], *, now: datetime) -> tuple[datetime, datetime]:
    """``start`` and ``end`` present, ``end`` after ``start``, ``start`` in the future (422)."""
    for element in ("start", "end"):
        if _instant(appointment.get(element)) is None:
            raise _invalid(
                f"An appointment needs a {element} instant (with a time zone)",
                f"Appointment.{element}",
            )
    start, end = period_of(appointment) or (now, now)
    if end <= start:
        raise _invalid("An appointment ends after it starts", "Appointment.end")
    if start <= now:
        raise _invalid("An appointment is proposed for a time in the future", "Appointment.start")
    return start, end


# -- conflicts --------------------------------------------------------------------------------


def lock_provider(tx: Tx, provider: str) -> None:
    """Serialize bookings of one provider (PostgreSQL advisory lock until the commit)."""
    tx.lock_criteria("Appointment", [("actor", provider), ("status", "booked")])


def find_conflict(
    tx: Tx, provider: str, start: datetime, end: datetime, *, exclude: str | None = None
) -> StoredResource | None:
    """Another occupying appointment of ``provider`` overlapping ``[start, end)``."""
    with tx.internal():
        found = tx.find(
            "Appointment",
            [
                ("actor", provider),
                ("status", ",".join(OCCUPYING_STATUSES)),
                ("date", f"lt{format_instant(end)}"),
            ],
        )
    for other in sorted(found, key=lambda a: a.resource.get("start") or ""):
        period = period_of(other.resource)
        if other.res_id != exclude and period is not None and period[1] > start:
            return other
    return None


def check_no_conflict(
    tx: Tx, provider: str, start: datetime, end: datetime, *, exclude: str | None = None
) -> None:
    """409 when ``provider`` has a booked appointment overlapping ``[start, end)``."""
    lock_provider(tx, provider)
    other = find_conflict(tx, provider, start, end, exclude=exclude)
    if other is not None:
        raise _conflict(
            f"The provider already has an appointment at that time (Appointment/{other.res_id}); "
            "choose another time",
            code="MSO-APPT-410",
            expression="Appointment.start",
        )


# -- the rules --------------------------------------------------------------------------------


def proposal(
    tx: Tx, case: CaseState, body: dict[str, Any], *, caller: Any, now: datetime
) -> dict[str, Any]:
    """Check a new case Appointment from ``caller``; the Appointment to store."""
    party = party_of(caller, case)
    check_case_status(case)
    sides = sides_of(case)
    proposer = participant_of(party, sides)
    if body.get("status") != "proposed":
        raise _invalid(
            "A new appointment is 'proposed'; the other party's answer books it",
            "Appointment.status",
        )
    start, end = check_times(body, now=now)
    participants = body.get("participant") or []
    actors = [_actor(p) for p in participants]
    if sorted(a or "" for a in actors) != sorted(sides.both()):
        raise _invalid(
            f"The participants of an appointment for case {case.case_number} are its requester "
            f"({sides.requester}) and its assigned provider ({sides.provider}), once each",
            "Appointment.participant",
        )
    check_no_conflict(tx, sides.provider, start, end)
    out = copy.deepcopy(body)
    for participant in out["participant"]:
        participant["status"] = "accepted" if _actor(participant) == proposer else "needs-action"
        participant.setdefault("required", "required")
    out.setdefault("created", format_instant(now))
    return out


def answered(
    tx: Tx,
    case: CaseState,
    appointment: StoredResource,
    response: dict[str, Any],
    *,
    caller: Any,
    now: datetime,
) -> tuple[dict[str, Any], str]:
    """Check ``caller``'s AppointmentResponse; ``(the updated Appointment, the responder)``.

    The responder's participation takes the answer; every participant accepted books the
    appointment (conflicts checked again), a decline cancels it.
    """
    party = party_of(caller, case)
    check_case_status(case)
    sides = sides_of(case)
    responder = participant_of(party, sides)
    answer = response.get("participantStatus")
    if answer not in ANSWERS:
        raise _invalid(
            "An answer to an appointment is 'accepted' or 'declined'",
            "AppointmentResponse.participantStatus",
        )
    actor = _actor(response)
    if actor is not None and actor != responder:
        raise _forbidden(f"{responder} answers for its own participation only, not for {actor}")
    body = copy.deepcopy(appointment.resource)
    state = body.get("status")
    if state not in OPEN_STATUSES and not (state in OCCUPYING_STATUSES and answer == "declined"):
        raise _conflict(
            f"Appointment/{appointment.res_id} is '{state}' and takes no more answers",
            expression="AppointmentResponse.appointment",
        )
    mine = [p for p in body.get("participant") or () if _actor(p) == responder]
    if not mine:
        raise _forbidden(f"{responder} is not a participant of Appointment/{appointment.res_id}")
    for participant in mine:
        participant["status"] = answer
    if answer == "declined":
        body["status"] = "cancelled"
        body["cancelationReason"] = {"text": f"Declined by {responder}"}
    elif all(p.get("status") == "accepted" for p in body.get("participant") or ()):
        period = period_of(body)
        if period is None or period[0] <= now:
            raise _conflict(
                f"Appointment/{appointment.res_id} starts in the past; propose a new time",
                expression="Appointment.start",
            )
        check_no_conflict(tx, sides.provider, *period, exclude=appointment.res_id)
        body["status"] = "booked"
    return body, responder


CONTROLLED_ELEMENTS = ("basedOn", "start", "end", "participant", "slot")
"""Appointment elements only proposals and answers set."""


def check_plain_write(
    case: CaseState, previous: dict[str, Any], body: dict[str, Any], *, caller: Any
) -> bool:
    """A party's PUT/PATCH of a case Appointment: free text, or cancelling it. True: cancelled."""
    party_of(caller, case)
    for element in CONTROLLED_ELEMENTS:
        if previous.get(element) != body.get(element):
            raise _conflict(
                f"Appointment.{element} changes only through a new proposal or an "
                "AppointmentResponse",
                code="MSO-APPT-411",
                expression=f"Appointment.{element}",
            )
    before, after = previous.get("status"), body.get("status")
    if before == after:
        return False
    cancellable = OPEN_STATUSES | set(OCCUPYING_STATUSES)
    if after == "cancelled" and before in cancellable:
        return True
    raise _conflict(
        f"An appointment goes from '{before}' to '{after}' only through the answers of its "
        "participants (or is cancelled)",
        code="MSO-APPT-411",
        expression="Appointment.status",
    )


def stamp_case(response: dict[str, Any], case_id: str) -> None:
    """Put the case in an AppointmentResponse (extension ``case-reference``, indexed by the MSO
    search parameter ``case``), so that the access policy gives the answer to both parties."""
    extensions = [e for e in response.get("extension") or () if e.get("url") != EXT_CASE_REFERENCE]
    case_ref = {"reference": f"ServiceRequest/{case_id}"}
    response["extension"] = [*extensions, {"url": EXT_CASE_REFERENCE, "valueReference": case_ref}]


# -- hooks ------------------------------------------------------------------------------------


@dataclass
class Appointments:
    """The guards holding Appointment and AppointmentResponse writes to the rules (rows of
    :mod:`fhir_server.workflow.guards`; callers' writes only)."""

    events: CaseEvents

    def propose(self, event: HookEvent) -> None:
        """Before a caller creates an Appointment: a case's is a checked proposal."""
        body = event.resource or {}
        case = self._case(event.tx, body)
        if case is not None:
            proposed = proposal(event.tx, case, body, caller=event.caller, now=utc_now())
            body.clear()
            body.update(proposed)

    def proposed(self, event: HookEvent) -> None:
        """After a case Appointment is created: the APPOINTMENT_PROPOSED event."""
        body = event.resource or {}
        case = self._case(event.tx, body)
        if case is not None:
            subject = f"Appointment/{event.resource_id}"
            detail = {"start": body.get("start"), "end": body.get("end")}
            kind = CaseEventKind.APPOINTMENT_PROPOSED
            self._emit(event.tx, kind, case, event.caller, subject, detail)

    def answer(self, event: HookEvent) -> None:
        """Before a caller creates an AppointmentResponse: the answer updates the Appointment."""
        self._answer(event.tx, event.resource or {}, event.caller)

    def appointment_written(self, event: HookEvent) -> None:
        """A PUT/PATCH of a case Appointment: free text, or a cancellation by a party."""
        tx, previous, body = event.tx, event.previous or {}, event.resource or {}
        case = self._case(tx, previous) or self._case(tx, body)
        if case is None:
            return
        if check_plain_write(case, previous, body, caller=event.caller):
            subject = f"Appointment/{event.resource_id}"
            detail = {"status": "cancelled"}
            kind = CaseEventKind.APPOINTMENT_ANSWERED
            self._emit(tx, kind, case, event.caller, subject, detail)

    def appointment_deleted(self, event: HookEvent) -> None:
        """A case Appointment is cancelled, not deleted."""
        if self._case(event.tx, event.previous or {}) is not None:
            raise _conflict(
                "A case appointment is not deleted: cancel it (status 'cancelled')",
                code="MSO-APPT-411",
            )

    def answer_changed(self, event: HookEvent) -> None:
        """An answer to a case appointment is final: neither changed nor deleted."""
        if self._answers_case(event.tx, event.previous or {}):
            raise _conflict(
                "An answer to a case appointment is final; cancel the appointment or propose "
                "a new one",
                code="MSO-APPT-411",
            )

    def _answer(self, tx: Tx, response: dict[str, Any], caller: Any) -> None:
        appointment_id = ref_id(response.get("appointment"), "Appointment")
        if appointment_id is None:
            return
        tx.read("Appointment", appointment_id)  # 404 unless the caller sees it
        with tx.internal():
            stored = tx.current("Appointment", appointment_id, for_update=True)
        if stored is None or stored.deleted:
            return
        case = self._case(tx, stored.resource)
        if case is None:
            return
        updated, responder = answered(tx, case, stored, response, caller=caller, now=utc_now())
        response.setdefault("actor", {"reference": responder})
        stamp_case(response, case.case_id)
        with tx.internal():
            tx.update("Appointment", appointment_id, updated, if_match=stored.version)
        detail = {"answer": response.get("participantStatus"), "status": updated.get("status")}
        subject = f"Appointment/{appointment_id}"
        self._emit(tx, CaseEventKind.APPOINTMENT_ANSWERED, case, caller, subject, detail)

    def _case(self, tx: Tx, appointment: dict[str, Any]) -> CaseState | None:
        """The case of an Appointment ``basedOn`` a case ServiceRequest (``None``: no case's).

        Appointments for other ServiceRequests (orders arriving over HL7 v2, say) are not
        held to the case rules.
        """
        case_id = case_id_of(appointment)
        request = current(tx, "ServiceRequest", case_id)
        if request is None or not is_case_request(request.resource):
            return None
        case = state_of_case(tx, request.res_id)
        if case is None:
            raise _invalid(
                f"Case {case_number_of(request.resource)} has no workflow Task yet",
                "Appointment.basedOn",
            )
        return case

    def _answers_case(self, tx: Tx, response: dict[str, Any]) -> bool:
        found = current(tx, "Appointment", ref_id(response.get("appointment"), "Appointment"))
        return found is not None and case_id_of(found.resource) is not None

    def _emit(
        self,
        tx: Tx,
        kind: CaseEventKind,
        case: CaseState,
        caller: Any,
        subject: str,
        detail: dict[str, Any],
    ) -> None:
        self.events.emit(tx, case_event(kind, case, actor=caller, subject=subject, detail=detail))
