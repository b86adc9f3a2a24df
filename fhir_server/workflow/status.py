"""The case state machine: who may move a case from which status to which (DESIGN.md).

This module is the one place the MSO case rules live. Every path that changes a case calls it:
the ``$assign`` … ``$cancel`` operations (:mod:`fhir_server.workflow.service`) and the
repository hooks that see a plain PUT/PATCH of a case Task, a transaction Bundle entry touching
one, or a case-issue Task written through REST. It is pure: the caller loads a
:class:`CaseState` and gets back a decision (or a :class:`FhirError`).

=========== ============ ========================== ===============================
MSO status  Task.status  who moves it there         from
=========== ============ ========================== ===============================
New         requested    requester (submission)     —
Assigned    ready        admin (``$assign``)        New, Rejected
Accepted    accepted     assigned provider          Assigned
Rejected    rejected     assigned provider (reason) Assigned
In progress in-progress  assigned provider          Accepted, Returned (answered)
Returned    on-hold      assigned provider (reason) Accepted, In progress
Done        completed    assigned provider          In progress (final report)
Cancelled   cancelled    requester or admin         New, Assigned
=========== ============ ========================== ===============================

Case issues (Task, code ``case-issue``, partOf the case Task) are reported, edited, resolved
and deleted by the case's provider and admins; the case's requester reads them and answers
the issue a ``$return`` opened (``$answer``).

Errors (stable codes): ``MSO-CASE-403`` wrong role for the move (403); ``MSO-CASE-409`` the
move is not allowed from the current status (409); ``MSO-CASE-410`` a workflow-controlled
element changed outside a transition (409); ``MSO-CASE-411`` the case is closed (409);
``MSO-CASE-412`` Returned -> In progress before the requester answered (409);
``MSO-CASE-413`` ``$complete`` without a recommendation (409); ``MSO-CASE-422`` a reason or
parameter is missing (422); ``MSO-ISSUE-403`` / ``-409`` / ``-422`` the same for case issues.

``Task.status`` and ``Task.businessStatus`` of a case Task or case issue name one status (the
columns of the tables above and in :mod:`fhir_server.codes`). A write may change
either: when they disagree, the one the write changed decides and the other follows
(:func:`target_of_write`). When both changed and disagree, or a new Task's pair disagrees, or
one names no status, the write is refused: ``MSO-CASE-423`` / ``MSO-ISSUE-423`` (422, the
invariant "Task.status agrees with Task.businessStatus"). Never is one silently dropped.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from fhir_server.auth.principal import Principal, Role
from fhir_server.codes import (
    CASE_ISSUE_STATUS_SYSTEM,
    CASE_STATUS_SYSTEM,
    CLOSED_CASE_STATUSES,
    REPORT_TYPE_RECOMMENDATION,
    REPORT_TYPE_SYSTEM,
    TASK_CODE_CASE,
    TASK_CODE_CASE_ISSUE,
    TASK_CODE_SYSTEM,
    TASK_STATUS_OF_CASE_STATUS,
    TASK_STATUS_OF_ISSUE_STATUS,
    CaseIssueStatus,
    CaseStatus,
    concept,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.workflow.event_kinds import CaseEventKind

CASE_STATUS_OF_TASK_STATUS = {task: case for case, task in TASK_STATUS_OF_CASE_STATUS.items()}
ISSUE_STATUS_OF_TASK_STATUS = {task: st for st, task in TASK_STATUS_OF_ISSUE_STATUS.items()}

IMMUTABLE_CASE_TASK_ELEMENTS = (
    "focus",
    "basedOn",
    "for",
    "code",
    "requester",
    "restriction",
    "identifier",
    "partOf",
)
"""Elements of the case Task nobody changes after submission."""
TRANSITION_ELEMENTS = ("status", "businessStatus", "owner", "statusReason", "output")
"""Elements of the case Task that change only through a transition."""
IMMUTABLE_ISSUE_ELEMENTS = ("partOf", "code", "focus", "for")
"""Elements of a case-issue Task fixed when it is reported."""


class Action(StrEnum):
    """The case operations (``$<action>`` on the case Task)."""

    ASSIGN = "assign"
    ACCEPT = "accept"
    REJECT = "reject"
    START = "start"
    RETURN = "return"
    COMPLETE = "complete"
    CANCEL = "cancel"


class Party(StrEnum):
    """How a caller relates to one case."""

    ADMIN = "admin"
    PROVIDER = "provider"  # the case's assigned provider (its PractitionerRole)
    REQUESTER = "requester"  # the requesting organization's users, or the requesting patient


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the status table."""

    action: Action
    sources: frozenset[CaseStatus]
    target: CaseStatus
    parties: frozenset[Party]
    event: CaseEventKind
    needs_reason: bool = False
    takes_reason: bool = False  # an optional reason, kept in Task.statusReason when given


def _t(
    action: Action,
    sources: set[CaseStatus],
    target: CaseStatus,
    parties: set[Party],
    event: CaseEventKind,
    *,
    needs_reason: bool = False,
    takes_reason: bool = False,
) -> Transition:
    return Transition(
        action,
        frozenset(sources),
        target,
        frozenset(parties),
        event,
        needs_reason,
        takes_reason or needs_reason,
    )


S = CaseStatus
TRANSITIONS: dict[Action, Transition] = {
    t.action: t
    for t in (
        _t(Action.ASSIGN, {S.NEW, S.REJECTED}, S.ASSIGNED, {Party.ADMIN}, CaseEventKind.ASSIGNED),
        _t(Action.ACCEPT, {S.ASSIGNED}, S.ACCEPTED, {Party.PROVIDER}, CaseEventKind.ACCEPTED),
        _t(
            Action.REJECT,
            {S.ASSIGNED},
            S.REJECTED,
            {Party.PROVIDER},
            CaseEventKind.REJECTED,
            needs_reason=True,
        ),
        _t(
            Action.START,
            {S.ACCEPTED, S.RETURNED},
            S.IN_PROGRESS,
            {Party.PROVIDER},
            CaseEventKind.STARTED,
        ),
        _t(
            Action.RETURN,
            {S.ACCEPTED, S.IN_PROGRESS},
            S.RETURNED,
            {Party.PROVIDER},
            CaseEventKind.RETURNED,
            needs_reason=True,
        ),
        _t(Action.COMPLETE, {S.IN_PROGRESS}, S.DONE, {Party.PROVIDER}, CaseEventKind.DONE),
        _t(
            Action.CANCEL,
            {S.NEW, S.ASSIGNED},
            S.CANCELLED,
            {Party.REQUESTER, Party.ADMIN},
            CaseEventKind.CANCELLED,
            takes_reason=True,
        ),
    )
}
"""The status table of DESIGN.md, one :class:`Transition` per operation."""
ACTION_OF_TARGET: dict[CaseStatus, Action] = {t.target: t.action for t in TRANSITIONS.values()}
"""Which operation a plain write setting a case to a status stands for."""
EDITABLE_STATUSES = frozenset({S.NEW, S.ASSIGNED, S.RETURNED})
"""Statuses in which the case's documents may be added or changed."""


@dataclass(frozen=True, slots=True)
class CaseState:
    """What the rules need to know about one case (loaded by the caller).

    ``owner`` is the assigned PractitionerRole's id; ``requester_ref`` the ServiceRequest's
    requester (``Type/id``); ``requester_org`` the requesting organization's id;
    ``open_return_issues`` how many issues opened by ``$return`` are still unanswered.
    """

    task_id: str
    task: dict[str, Any]
    status: CaseStatus
    case_id: str
    case_number: str
    owner: str | None = None
    requester_ref: str | None = None
    requester_org: str | None = None
    patient_ref: str | None = None
    open_return_issues: int = 0


# -- reading Tasks ---------------------------------------------------------------------------


def has_code(value: Any, system: str, code: str) -> bool:
    """True when the CodeableConcept ``value`` has the coding ``system|code``."""
    return any(
        (c or {}).get("system") == system and (c or {}).get("code") == code
        for c in (value or {}).get("coding") or ()
    )


def is_case_task(task: dict[str, Any] | None) -> bool:
    """A case's workflow Task (``code`` = task-code ``case``)."""
    return bool(task) and has_code(task.get("code"), TASK_CODE_SYSTEM, TASK_CODE_CASE)


def is_issue_task(task: dict[str, Any] | None) -> bool:
    """A case-issue Task (``code`` = task-code ``case-issue``, or any coding ``case-issue``)."""
    if not task:
        return False
    return any(
        (c or {}).get("code") == TASK_CODE_CASE_ISSUE
        for c in (task.get("code") or {}).get("coding") or ()
    )


def ref_id(reference: Any, rtype: str) -> str | None:
    """The id of a ``{"reference": "Type/id"}`` of type ``rtype`` (absolute or versioned too)."""
    ref = (reference or {}).get("reference") if isinstance(reference, dict) else reference
    if not isinstance(ref, str):
        return None
    parts = ref.split("/_history/")[0].split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == rtype else None


def case_id_of(task: dict[str, Any]) -> str | None:
    """The case ServiceRequest a Task is about (``focus``, else ``basedOn``)."""
    found = ref_id(task.get("focus"), "ServiceRequest")
    if found:
        return found
    return next(
        (cid for b in task.get("basedOn") or () if (cid := ref_id(b, "ServiceRequest"))), None
    )


def status_of(task: dict[str, Any]) -> CaseStatus | None:
    """The case status of a case Task: ``businessStatus``, else derived from ``Task.status``."""
    for coding in (task.get("businessStatus") or {}).get("coding") or ():
        if (coding or {}).get("system") == CASE_STATUS_SYSTEM:
            try:
                return CaseStatus((coding or {}).get("code"))
            except ValueError:
                return None
    return CASE_STATUS_OF_TASK_STATUS.get(task.get("status") or "")


def issue_status_of(task: dict[str, Any]) -> CaseIssueStatus | None:
    """The state of a case-issue Task (``businessStatus``, else from ``Task.status``)."""
    for coding in (task.get("businessStatus") or {}).get("coding") or ():
        if (coding or {}).get("system") == CASE_ISSUE_STATUS_SYSTEM:
            try:
                return CaseIssueStatus((coding or {}).get("code"))
            except ValueError:
                return None
    return ISSUE_STATUS_OF_TASK_STATUS.get(task.get("status") or "")


def is_return_issue(issue: dict[str, Any]) -> bool:
    """An issue opened by ``$return`` (its ``reasonCode`` is the case status ``returned``)."""
    return has_code(issue.get("reasonCode"), CASE_STATUS_SYSTEM, CaseStatus.RETURNED)


StatusT = TypeVar("StatusT", CaseStatus, CaseIssueStatus)


def _business_code(task: dict[str, Any] | None, system: str) -> str | None:
    """The ``businessStatus`` code of ``system`` (``None`` when there is none)."""
    for coding in ((task or {}).get("businessStatus") or {}).get("coding") or ():
        if (coding or {}).get("system") == system:
            return str((coding or {}).get("code"))
    return None


def target_of_write(
    previous: dict[str, Any] | None,
    new: dict[str, Any],
    *,
    system: str,
    statuses: type[StatusT],
    task_status_of: Mapping[StatusT, str],
    code: str,
) -> StatusT | None:
    """The status a write of a workflow Task asks for (``None``: it names none at all).

    ``Task.status`` and ``businessStatus`` (coding of ``system``) must name one status. When they
    disagree, the element this write changed (compared with ``previous``) decides; 422 ``code``
    when both changed (or the Task is new) and disagree, or when the deciding one names no
    status. The error names the invariant and the elements, never their values.
    """
    of_task_status = {task: st for st, task in task_status_of.items()}
    business_code = _business_code(new, system)
    by_business: StatusT | None = None
    if business_code is not None:
        try:
            by_business = statuses(business_code)
        except ValueError:
            raise _pair_error(code, "Task.businessStatus names no status") from None
    task_status = new.get("status")
    by_task = of_task_status.get(task_status or "")
    if by_business is None:
        if task_status and by_task is None:
            raise _pair_error(code, "Task.status names no status of this Task")
        return by_task
    if by_task is by_business:
        return by_business
    business_changed = previous is None or _business_code(previous, system) != business_code
    status_changed = previous is None or previous.get("status") != task_status
    if business_changed and not status_changed:
        return by_business
    if status_changed and not business_changed and by_task is not None:
        return by_task
    raise _pair_error(code, "Task.status and Task.businessStatus name different statuses")


def _pair_error(code: str, message: str) -> FhirError:
    return FhirError(
        422,
        "business-rule",
        f"{message} (invariant: Task.status agrees with Task.businessStatus)",
        code=code,
        expression=["Task.status", "Task.businessStatus"],
    )


# -- who the caller is for this case -----------------------------------------------------------


def parties_of(caller: Any, case: CaseState) -> frozenset[Party]:
    """How ``caller`` relates to ``case`` (workflow-internal work, ``None``, is every party)."""
    if caller is None:
        return frozenset(Party)
    if not isinstance(caller, Principal):
        return frozenset()
    out: set[Party] = set()
    if caller.role is Role.ADMIN or (caller.role is Role.SYSTEM and not caller.organization):
        out.add(Party.ADMIN)
    assigned = caller.practitioner_role is not None and caller.practitioner_role == case.owner
    if caller.role is Role.PROVIDER and assigned and case.status is not CaseStatus.REJECTED:
        out.add(Party.PROVIDER)
    same_org = caller.organization is not None and caller.organization == case.requester_org
    if caller.role in (Role.REQUESTER, Role.SYSTEM) and same_org:
        out.add(Party.REQUESTER)
    if caller.role is Role.REQUESTER and caller.fhir_user == case.requester_ref is not None:
        out.add(Party.REQUESTER)
    if caller.role is Role.PATIENT and case.requester_ref == f"Patient/{caller.patient}":
        out.add(Party.REQUESTER)
    return frozenset(out)


def _forbidden(message: str, code: str = "MSO-CASE-403") -> FhirError:
    return FhirError(403, "forbidden", message, code=code)


def _conflict(message: str, code: str = "MSO-CASE-409", expression: str | None = None) -> FhirError:
    return FhirError(409, "business-rule", message, code=code, expression=_expr(expression))


def _required(message: str, code: str = "MSO-CASE-422", expression: str | None = None) -> FhirError:
    return FhirError(422, "required", message, code=code, expression=_expr(expression))


def _expr(expression: str | None) -> list[str] | None:
    return [expression] if expression else None


_PARTY_TEXT = {
    Party.ADMIN: "an administrator",
    Party.PROVIDER: "the case's assigned provider",
    Party.REQUESTER: "the case's requester",
}


# -- transitions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Move:
    """The inputs of one transition (what the operation's Parameters or the new Task carry)."""

    reason: str | None = None
    provider: str | None = None  # PractitionerRole id ($assign)
    report: str | None = None  # DiagnosticReport id ($complete), once found final


def check_move(action: Action, caller: Any, case: CaseState, move: Move) -> Transition:
    """Decide whether ``caller`` may do ``action`` on ``case`` now: the transition, or an error.

    Order of the checks: the role (403), then the current status (409), then the rule's
    inputs (422 for a missing reason or provider, 409 for an unmet precondition).
    """
    transition = TRANSITIONS[action]
    parties = parties_of(caller, case)
    if not parties & transition.parties:
        allowed = " or ".join(_PARTY_TEXT[p] for p in sorted(transition.parties))
        raise _forbidden(f"Only {allowed} may {action.value} case {case.case_number}")
    if case.status not in transition.sources:
        sources = ", ".join(sorted(s.value for s in transition.sources))
        raise _conflict(
            f"Case {case.case_number} is '{case.status.value}': ${action.value} moves a case "
            f"to '{transition.target.value}' only from {sources}",
            expression="Task.businessStatus",
        )
    if transition.needs_reason and not (move.reason or "").strip():
        raise _required(f"${action.value} needs a reason", expression="reason")
    if action is Action.ASSIGN and not move.provider:
        raise _required("$assign needs a provider (a PractitionerRole)", expression="provider")
    if action is Action.START and case.status is CaseStatus.RETURNED and case.open_return_issues:
        raise _conflict(
            f"Case {case.case_number} was returned and the requester has not answered yet",
            code="MSO-CASE-412",
        )
    if action is Action.COMPLETE and not move.report:
        raise _conflict(
            f"Case {case.case_number} has no recommendation: write a DiagnosticReport based on "
            "the case (preliminary or final, with a conclusion) before $complete",
            code="MSO-CASE-413",
        )
    return transition


def apply_move(
    transition: Transition, task: dict[str, Any], move: Move, *, now: str
) -> dict[str, Any]:
    """The case Task after ``transition`` (a new dict; ``task`` is not changed)."""
    out = copy.deepcopy(task)
    target = transition.target
    out["status"] = TASK_STATUS_OF_CASE_STATUS[target]
    out["businessStatus"] = concept(CASE_STATUS_SYSTEM, target.value)
    out["lastModified"] = now
    out.pop("statusReason", None)
    reason = (move.reason or "").strip()
    if transition.takes_reason and reason:
        out["statusReason"] = {"text": reason}
    if transition.action is Action.ASSIGN:
        out["owner"] = {"reference": f"PractitionerRole/{move.provider}"}
    if transition.action is Action.COMPLETE:
        out["output"] = [
            {
                "type": concept(REPORT_TYPE_SYSTEM, REPORT_TYPE_RECOMMENDATION),
                "valueReference": {"reference": f"DiagnosticReport/{move.report}"},
            }
        ]
    return out


def action_of_write(
    previous: dict[str, Any], new: dict[str, Any], case: CaseState
) -> tuple[Action | None, Move]:
    """Which transition a plain PUT/PATCH of the case Task asks for (``None``: no move).

    Elements nobody changes (focus, for, code …) must be unchanged; ``owner``,
    ``statusReason`` and ``output`` change only together with the status they belong to.
    """
    for element in IMMUTABLE_CASE_TASK_ELEMENTS:
        if previous.get(element) != new.get(element):
            raise _conflict(
                f"Task.{element} of case {case.case_number} is set by the server and cannot "
                "be changed",
                code="MSO-CASE-410",
                expression=f"Task.{element}",
            )
    target = target_of_write(
        previous,
        new,
        system=CASE_STATUS_SYSTEM,
        statuses=CaseStatus,
        task_status_of=TASK_STATUS_OF_CASE_STATUS,
        code="MSO-CASE-423",
    )
    if target is None:
        raise _pair_error("MSO-CASE-423", "The case Task names no case status")
    reason = ((new.get("statusReason") or {}).get("text") or "").strip() or None
    if target is case.status:
        for element in TRANSITION_ELEMENTS:
            if previous.get(element) != new.get(element):
                raise _conflict(
                    f"Task.{element} of case {case.case_number} changes only through the case "
                    "operations ($assign, $accept, $reject, $start, $return, $complete, $cancel)",
                    code="MSO-CASE-410",
                    expression=f"Task.{element}",
                )
        return None, Move()
    action = ACTION_OF_TARGET.get(target)
    if action is None:
        raise _conflict(
            f"No operation moves case {case.case_number} to '{target.value}'",
            expression="Task.businessStatus",
        )
    provider = ref_id(new.get("owner"), "PractitionerRole") if action is Action.ASSIGN else None
    report = None
    if action is Action.COMPLETE:
        report = next(
            (
                rid
                for o in new.get("output") or ()
                if (rid := ref_id((o or {}).get("valueReference"), "DiagnosticReport"))
            ),
            None,
        )
    return action, Move(reason=reason, provider=provider, report=report)


def check_edit(caller: Any, case: CaseState) -> None:
    """May ``caller`` change the case Task's other elements (notes, description …)?"""
    if not parties_of(caller, case):
        raise _forbidden(f"Not allowed to change the workflow of case {case.case_number}")
    if case.status in CLOSED_CASE_STATUSES:
        raise _conflict(
            f"Case {case.case_number} is '{case.status.value}' and no longer changes",
            code="MSO-CASE-411",
        )


def check_case_delete(case_number: str) -> FhirError:
    """The error for deleting a case (ServiceRequest or its Task): cases are cancelled."""
    return _conflict(
        f"Case {case_number} is not deleted: cancel it ($cancel) while it is New or Assigned",
        code="MSO-CASE-411",
    )


def check_submitter(caller: Any) -> None:
    """May ``caller`` submit a case? Requesters, patients (for themselves), admins, systems."""
    if isinstance(caller, Principal) and caller.role is Role.PROVIDER:
        raise _forbidden("Providers do not submit cases")


def check_document_status(case: CaseState) -> None:
    """Documents may be added or changed while the case is New, Assigned or Returned."""
    if case.status not in EDITABLE_STATUSES:
        raise _conflict(
            f"Case {case.case_number} is '{case.status.value}': documents can be added only "
            "while a case is new, assigned or returned",
            code="MSO-DOC-409",
        )


# -- case issues -------------------------------------------------------------------------------


def _issue_forbidden(message: str) -> FhirError:
    return _forbidden(message, "MSO-ISSUE-403")


def check_issue_write(
    caller: Any, case: CaseState, previous: dict[str, Any] | None, new: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Report (``previous`` None), edit, resolve or delete (``new`` None) a case issue.

    Only the case's provider and admins may; the requester reads and answers (``$answer``).
    Returns the issue to store, with ``status`` kept in step with its ``businessStatus``.
    """
    parties = parties_of(caller, case)
    if not parties & {Party.ADMIN, Party.PROVIDER}:
        verb = "report" if previous is None else ("delete" if new is None else "change")
        hint = (
            " (the requester answers a return with $answer)" if Party.REQUESTER in parties else ""
        )
        raise _issue_forbidden(
            f"Only the case's provider or an administrator may {verb} issues of case "
            f"{case.case_number}{hint}"
        )
    if new is None:
        return None
    out = dict(new)
    if previous is not None:
        for element in IMMUTABLE_ISSUE_ELEMENTS:
            if previous.get(element) != new.get(element):
                raise _conflict(
                    f"Task.{element} of a case issue cannot be changed",
                    code="MSO-ISSUE-409",
                    expression=f"Task.{element}",
                )
    if not (new.get("description") or "").strip():
        raise _required("A case issue needs a description", "MSO-ISSUE-422", "Task.description")
    status = (
        target_of_write(
            previous,
            new,
            system=CASE_ISSUE_STATUS_SYSTEM,
            statuses=CaseIssueStatus,
            task_status_of=TASK_STATUS_OF_ISSUE_STATUS,
            code="MSO-ISSUE-423",
        )
        or CaseIssueStatus.OPEN
    )
    before = issue_status_of(previous) if previous is not None else None
    if before is CaseIssueStatus.DELETED and status is not CaseIssueStatus.DELETED:
        raise _conflict("A deleted case issue stays deleted", "MSO-ISSUE-409", "Task.status")
    out["businessStatus"] = concept(CASE_ISSUE_STATUS_SYSTEM, status.value)
    out["status"] = TASK_STATUS_OF_ISSUE_STATUS[status]
    return out


def check_issue_answer(caller: Any, case: CaseState, issue: dict[str, Any]) -> None:
    """May ``caller`` answer ``issue`` now? The case's requester (or an admin), while open."""
    parties = parties_of(caller, case)
    if not parties & {Party.REQUESTER, Party.ADMIN}:
        raise _issue_forbidden(f"Only the requester of case {case.case_number} answers its issues")
    if issue_status_of(issue) is not CaseIssueStatus.OPEN:
        raise _conflict("This case issue is not open", "MSO-ISSUE-409", "Task.businessStatus")


_ANNOTATION_AUTHORS = frozenset({"Practitioner", "Patient", "RelatedPerson", "Organization"})


def answered_issue(issue: dict[str, Any], answer: str, *, author: str | None, now: str) -> dict:
    """The issue after the requester's answer: the answer as ``output`` and a note; resolved."""
    out = copy.deepcopy(issue)
    out.setdefault("output", []).append({"type": {"text": "answer"}, "valueString": answer.strip()})
    note: dict[str, Any] = {"time": now, "text": answer.strip()}
    if author and author.split("/")[0] in _ANNOTATION_AUTHORS:
        note["authorReference"] = {"reference": author}
    elif author:
        note["authorString"] = author
    out.setdefault("note", []).append(note)
    out["businessStatus"] = concept(CASE_ISSUE_STATUS_SYSTEM, CaseIssueStatus.RESOLVED.value)
    out["status"] = TASK_STATUS_OF_ISSUE_STATUS[CaseIssueStatus.RESOLVED]
    out["lastModified"] = now
    return out
