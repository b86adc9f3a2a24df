"""ImagingStudy/[id]/$deidentify: an administrator asks for a de-identified copy of a study.

An MSO operation (DESIGN.md, Imaging; operation semantics:
http://hl7.org/fhir/R4/operations.html) for cases shared with external specialists. It records
the request as a Task (http://hl7.org/fhir/R4/task.html) — ``code`` task-code
``deidentify-imaging``, ``focus`` the ImagingStudy, ``basedOn`` its case ServiceRequest,
``for`` its subject, ``status`` requested, ``intent`` order, ``requester`` the caller — and
answers ``201 Created`` with that Task. The DICOM gateway (``dicom_gateway.deidentify_task``)
polls for it, de-identifies every instance of the study with the DICOM PS3.15 Annex E Basic
Application Level Confidentiality Profile, sends the copy through its spool to Orthanc linked to
the case, stores the reversal mapping as a Binary only administrators read, and completes the
Task (``output``: the new StudyInstanceUID and the mapping Binary) or fails it.

Parameters (a Parameters body, all optional):

* ``case`` — ``valueReference`` to the case ServiceRequest the copy is for, when the study is
  linked to several cases (otherwise its one ``basedOn`` case);
* ``replace`` — ``valueBoolean``: once the copy is sent, the gateway labels the original
  ``withheld-from-provider`` (``meta.security``), so the case's provider sees only the copy,
  by every path (FHIR API, ``_include``, the DICOMweb bridge); the requester, the patient and
  administrators still see the original. Recorded as the Task's ``input`` ``replace``.

Only administrators and organization-less system clients may call it (``MSO-DEID-403``); an
ImagingStudy the caller cannot see is a 404; a study linked to no case, or to several without
``case``, a 422 (``MSO-DEID-422``).
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.policy import require_platform
from fhir_server.auth.principal import Principal
from fhir_server.codes import (
    OPERATION_DEIDENTIFY_IMAGING,
    TASK_CODE_DEIDENTIFY_IMAGING,
    TASK_CODE_SYSTEM,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_write, write_response
from fhir_server.interactions.operations import Operation, register
from fhir_server.storage.repository import Tx, format_instant, utc_now
from fhir_server.workflow.cases import is_case_request
from fhir_server.workflow.status import ref_id

DISPLAY = "De-identify imaging study"
REPLACE_INPUT = "replace"
"""``Task.input`` (type text) asking the gateway to withhold the original from providers."""


def _unprocessable(message: str) -> FhirError:
    return FhirError(422, "processing", message, code="MSO-DEID-422")


def _parameters(req: FhirRequest) -> dict[str, Any]:
    """Parameter name -> its ``value[x]`` (first occurrence)."""
    body = req.body
    if body is None:
        return {}
    if body.get("resourceType") != "Parameters":
        raise FhirError(
            400, "invalid", "$deidentify takes a Parameters resource", code="MSO-DEID-400"
        )
    out: dict[str, Any] = {}
    for parameter in body.get("parameter") or ():
        name = (parameter or {}).get("name")
        if not isinstance(name, str) or name in out:
            continue
        out[name] = next((v for k, v in parameter.items() if k.startswith("value")), None)
    return out


def _replace(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise FhirError(400, "invalid", "'replace' must be a valueBoolean", code="MSO-DEID-400")


def _case_of(study: dict[str, Any], wanted: Any) -> str:
    """The id of the case ServiceRequest the copy is for."""
    cases = [cid for b in study.get("basedOn") or () if (cid := ref_id(b, "ServiceRequest"))]
    if wanted is not None:
        case_id = ref_id(wanted, "ServiceRequest") if isinstance(wanted, dict) else None
        if case_id is None or case_id not in cases:
            raise _unprocessable("'case' must reference a case ServiceRequest the study is for")
        return case_id
    if len(cases) != 1:
        raise _unprocessable(
            f"The study is linked to {len(cases)} cases: name one with the 'case' parameter"
            if cases
            else "The study is linked to no case"
        )
    return cases[0]


def _requester_of(caller: Any) -> dict[str, Any] | None:
    if isinstance(caller, Principal) and caller.fhir_user:
        return {"reference": caller.fhir_user}
    return None


def deidentify_task(
    study_id: str,
    case_id: str,
    subject: dict[str, Any] | None,
    requester: dict[str, Any] | None,
    *,
    replace: bool = False,
) -> dict[str, Any]:
    """The ``deidentify-imaging`` Task of a study (not yet stored)."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": concept(TASK_CODE_SYSTEM, TASK_CODE_DEIDENTIFY_IMAGING, DISPLAY),
        "focus": {"reference": f"ImagingStudy/{study_id}"},
        "basedOn": [{"reference": f"ServiceRequest/{case_id}"}],
        "authoredOn": format_instant(utc_now()),
        "description": "De-identified copy (DICOM PS3.15 Annex E basic profile) for the case",
    }
    if subject and subject.get("reference"):
        task["for"] = {"reference": subject["reference"]}
    if requester:
        task["requester"] = requester
    if replace:
        task["input"] = [{"type": {"text": REPLACE_INPUT}, "valueBoolean": True}]
    return task


def _deidentify(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/ImagingStudy/[id]/$deidentify."""
    require_platform(ctx.caller, "may de-identify imaging studies", "MSO-DEID-403")
    params = _parameters(req)
    replace = _replace(params.get("replace"))
    study_id = req.resource_id or ""

    def work(tx: Tx) -> Any:
        try:
            study = tx.read("ImagingStudy", study_id).resource
        except FhirError as error:
            if error.status == 410:
                raise FhirError(
                    404, "not-found", f"ImagingStudy/{study_id} is deleted", code="MSO-DEID-404"
                ) from None
            raise
        case_id = _case_of(study, params.get("case"))
        with tx.internal():  # the server writes the Task on the caller's behalf
            case = tx.current("ServiceRequest", case_id)
            if case is None or case.deleted or not is_case_request(case.resource):
                raise _unprocessable(f"ServiceRequest/{case_id} is not a case")
            task = deidentify_task(
                study_id, case_id, study.get("subject"), _requester_of(ctx.caller), replace=replace
            )
            return tx.create(task)

    stored = run_write(ctx, work)
    return write_response(
        ctx, req, stored, status=201, message="De-identification requested", interaction="create"
    )


register(
    Operation(
        name="deidentify",
        levels=frozenset({"instance"}),
        handler=_deidentify,
        definition=OPERATION_DEIDENTIFY_IMAGING,
        resource_types=frozenset({"ImagingStudy"}),
        idempotent=False,
        documentation="Admin: ask the DICOM gateway for a de-identified copy of the study "
        "(DICOM PS3.15 Annex E basic profile) for its case (a deidentify-imaging Task)",
    )
)
