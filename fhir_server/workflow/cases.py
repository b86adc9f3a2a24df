"""Loading a case from the store: its Task, ServiceRequest, requester and open return issues.

Reads here are server work (``tx.internal()``): whether the caller may see the case is decided
by the access policy before (the caller's own read of the Task) and what the caller may do by
:mod:`fhir_server.workflow.status`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from fhir_server.codes import (
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    CASE_NUMBER_SYSTEM,
    TASK_CODE_CASE,
    TASK_CODE_CASE_ISSUE,
    TASK_CODE_SYSTEM,
    CaseIssueStatus,
    CaseStatus,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.storage.access_schema import case_access
from fhir_server.workflow.status import (
    CaseState,
    has_code,
    is_case_task,
    is_return_issue,
    issue_status_of,
    ref_id,
    status_of,
)

if TYPE_CHECKING:
    from fhir_server.storage.repository import StoredResource, Tx


def is_case_request(body: dict[str, Any] | None) -> bool:
    """A second-opinion case: a ServiceRequest with category ``second-opinion``."""
    if not body:
        return False
    return any(
        has_code(c, CASE_CATEGORY_SYSTEM, CASE_CATEGORY_SECOND_OPINION)
        for c in body.get("category") or ()
    )


def case_number_of(request: dict[str, Any] | None) -> str:
    """The ``CASE-XXXXXX`` of a case ServiceRequest ('' when it has none yet)."""
    for identifier in (request or {}).get("identifier") or ():
        if (identifier or {}).get("system") == CASE_NUMBER_SYSTEM:
            return str(identifier.get("value") or "")
    return ""


def current(tx: Tx, res_type: str, res_id: str | None) -> StoredResource | None:
    """The current, non-deleted version of a resource as the server sees it."""
    if not res_id:
        return None
    with tx.internal():
        found = tx.current(res_type, res_id)
    return found if found is not None and not found.deleted else None


def requester_org(tx: Tx, case_id: str) -> str | None:
    """The requesting organization of a case, as the access policy recorded it."""
    row = tx.conn.execute(
        select(case_access.c.requester_org).where(case_access.c.case_id == case_id)
    ).first()
    return row.requester_org if row else None


def case_task_of(tx: Tx, case_id: str) -> StoredResource | None:
    """The workflow Task of a case (``code`` case, ``focus`` the ServiceRequest)."""
    with tx.internal():
        found = tx.find(
            "Task",
            [
                ("focus", f"ServiceRequest/{case_id}"),
                ("code", f"{TASK_CODE_SYSTEM}|{TASK_CODE_CASE}"),
            ],
            limit=1,
        )
    return found[0] if found else None


def issues_of(tx: Tx, task_id: str) -> list[StoredResource]:
    """The case-issue Tasks of a case Task."""
    with tx.internal():
        return tx.find(
            "Task",
            [
                ("part-of", f"Task/{task_id}"),
                ("code", f"{TASK_CODE_SYSTEM}|{TASK_CODE_CASE_ISSUE}"),
            ],
        )


def state_of(tx: Tx, task_id: str, task: dict[str, Any]) -> CaseState:
    """The :class:`CaseState` of the case whose workflow Task is ``task``."""
    case_id = ref_id(task.get("focus"), "ServiceRequest") or ""
    request = current(tx, "ServiceRequest", case_id)
    body = request.resource if request is not None else {}
    status = status_of(task) or CaseStatus.NEW
    open_returns = 0
    if status is CaseStatus.RETURNED:
        open_returns = sum(
            1
            for issue in issues_of(tx, task_id)
            if is_return_issue(issue.resource)
            and issue_status_of(issue.resource) is CaseIssueStatus.OPEN
        )
    return CaseState(
        task_id=task_id,
        task=task,
        status=status,
        case_id=case_id,
        case_number=case_number_of(body) or case_id,
        owner=ref_id(task.get("owner"), "PractitionerRole"),
        requester_ref=(body.get("requester") or {}).get("reference"),
        requester_org=requester_org(tx, case_id) if case_id else None,
        patient_ref=(body.get("subject") or {}).get("reference"),
        open_return_issues=open_returns,
    )


def state_of_case(tx: Tx, case_id: str) -> CaseState | None:
    """The :class:`CaseState` of a case by its ServiceRequest id (``None``: no case Task)."""
    task = case_task_of(tx, case_id)
    if task is None:
        return None
    return state_of(tx, task.res_id, task.resource)


def case_task_state(tx: Tx, task_id: str) -> tuple[StoredResource, CaseState]:
    """The locked current case Task and its state; 404 if not a case Task."""
    with tx.internal():
        stored = tx.current("Task", task_id, for_update=True)
    if stored is None or stored.deleted or not is_case_task(stored.resource):
        raise FhirError(404, "not-found", f"Task/{task_id} is not a case Task", code="MSO-CASE-404")
    return stored, state_of(tx, task_id, stored.resource)
