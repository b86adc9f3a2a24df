"""ServiceRequest/[id]/$import-priors: ask the DICOM gateway for a case patient's prior studies.

An MSO operation (DESIGN.md, Imaging; operation semantics:
http://hl7.org/fhir/R4/operations.html). It records the request as a Task
(http://hl7.org/fhir/R4/task.html) — ``code`` task-code ``import-priors``, ``focus`` the case
ServiceRequest, ``for`` its Patient, ``status`` requested, ``intent`` order, ``requester`` the
caller — and answers ``201 Created`` with that Task and its ``Location``. The DICOM gateway polls
``Task?code=…|import-priors&status=requested``, moves the Task to in-progress, queries the
hospital PACS (DICOM PS3.4 C.4 Query/Retrieve), retrieves what it finds linked to the case, and
completes (or fails) the Task with the counts and Study Instance UIDs as ``output``.

Who may: an administrator (or an organization-less system client) and the case's requester
(``MSO-PRIORS-403`` for anyone else who sees the case, such as its provider); a case the caller
cannot see, or a ServiceRequest that is no case, is a 404; a Done or Cancelled case a 409
(``MSO-PRIORS-409``: its images would no longer be attached to it).
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.principal import Principal
from fhir_server.codes import (
    CLOSED_CASE_STATUSES,
    OPERATION_IMPORT_PRIORS,
    TASK_CODE_IMPORT_PRIORS,
    TASK_CODE_SYSTEM,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_write, write_response
from fhir_server.interactions.operations import Operation, register
from fhir_server.storage.repository import Tx, format_instant, utc_now
from fhir_server.workflow.cases import is_case_request, state_of_case
from fhir_server.workflow.status import CaseState, Party, parties_of

MAY_IMPORT = frozenset({Party.ADMIN, Party.REQUESTER})


def _not_a_case(case_id: str) -> FhirError:
    return FhirError(
        404, "not-found", f"ServiceRequest/{case_id} is not a known case", code="MSO-PRIORS-404"
    )


def _requester_of(caller: Any) -> dict[str, Any] | None:
    """The Task's ``requester``: the caller's FHIR identity (none for a bare system client)."""
    if not isinstance(caller, Principal):
        return None
    if caller.practitioner_role:
        return {"reference": f"PractitionerRole/{caller.practitioner_role}"}
    if caller.fhir_user:
        return {"reference": caller.fhir_user}
    if caller.patient:
        return {"reference": f"Patient/{caller.patient}"}
    return None


def _check_caller(caller: Any, case: CaseState) -> None:
    if not MAY_IMPORT & parties_of(caller, case):
        raise FhirError(
            403,
            "forbidden",
            f"Only an administrator or the requester of case {case.case_number} may import "
            "prior studies",
            code="MSO-PRIORS-403",
        )
    if case.status in CLOSED_CASE_STATUSES:
        raise FhirError(
            409,
            "business-rule",
            f"Case {case.case_number} is '{case.status.value}': prior studies can no longer "
            "be attached to it",
            code="MSO-PRIORS-409",
        )


def priors_task(case_id: str, case: CaseState, requester: dict[str, Any] | None) -> dict:
    """The ``import-priors`` Task of a case (not yet stored)."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": concept(TASK_CODE_SYSTEM, TASK_CODE_IMPORT_PRIORS, "Import prior studies"),
        "focus": {"reference": f"ServiceRequest/{case_id}"},
        "basedOn": [{"reference": f"ServiceRequest/{case_id}"}],
        "authoredOn": format_instant(utc_now()),
        "description": f"Import prior imaging studies for case {case.case_number}",
    }
    if case.patient_ref:
        task["for"] = {"reference": case.patient_ref}
    if requester:
        task["requester"] = requester
    return task


def _import_priors(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/ServiceRequest/[id]/$import-priors."""
    case_id = req.resource_id or ""

    def work(tx: Tx) -> Any:
        try:
            request = tx.read("ServiceRequest", case_id)
        except FhirError as error:
            if error.status in (404, 410):
                raise _not_a_case(case_id) from None
            raise
        case = state_of_case(tx, case_id)
        if not is_case_request(request.resource) or case is None:
            raise _not_a_case(case_id)
        _check_caller(ctx.caller, case)
        with tx.internal():  # the server writes the Task on the caller's behalf
            return tx.create(priors_task(case_id, case, _requester_of(ctx.caller)))

    stored = run_write(ctx, work)
    return write_response(
        ctx, req, stored, status=201, message="Prior studies requested", interaction="create"
    )


register(
    Operation(
        name="import-priors",
        levels=frozenset({"instance"}),
        handler=_import_priors,
        definition=OPERATION_IMPORT_PRIORS,
        resource_types=frozenset({"ServiceRequest"}),
        idempotent=False,
        documentation="Ask the DICOM gateway to retrieve the case patient's prior studies "
        "from the hospital PACS (an import-priors Task)",
    )
)
