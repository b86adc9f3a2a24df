"""A workflow Task's ``status`` and ``businessStatus`` name one status (issue 14): a write that
changes one of them applies it (the other follows); a write whose pair disagrees in both is
refused with 422 naming the invariant (``MSO-ISSUE-423`` / ``MSO-CASE-423``) — never 200 with
the change thrown away. Case issues and the case Task, over PUT and PATCH."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.codes import CASE_ISSUE_STATUS_SYSTEM, CASE_STATUS_SYSTEM
from tests.integration.workflow_world import World, build_world


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def _business(task: dict[str, Any], system: str) -> str:
    return next(c["code"] for c in task["businessStatus"]["coding"] if c["system"] == system)


def _issue_status(code: str) -> dict[str, Any]:
    return {"coding": [{"system": CASE_ISSUE_STATUS_SYSTEM, "code": code}]}


def _assigned(world: World) -> str:
    _, task_id = world.submit()
    response = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert response.status_code == 200, response.text
    return task_id


def _issue(world: World, task_id: str) -> dict[str, Any]:
    body = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"code": "case-issue"}]},
        "partOf": [{"reference": f"Task/{task_id}"}],
        "description": "Images are of poor quality",
    }
    response = world.post("prov1", "Task", body)
    assert response.status_code == 201, response.text
    created = response.json()
    created.pop("meta")
    return created


def test_issue_status_change_is_applied_not_dropped(world: World) -> None:
    issue = _issue(world, _assigned(world))
    # status changed, businessStatus left as it was ('open'): the change is applied
    response = world.put("prov1", f"Task/{issue['id']}", {**issue, "status": "completed"})
    assert response.status_code == 200, response.text
    stored = world.get("admin", f"Task/{issue['id']}").json()
    assert stored["status"] == "completed"
    assert _business(stored, CASE_ISSUE_STATUS_SYSTEM) == "resolved"


def test_issue_status_patch_is_applied(world: World) -> None:
    issue = _issue(world, _assigned(world))
    ops = [{"op": "replace", "path": "/status", "value": "completed"}]
    response = world.patch("prov1", f"Task/{issue['id']}", ops)
    assert response.status_code == 200, response.text
    assert _business(response.json(), CASE_ISSUE_STATUS_SYSTEM) == "resolved"


def test_issue_pair_disagreeing_in_both_is_refused(world: World) -> None:
    issue = _issue(world, _assigned(world))
    body = {**issue, "status": "completed", "businessStatus": _issue_status("deleted")}
    response = world.put("prov1", f"Task/{issue['id']}", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-ISSUE-423"
    stored = world.get("admin", f"Task/{issue['id']}").json()
    assert stored["status"] == "requested" and stored["meta"]["versionId"] == "1"
    # a value that names no issue status is refused too
    response = world.put("prov1", f"Task/{issue['id']}", {**issue, "status": "on-hold"})
    assert response.status_code == 422 and error_code(response) == "MSO-ISSUE-423"


def test_new_issue_with_disagreeing_pair_is_refused(world: World) -> None:
    task_id = _assigned(world)
    body = {
        "resourceType": "Task",
        "status": "completed",
        "businessStatus": _issue_status("open"),
        "intent": "order",
        "code": {"coding": [{"code": "case-issue"}]},
        "partOf": [{"reference": f"Task/{task_id}"}],
        "description": "Missing lab values",
    }
    response = world.post("prov1", "Task", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-ISSUE-423"


def test_case_task_status_change_is_a_transition(world: World) -> None:
    task_id = _assigned(world)
    task = world.task(task_id)
    task.pop("meta")
    # Task.status changed alone: it is the $accept it names
    response = world.put("prov1", f"Task/{task_id}", {**task, "status": "accepted"})
    assert response.status_code == 200, response.text
    stored = world.task(task_id)
    assert stored["status"] == "accepted"
    assert _business(stored, CASE_STATUS_SYSTEM) == "accepted"


def test_case_task_pair_disagreeing_in_both_is_refused(world: World) -> None:
    task_id = _assigned(world)
    task = world.task(task_id)
    version = task.pop("meta")["versionId"]
    body = {
        **task,
        "status": "in-progress",
        "businessStatus": {"coding": [{"system": CASE_STATUS_SYSTEM, "code": "accepted"}]},
    }
    response = world.put("prov1", f"Task/{task_id}", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-CASE-423"
    assert world.task(task_id)["meta"]["versionId"] == version
