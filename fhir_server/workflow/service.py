"""The workflow service: runs case transitions and guards every write that touches a case.

:class:`Workflow` is built by :func:`fhir_server.app.create_app` on the application's one
case-event bus and published as ``Services.workflow`` (operations reach it as
``ctx.services.workflow``). It

* performs the case operations (``$assign`` … ``$cancel``, ``$answer``): the caller's move is
  decided by :mod:`fhir_server.workflow.status` on the locked current Task, then the server
  writes (``tx.internal()``) the Task and what the move implies, and emits the
  :class:`~fhir_server.workflow.events.CaseEvent` — all in one database transaction;
* provides the guards (rows of the table in :mod:`fhir_server.workflow.guards`) so that a
  plain PUT/PATCH of a case Task, a transaction Bundle entry, a case-issue Task, a case
  ServiceRequest or a case document written by any path goes through the same rules. Writes
  by the workflow itself (``caller`` ``None``) pass them.

When a plain write of the case Task changes its status, the guard runs the same transition as
the operation would (checks, side effects, event) and overwrites the workflow-controlled
elements of the incoming Task with the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from fhir_server.auth.principal import Principal
from fhir_server.codes import (
    CASE_ISSUE_STATUS_SYSTEM,
    CASE_NUMBER_PATTERN,
    CASE_NUMBER_SYSTEM,
    CASE_STATUS_SYSTEM,
    PROFILE_CASE_ISSUE,
    TASK_CODE_CASE_ISSUE,
    TASK_CODE_SYSTEM,
    CaseIssueStatus,
    CaseStatus,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.hooks import HookEvent
from fhir_server.storage.repository import format_instant, utc_now
from fhir_server.workflow import documents, status
from fhir_server.workflow.cases import (
    case_number_of,
    case_task_of,
    case_task_state,
    current,
    is_case_request,
    requester_org,
    state_of,
    state_of_case,
)
from fhir_server.workflow.events import CaseEventKind, CaseEvents, case_event
from fhir_server.workflow.status import Action, CaseState, Move
from fhir_server.workflow.submission import (
    assign_case_number,
    case_task,
    check_patient,
)

if TYPE_CHECKING:
    from fhir_server.config import Settings
    from fhir_server.storage.blobs import BlobStore
    from fhir_server.storage.repository import StoredResource, Tx

DRAFT_REPORT_STATUSES = frozenset({"registered", "partial", "preliminary"})
RELEASED_REPORT_STATUSES = frozenset({"final", "amended", "corrected", "appended"})


@dataclass
class Workflow:
    """Case transitions, and the guards that hold every write path to them."""

    settings: Settings
    events: CaseEvents
    blobs: BlobStore

    # -- operations -----------------------------------------------------------------------

    def transition(
        self, tx: Tx, task_id: str, action: Action, move: Move, *, caller: Any
    ) -> StoredResource:
        """Run ``action`` on the case Task ``task_id`` for ``caller``; the new Task version.

        The caller must see the Task (404 otherwise); the decision is made on the locked
        current version, so of two concurrent moves the second sees the first's result.
        """
        tx.read("Task", task_id)
        stored, case = case_task_state(tx, task_id)
        move = self._prepare(tx, action, case, move)
        transition = status.check_move(action, caller, case, move)
        now = format_instant(utc_now())
        new = status.apply_move(transition, stored.resource, move, now=now)
        with tx.internal():
            updated, _ = tx.update("Task", task_id, new, if_match=stored.version)
        self._effects(tx, transition, case, move, caller=caller, now=now)
        return updated

    def answer(self, tx: Tx, issue_id: str, answer: str, *, caller: Any) -> StoredResource:
        """The requester answers a case issue (``$answer``): it is resolved with the answer."""
        tx.read("Task", issue_id)
        with tx.internal():
            stored = tx.current("Task", issue_id, for_update=True)
        if stored is None or stored.deleted or not status.is_issue_task(stored.resource):
            raise FhirError(
                404, "not-found", f"Task/{issue_id} is not a case issue", code="MSO-ISSUE-404"
            )
        if not answer.strip():
            raise FhirError(
                422,
                "required",
                "$answer needs an answer",
                code="MSO-ISSUE-422",
                expression=["answer"],
            )
        case = self._issue_case(tx, stored.resource)
        status.check_issue_answer(caller, case, stored.resource)
        author = caller.fhir_user if isinstance(caller, Principal) else None
        now = format_instant(utc_now())
        new = status.answered_issue(stored.resource, answer, author=author, now=now)
        with tx.internal():
            updated, _ = tx.update("Task", issue_id, new, if_match=stored.version)
        self._emit(
            tx,
            CaseEventKind.ISSUE_RESOLVED,
            case,
            caller=caller,
            subject=f"Task/{issue_id}",
            detail={"answered": True},
        )
        return updated

    def _prepare(self, tx: Tx, action: Action, case: CaseState, move: Move) -> Move:
        """Resolve what a move refers to: the provider must exist; the report is found."""
        if action is Action.ASSIGN and move.provider:
            role = current(tx, "PractitionerRole", move.provider)
            if role is None or role.resource.get("active") is False:
                raise FhirError(
                    422,
                    "business-rule",
                    f"PractitionerRole/{move.provider} is not an active provider",
                    code="MSO-CASE-422",
                    expression=["provider"],
                )
        if action is Action.COMPLETE:
            report = self._recommendation(tx, case, move.report)
            move = Move(reason=move.reason, provider=move.provider, report=report)
        return move

    def _recommendation(self, tx: Tx, case: CaseState, wanted: str | None) -> str | None:
        """The DiagnosticReport completing the case: ``wanted``, else the newest based on it."""
        if wanted:
            found = current(tx, "DiagnosticReport", wanted)
            candidates = [found] if found is not None else []
        else:
            with tx.internal():
                found_all = tx.find(
                    "DiagnosticReport", [("based-on", f"ServiceRequest/{case.case_id}")]
                )
            candidates = sorted(found_all, key=lambda r: r.last_updated, reverse=True)
        for report in candidates:
            body = report.resource
            based = [status.ref_id(b, "ServiceRequest") for b in body.get("basedOn") or ()]
            usable = DRAFT_REPORT_STATUSES | RELEASED_REPORT_STATUSES
            if case.case_id in based and body.get("status") in usable:
                return report.res_id
        return None

    # -- what a transition implies ------------------------------------------------------

    def _effects(
        self,
        tx: Tx,
        transition: status.Transition,
        case: CaseState,
        move: Move,
        *,
        caller: Any,
        now: str,
    ) -> None:
        """Side effects of a transition (other resources) and its event."""
        action = transition.action
        subject = None
        kind = transition.event
        provider = case.owner
        if action is Action.ASSIGN:
            provider = move.provider
            self._update_request(tx, case, performer=f"PractitionerRole/{move.provider}")
        elif action is Action.CANCEL:
            self._update_request(tx, case, request_status="revoked")
        elif action is Action.RETURN:
            subject = self._open_return_issue(tx, case, move.reason or "", caller=caller, now=now)
        elif action is Action.START and case.status is CaseStatus.RETURNED:
            kind = CaseEventKind.RESUMED
        elif action is Action.COMPLETE and move.report:
            self._finalize_report(tx, case, move.report, now=now)
            subject = f"DiagnosticReport/{move.report}"
        detail: dict[str, Any] = {"from": case.status.value, "to": transition.target.value}
        if move.reason:
            detail["reason"] = move.reason
        self._emit(tx, kind, case, caller=caller, provider=provider, subject=subject, detail=detail)

    def _emit(
        self,
        tx: Tx,
        kind: CaseEventKind,
        case: CaseState,
        *,
        caller: Any,
        provider: str | None = None,
        subject: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        event = case_event(
            kind, case, actor=caller, provider=provider, subject=subject, detail=detail
        )
        self.events.emit(tx, event)

    def _update_request(
        self,
        tx: Tx,
        case: CaseState,
        *,
        performer: str | None = None,
        request_status: str | None = None,
    ) -> None:
        with tx.internal():
            stored = tx.current("ServiceRequest", case.case_id, for_update=True)
            if stored is None or stored.deleted:
                return
            body = dict(stored.resource)
            if performer:
                body["performer"] = [{"reference": performer}]
            if request_status:
                body["status"] = request_status
            tx.update("ServiceRequest", case.case_id, body, if_match=stored.version)

    def _open_return_issue(
        self, tx: Tx, case: CaseState, reason: str, *, caller: Any, now: str
    ) -> str:
        """The case issue a ``$return`` opens: the requester answers it (``$answer``)."""
        issue: dict[str, Any] = {
            "resourceType": "Task",
            "meta": {"profile": [PROFILE_CASE_ISSUE]},
            "status": "requested",
            "businessStatus": concept(CASE_ISSUE_STATUS_SYSTEM, CaseIssueStatus.OPEN.value),
            "intent": "order",
            "code": concept(TASK_CODE_SYSTEM, TASK_CODE_CASE_ISSUE),
            "reasonCode": concept(CASE_STATUS_SYSTEM, CaseStatus.RETURNED.value),
            "description": reason.strip(),
            "partOf": [{"reference": f"Task/{case.task_id}"}],
            "focus": {"reference": f"ServiceRequest/{case.case_id}"},
            "authoredOn": now,
            "lastModified": now,
        }
        if case.patient_ref:
            issue["for"] = {"reference": case.patient_ref}
        if case.owner:
            issue["requester"] = {"reference": f"PractitionerRole/{case.owner}"}
        if case.requester_ref:
            issue["owner"] = {"reference": case.requester_ref}
        with tx.internal():
            stored = tx.create(issue)
        self._emit(
            tx,
            CaseEventKind.ISSUE_OPENED,
            case,
            caller=caller,
            subject=stored.reference,
            detail={"return": True},
        )
        return stored.reference

    def _finalize_report(self, tx: Tx, case: CaseState, report_id: str, *, now: str) -> None:
        """A draft recommendation becomes final with the server-rendered PDF."""
        with tx.internal():
            stored = tx.current("DiagnosticReport", report_id, for_update=True)
        if stored is None or stored.deleted:
            return
        body = stored.resource
        if body.get("status") not in DRAFT_REPORT_STATUSES:
            return  # released already: amended, never rewritten
        if not (body.get("conclusion") or body.get("conclusionCode")):
            raise FhirError(
                422,
                "required",
                f"DiagnosticReport/{report_id} has no conclusion: a final recommendation "
                "states one",
                code="MSO-CASE-422",
                expression=["DiagnosticReport.conclusion"],
            )
        final = {**body, "status": "final", "issued": now}
        final = self._with_pdf(tx, case, final, now=now)
        with tx.internal():
            tx.update("DiagnosticReport", report_id, final, if_match=stored.version)

    def _with_pdf(self, tx: Tx, case: CaseState, report: dict[str, Any], *, now: str) -> dict:
        """Integration point with :mod:`fhir_server.workflow.report_pdf` (the signed PDF)."""
        from fhir_server.workflow import report_pdf

        request = current(tx, "ServiceRequest", case.case_id)
        patient = current(tx, "Patient", status.ref_id(case.patient_ref, "Patient"))
        role = current(tx, "PractitionerRole", case.owner)
        practitioner = None
        if role is not None:
            practitioner_id = status.ref_id(role.resource.get("practitioner"), "Practitioner")
            practitioner = current(tx, "Practitioner", practitioner_id)
        pdf = report_pdf.render_recommendation(
            case_number=case.case_number,
            patient=patient.resource if patient is not None else {},
            service_request=request.resource if request is not None else {},
            report=report,
            provider=role.resource if role is not None else None,
            practitioner=practitioner.resource if practitioner is not None else None,
            signed_at=now,
        )
        return report_pdf.attach_pdf(
            report, pdf, f"Recommendation {case.case_number}", creation=now
        )

    def _issue_case(self, tx: Tx, issue: dict[str, Any]) -> CaseState:
        """The case a case-issue Task belongs to (422 when it is part of no case Task)."""
        task_id = next(
            (tid for p in issue.get("partOf") or () if (tid := status.ref_id(p, "Task"))), None
        )
        task = current(tx, "Task", task_id)
        if task is None or not status.is_case_task(task.resource):
            raise FhirError(
                422,
                "business-rule",
                "A case issue must be partOf the case Task",
                code="MSO-ISSUE-422",
                expression=["Task.partOf"],
            )
        return state_of(tx, task.res_id, task.resource)

    # -- guards: every write path (rows of :mod:`fhir_server.workflow.guards`) ---------------

    def submit_case(self, event: HookEvent) -> None:
        """Before a case ServiceRequest is created: submitter, requester, case number."""
        self._submit(event.tx, event.resource or {}, event.caller)

    def open_case(self, event: HookEvent) -> None:
        """After a case ServiceRequest is created: its case Task and the SUBMITTED event."""
        body = event.resource or {}
        self._create_case_task(event.tx, event.resource_id or body["id"], body, event.caller)

    def new_task(self, event: HookEvent) -> None:
        """A caller creates a case issue (checked) but never a second case Task."""
        self._guard_new_task(event.tx, event.resource or {}, event.caller)

    def issue_reported(self, event: HookEvent) -> None:
        """After a caller reported a case issue: the ISSUE_OPENED event."""
        case = self._issue_case(event.tx, event.resource or {})
        subject = f"Task/{event.resource_id}"
        self._emit(event.tx, CaseEventKind.ISSUE_OPENED, case, caller=event.caller, subject=subject)

    def case_task_written(self, event: HookEvent) -> None:
        """A plain PUT/PATCH of the case Task: the same rules as the operations."""
        self._guard_case_task_write(
            event.tx, event.resource_id or "", event.previous or {}, event.resource or {}, event
        )

    def issue_written(self, event: HookEvent) -> None:
        """A PUT/PATCH of a case issue: who may, what may change, status pair kept in step."""
        body, previous = event.resource or {}, event.previous or {}
        case = self._issue_case(event.tx, previous if status.is_issue_task(previous) else body)
        body.update(status.check_issue_write(event.caller, case, previous, body) or {})

    def issue_deleted(self, event: HookEvent) -> None:
        """Deleting a case issue: its provider or an admin only."""
        previous = event.previous or {}
        status.check_issue_write(event.caller, self._issue_case(event.tx, previous), previous, None)

    def request_written(self, event: HookEvent) -> None:
        """A PUT/PATCH of a case ServiceRequest: the workflow's elements are the server's."""
        self._guard_request_write(
            event.tx, event.resource_id or "", event.previous or {}, event.resource or {}
        )

    def case_deleted(self, event: HookEvent) -> None:
        """Cases (ServiceRequest or case Task) are cancelled, never deleted."""
        previous = event.previous or {}
        if event.resource_type == "Task":
            previous = {"identifier": previous.get("identifier")}
        raise status.check_case_delete(case_number_of(previous))

    def documents_linked(self, event: HookEvent) -> None:
        """A case ServiceRequest that lists DocumentReferences in ``supportingInfo``: each
        newly listed one becomes a case document (checked once the unit is written)."""
        case_id = event.resource_id or (event.resource or {}).get("id") or ""
        added = documents.supporting_documents(event.resource) - documents.supporting_documents(
            event.previous
        )
        for doc_id in sorted(added):
            event.tx.defer(partial(self._link_document, event.tx, case_id, doc_id))

    def document_created(self, event: HookEvent) -> None:
        """After a caller created a DocumentReference: the document rules, checked once the
        whole unit is written (its case and Binary may follow it in a transaction Bundle)."""
        event.tx.defer(partial(self._guard_document, event.tx, event.resource or {}))

    def document_written(self, event: HookEvent) -> None:
        """A PUT/PATCH of a DocumentReference: the document rules when it is a case's."""
        self._guard_document(event.tx, event.resource or {}, event.previous)

    def document_deleted(self, event: HookEvent) -> None:
        """Deleting a case document: only while its case takes documents."""
        for case_id in documents.case_ids(event.previous or {}):
            case = state_of_case(event.tx, case_id)
            if case is not None:
                status.check_document_status(case)

    def binary_written(self, event: HookEvent) -> None:
        """The Binary holding a case document's content is neither replaced nor deleted."""
        if documents.documents_pointing_at(event.tx, event.resource_id or ""):
            raise documents.binary_replaced(event.resource_id or "")

    # -- submission -----------------------------------------------------------------------

    def _submit(self, tx: Tx, body: dict[str, Any], caller: Any) -> None:
        """Checks and case number of a new case ServiceRequest (before it is stored)."""
        status.check_submitter(caller)
        if not body.get("requester") and isinstance(caller, Principal):
            if caller.practitioner_role:
                body["requester"] = {"reference": f"PractitionerRole/{caller.practitioner_role}"}
            elif caller.patient:
                body["requester"] = {"reference": f"Patient/{caller.patient}"}
        # the Patient may come later in the submission Bundle than the ServiceRequest
        tx.defer(partial(check_patient, tx, body))
        if caller is None and CASE_NUMBER_PATTERN.match(case_number_of(body)):
            return  # server work (seeding, imports) may bring the case's own number
        if caller is not None:
            body.pop("performer", None)  # set by $assign only
        assign_case_number(tx, body)

    def _create_case_task(self, tx: Tx, case_id: str, body: dict[str, Any], caller: Any) -> None:
        """The case Task of a new case, and the SUBMITTED event."""
        task = case_task(case_id, body, now=utc_now(), settings=self.settings)
        with tx.internal():
            stored = tx.create(task)
        case = CaseState(
            task_id=stored.res_id,
            task=stored.resource,
            status=CaseStatus.NEW,
            case_id=case_id,
            case_number=case_number_of(body),
            requester_ref=(body.get("requester") or {}).get("reference"),
            requester_org=requester_org(tx, case_id),
            patient_ref=(body.get("subject") or {}).get("reference"),
        )
        self._emit(
            tx,
            CaseEventKind.SUBMITTED,
            case,
            caller=caller,
            detail={"priority": body.get("priority") or "routine"},
        )

    # -- guards ---------------------------------------------------------------------------

    def _guard_new_task(self, tx: Tx, body: dict[str, Any], caller: Any) -> None:
        """A caller creates a case issue (checked) but never a second case Task."""
        if status.is_issue_task(body):
            case = self._issue_case(tx, body)
            body.update(status.check_issue_write(caller, case, None, body) or {})
            return
        case_id = status.case_id_of(body)
        request = current(tx, "ServiceRequest", case_id)
        if status.is_case_task(body) or (request is not None and is_case_request(request.resource)):
            raise FhirError(
                409,
                "business-rule",
                "The case Task is created by the server when the case is submitted; change "
                "it through the case operations",
                code="MSO-CASE-410",
                expression=["Task.focus"],
            )

    def _guard_case_task_write(
        self,
        tx: Tx,
        task_id: str,
        previous: dict[str, Any],
        body: dict[str, Any],
        event: HookEvent,
    ) -> None:
        """A plain PUT/PATCH of the case Task: the same rules as the operations."""
        case = state_of(tx, task_id, previous)
        caller = event.caller
        action, move = status.action_of_write(previous, body, case)
        if action is None:
            status.check_edit(caller, case)
            return
        move = self._prepare(tx, action, case, move)
        transition = status.check_move(action, caller, case, move)
        now = format_instant(utc_now())
        moved = status.apply_move(transition, previous, move, now=now)
        for element in (*status.TRANSITION_ELEMENTS, "lastModified"):
            if element in moved:
                body[element] = moved[element]
            else:
                body.pop(element, None)
        self._effects(tx, transition, case, move, caller=caller, now=now)

    def _guard_request_write(
        self, tx: Tx, case_id: str, previous: dict[str, Any], body: dict[str, Any]
    ) -> None:
        """The case number, category, subject, performer and status of a case are the server's."""
        for element in ("category", "subject", "performer", "status"):
            if previous.get(element) != body.get(element):
                raise FhirError(
                    409,
                    "business-rule",
                    f"ServiceRequest.{element} of case {case_number_of(previous)} is set by "
                    "the workflow and cannot be changed",
                    code="MSO-CASE-410",
                    expression=[f"ServiceRequest.{element}"],
                )
        if case_number_of(previous) != case_number_of(body):
            raise FhirError(
                409,
                "business-rule",
                "The case number (ServiceRequest.identifier "
                f"{CASE_NUMBER_SYSTEM}) cannot be changed",
                code="MSO-CASE-410",
                expression=["ServiceRequest.identifier"],
            )
        case = state_of_case(tx, case_id)
        if case is not None and case.status in (CaseStatus.DONE, CaseStatus.CANCELLED):
            raise FhirError(
                409,
                "business-rule",
                f"Case {case.case_number} is '{case.status.value}' and no longer changes",
                code="MSO-CASE-411",
            )

    def _guard_document(
        self, tx: Tx, body: dict[str, Any], previous: dict[str, Any] | None = None
    ) -> None:
        """A case document: status of its case, category, content, size and count."""
        if not (
            documents.is_case_document(body) or (previous and documents.is_case_document(previous))
        ):
            return
        documents.check_still_linked(body, previous)
        case_ids = documents.case_ids(body) or documents.case_ids(previous or {})
        for case_id in case_ids:
            request = current(tx, "ServiceRequest", case_id)
            if request is None or not is_case_request(request.resource):
                raise FhirError(
                    422,
                    "business-rule",
                    f"{documents.document_name(body)}: ServiceRequest/{case_id} is not a case",
                    code="MSO-DOC-424",
                    expression=["DocumentReference.context.related"],
                )
            case = state_of_case(tx, case_id)
            if case is not None:
                status.check_document_status(case)
        documents.check_category(body)
        documents.check_contents(body, documents.ContentReader(tx, self.blobs))
        for case_id in case_ids:
            documents.check_count(tx, case_id, body)
        if doc_id := body.get("id") or (previous or {}).get("id"):
            documents.secure_contents(tx, doc_id, body)

    def _link_document(self, tx: Tx, case_id: str, doc_id: str) -> None:
        """DocumentReference ``doc_id``, listed in the case's ``supportingInfo``, becomes a case
        document: every document rule applies to it, then the link is recorded in its
        ``context.related`` too (by which the case's documents are found, counted and shared
        with the case's parties). The caller must see the document it links."""
        try:
            tx.read("DocumentReference", doc_id)
        except FhirError:
            raise FhirError(
                422,
                "business-rule",
                f"ServiceRequest/{case_id}: supportingInfo names DocumentReference/{doc_id}, "
                "which is not known",
                code="MSO-DOC-424",
                expression=["ServiceRequest.supportingInfo"],
            ) from None
        with tx.internal():
            stored = tx.current("DocumentReference", doc_id, for_update=True)
        if stored is None or stored.deleted or case_id in documents.case_ids(stored.resource):
            return  # linked both ways already: checked when that link was written
        linked = documents.with_case(stored.resource, case_id)
        self._guard_document(tx, linked)
        with tx.internal():
            tx.update("DocumentReference", doc_id, linked, if_match=stored.version)


def now_instant(now: datetime | None = None) -> str:
    """A FHIR instant for ``now`` (default: the current time)."""
    return format_instant(now or utc_now())


__all__ = ["Workflow", "case_task_of"]
