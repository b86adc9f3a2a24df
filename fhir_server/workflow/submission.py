"""Case submission: case number, active-Patient check, the case Task and its SLA due date.

A requester submits a case as one transaction Bundle (or a plain POST of the ServiceRequest).
In the same database transaction the server

* checks the case references an existing, active Patient (422 otherwise);
* gives the ServiceRequest its case number ``CASE-XXXXXX`` (six random characters from
  ``[0-9A-Z]``, drawn with :mod:`secrets`, so nothing can be guessed from a counter; a number
  already in use is drawn again);
* creates the case Task in status New (``requested`` / businessStatus ``new``) with
  ``restriction.period.end`` the SLA due instant for the case's priority.

Inside a transaction Bundle the Patient entry must come before the ServiceRequest entry (the
server runs POST entries in Bundle order), so that the Patient exists when the case is checked.
"""

from __future__ import annotations

import secrets
import string
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fhir_server.codes import (
    CASE_NUMBER_SYSTEM,
    CASE_STATUS_SYSTEM,
    PROFILE_CASE_TASK,
    TASK_CODE_CASE,
    TASK_CODE_SYSTEM,
    CaseStatus,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.storage.repository import format_instant
from fhir_server.workflow.cases import current
from fhir_server.workflow.status import ref_id

if TYPE_CHECKING:
    from fhir_server.config import Settings
    from fhir_server.storage.repository import Tx

CASE_NUMBER_ALPHABET = string.digits + string.ascii_uppercase
CASE_NUMBER_ATTEMPTS = 20


def draw_case_number() -> str:
    """A random case number ``CASE-XXXXXX``."""
    return "CASE-" + "".join(secrets.choice(CASE_NUMBER_ALPHABET) for _ in range(6))


def assign_case_number(tx: Tx, request: dict[str, Any]) -> str:
    """Give ``request`` a fresh case number (replacing any the client sent); returns it."""
    for _ in range(CASE_NUMBER_ATTEMPTS):
        number = draw_case_number()
        params = [("identifier", f"{CASE_NUMBER_SYSTEM}|{number}")]
        with tx.internal():
            tx.lock_criteria("ServiceRequest", params)
            taken = tx.find("ServiceRequest", params, limit=1)
        if not taken:
            others = [
                i
                for i in request.get("identifier") or ()
                if (i or {}).get("system") != CASE_NUMBER_SYSTEM
            ]
            request["identifier"] = [
                {"use": "official", "system": CASE_NUMBER_SYSTEM, "value": number},
                *others,
            ]
            return number
    raise FhirError(
        503, "transient", "Could not draw an unused case number; retry", code="MSO-CASE-503"
    )


def check_patient(tx: Tx, request: dict[str, Any]) -> str:
    """The case's Patient reference; 422 unless it names an existing, active Patient."""
    patient_id = ref_id(request.get("subject"), "Patient")
    patient = current(tx, "Patient", patient_id)
    if patient is None or patient.resource.get("active") is False:
        what = "no Patient" if patient_id is None else f"Patient/{patient_id}"
        state = "is inactive" if patient is not None else "is not a known Patient"
        if patient_id is None:
            state = "is given"
        raise FhirError(
            422,
            "business-rule",
            f"A case must reference an active Patient: {what} {state}",
            code="MSO-CASE-420",
            expression=["ServiceRequest.subject"],
        )
    return f"Patient/{patient_id}"


def sla_hours(settings: Settings, priority: str | None) -> int:
    """Hours a case of ``priority`` (routine, urgent, asap, stat) may take."""
    return {
        "stat": settings.sla_hours_stat,
        "asap": settings.sla_hours_asap,
        "urgent": settings.sla_hours_urgent,
    }.get(priority or "routine", settings.sla_hours_routine)


def case_task(
    request_id: str, request: dict[str, Any], *, now: datetime, settings: Settings
) -> dict[str, Any]:
    """The workflow Task of a newly submitted case (status New)."""
    stamp = format_instant(now)
    due = now + timedelta(hours=sla_hours(settings, request.get("priority")))
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE_CASE_TASK]},
        "identifier": [
            i for i in request.get("identifier") or () if i.get("system") == CASE_NUMBER_SYSTEM
        ],
        "basedOn": [{"reference": f"ServiceRequest/{request_id}"}],
        "status": "requested",
        "businessStatus": concept(CASE_STATUS_SYSTEM, CaseStatus.NEW.value),
        "intent": "order",
        "priority": request.get("priority") or "routine",
        "code": concept(TASK_CODE_SYSTEM, TASK_CODE_CASE),
        "focus": {"reference": f"ServiceRequest/{request_id}"},
        "for": request.get("subject"),
        "authoredOn": stamp,
        "lastModified": stamp,
        "restriction": {"period": {"start": stamp, "end": format_instant(due)}},
    }
    if request.get("requester"):
        task["requester"] = request["requester"]
    return task
