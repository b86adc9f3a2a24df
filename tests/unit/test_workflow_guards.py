"""The workflow's guard table and the status-pair rule of workflow Tasks, without a database."""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import pytest

from fhir_server.codes import (
    CASE_ISSUE_STATUS_SYSTEM,
    TASK_STATUS_OF_ISSUE_STATUS,
    CaseIssueStatus,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.hooks import HookEvent, HookPoint, Hooks
from fhir_server.workflow.guards import Guards, Row, case_issue, case_task, guard_table, of_type
from fhir_server.workflow.status import target_of_write


def _issue(status: str | None, business: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"resourceType": "Task", "code": {"coding": [{"code": "case-issue"}]}}
    if status:
        task["status"] = status
    if business:
        task["businessStatus"] = {
            "coding": [{"system": CASE_ISSUE_STATUS_SYSTEM, "code": business}]
        }
    return task


def _target(previous: dict[str, Any] | None, new: dict[str, Any]) -> CaseIssueStatus | None:
    return target_of_write(
        previous,
        new,
        system=CASE_ISSUE_STATUS_SYSTEM,
        statuses=CaseIssueStatus,
        task_status_of=TASK_STATUS_OF_ISSUE_STATUS,
        code="MSO-ISSUE-423",
    )


def test_the_element_a_write_changed_decides() -> None:
    stored = _issue("requested", "open")
    assert _target(stored, _issue("completed", "open")) is CaseIssueStatus.RESOLVED
    assert _target(stored, _issue("requested", "resolved")) is CaseIssueStatus.RESOLVED
    assert _target(stored, _issue("completed", "resolved")) is CaseIssueStatus.RESOLVED
    assert _target(stored, _issue("requested", None)) is CaseIssueStatus.OPEN
    assert _target(None, _issue(None, None)) is None


@pytest.mark.parametrize(
    ("previous", "new"),
    [
        (_issue("requested", "open"), _issue("completed", "deleted")),  # both changed
        (None, _issue("completed", "open")),  # a new Task
        (_issue("requested", "open"), _issue("on-hold", "open")),  # names no issue status
        (_issue("requested", "open"), _issue("requested", "bogus")),
    ],
)
def test_a_disagreeing_pair_is_refused_naming_the_invariant(
    previous: dict[str, Any] | None, new: dict[str, Any]
) -> None:
    with pytest.raises(FhirError) as exc:
        _target(previous, new)
    assert exc.value.status == 422
    assert exc.value.code == "MSO-ISSUE-423"
    assert "invariant" in exc.value.message and exc.value.expression == [
        "Task.status",
        "Task.businessStatus",
    ]


def test_kinds() -> None:
    task = {"resourceType": "Task", "code": {"coding": [{"code": "case"}]}}
    task["code"]["coding"][0]["system"] = "https://mso.example.org/fhir/CodeSystem/task-code"
    issue = _issue("requested", "open")
    event = HookEvent(HookPoint.BEFORE_UPDATE, "Task", "t", issue, task)
    assert case_task(event) and not case_issue(event)  # a case Task row wins
    event = HookEvent(HookPoint.BEFORE_UPDATE, "Task", "t", issue, issue)
    assert case_issue(event) and not case_task(event)
    assert not of_type("Binary")(event)


def test_rows_run_in_order_and_server_work_passes_caller_rows() -> None:
    calls: list[str] = []
    rows = [
        Row(of_type("Task"), HookPoint.BEFORE_UPDATE, lambda e: calls.append("first")),
        Row(
            of_type("Task"),
            HookPoint.BEFORE_UPDATE,
            lambda e: calls.append("second"),
            server_too=True,
        ),
        Row(of_type("Binary"), HookPoint.BEFORE_UPDATE, lambda e: calls.append("binary")),
    ]
    hooks = Hooks()
    Guards(rows).install(hooks)
    assert not hooks.has(HookPoint.BEFORE_CREATE)
    hooks.fire(HookEvent(HookPoint.BEFORE_UPDATE, "Task", "t", {}, {}, caller=object()))
    assert calls == ["first", "second"]
    calls.clear()
    hooks.fire(HookEvent(HookPoint.BEFORE_UPDATE, "Task", "t", {}, {}))  # the server's own write
    assert calls == ["second"]


def test_the_table_registers_once_per_write_point() -> None:
    hooks = Hooks()
    Guards(guard_table(Mock(), Mock(), Mock())).install(hooks)
    for point in (
        HookPoint.BEFORE_CREATE,
        HookPoint.AFTER_CREATE,
        HookPoint.BEFORE_UPDATE,
        HookPoint.BEFORE_DELETE,
    ):
        assert len(hooks._hooks[point]) == 1
    assert not hooks.has(HookPoint.BEFORE_READ)
