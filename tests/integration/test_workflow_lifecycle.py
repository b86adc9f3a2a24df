"""The case lifecycle end to end over HTTP with real tokens per role (issue 5, DESIGN.md case
statuses), on SQLite and PostgreSQL: submission, every allowed transition through the
operations, forbidden moves (409) and wrong roles (403) through the operation, a plain PUT or
PATCH and a transaction Bundle, each leaving the Task unchanged; rejection and reassignment;
case issues; every transition in the Task's ``_history``."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest

from fhir_server.codes import CASE_STATUS_SYSTEM, CaseStatus
from tests.integration.workflow_world import World, build_world, case_number, pdf_bytes


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


def status(task: dict[str, Any]) -> str:
    return next(
        c["code"] for c in task["businessStatus"]["coding"] if c["system"] == CASE_STATUS_SYSTEM
    )


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def test_submission_creates_numbered_case_and_task(world: World) -> None:
    sr_id, task_id = world.submit(documents=[("letter.pdf", pdf_bytes(), "application/pdf")])
    number = case_number(world, sr_id)
    assert re.fullmatch(r"CASE-[0-9A-Z]{6}", number)
    task = world.task(task_id)
    assert task["status"] == "requested" and status(task) == "new"
    assert task["focus"] == {"reference": f"ServiceRequest/{sr_id}"}
    assert task["basedOn"] == [{"reference": f"ServiceRequest/{sr_id}"}]
    assert task["for"] == {"reference": f"Patient/{world.patient}"}
    assert task["requester"] == {"reference": f"PractitionerRole/{world.req_role}"}
    due = datetime.fromisoformat(task["restriction"]["period"]["end"].replace("Z", "+00:00"))
    start = datetime.fromisoformat(task["restriction"]["period"]["start"].replace("Z", "+00:00"))
    assert due - start == timedelta(hours=72)
    _, stat_task = world.submit(priority="stat")
    period = world.task(stat_task)["restriction"]["period"]
    end = datetime.fromisoformat(period["end"].replace("Z", "+00:00"))
    assert end - datetime.fromisoformat(period["start"].replace("Z", "+00:00")) == timedelta(
        hours=4
    )
    assert case_number(world, sr_id) != case_number(world, world.submit()[0])
    # the requester and the patient see the case; providers do not yet
    assert world.get("reqA", f"Task/{task_id}").status_code == 200
    assert world.get("patient", f"Task/{task_id}").status_code == 200
    assert world.get("prov1", f"Task/{task_id}").status_code == 404


def test_case_needs_an_active_patient(world: World, client: Any) -> None:
    response = world.post("reqA", "", world.submission(patient_ref="Patient/nobody-here"))
    assert response.status_code == 422, response.text
    assert "active Patient" in response.text
    inactive = f"inactive-{world.u}"
    body = {"resourceType": "Patient", "id": inactive, "active": False}
    assert client.put(f"/fhir/Patient/{inactive}", json=body).status_code == 201
    response = world.post("reqA", "", world.submission(patient_ref=f"Patient/{inactive}"))
    assert response.status_code == 422, response.text
    # nothing of the failed submissions was stored
    found = world.get("admin", "ServiceRequest", params={"subject": f"Patient/{inactive}"})
    assert found.json().get("total", 0) == 0


def test_one_person_one_patient_across_organizations(world: World, client: Any) -> None:
    """Conditional create on the national ID finds the Patient another organization registered
    (a master patient index): the second requester gets its id, not its content, files a case
    with it, and then sees it; no duplicate Patient is made."""
    from tests.auth_helpers import token_for

    org_b, role_b = f"org-b-{world.u}", f"rq-b-{world.u}"
    for body in (
        {"resourceType": "Organization", "id": org_b, "name": "Other hospital"},
        {
            "resourceType": "PractitionerRole",
            "id": role_b,
            "active": True,
            "organization": {"reference": f"Organization/{org_b}"},
        },
    ):
        assert (
            client.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body).status_code == 201
        )
    token = token_for(world.app, role="requester", organization=org_b, practitioner_role=role_b)
    world.headers["reqB"] = {"Authorization": f"Bearer {token}"}
    national = f"urn:oid:2.16.578.1.12.4.1.4.1|{world.u}"
    person = {
        "resourceType": "Patient",
        "active": True,
        "identifier": [{"system": national.split("|")[0], "value": world.u}],
        "name": [{"family": "Berg", "given": ["Sunniva"]}],
    }
    headers = {**world.as_("reqA"), "If-None-Exist": f"identifier={national}"}
    first = client.post("/fhir/Patient", json=person, headers=headers)
    assert first.status_code == 201, first.text
    patient_id = first.json()["id"]
    assert world.get("reqB", f"Patient/{patient_id}").status_code == 404

    headers = {**world.as_("reqB"), "If-None-Exist": f"identifier={national}"}
    again = client.post(
        "/fhir/Patient", json={**person, "name": [{"family": "X"}]}, headers=headers
    )
    assert again.status_code == 200, again.text
    assert f"/Patient/{patient_id}/_history/1" in again.headers["location"]
    assert again.json()["resourceType"] == "OperationOutcome"  # not the other hospital's record
    assert "Berg" not in again.text

    # only identifiers with their system match beyond what the caller sees
    by_name = {**world.as_("reqB"), "If-None-Exist": "family=Berg&given=Sunniva"}
    unidentified = {k: v for k, v in person.items() if k != "identifier"}
    other = client.post("/fhir/Patient", json=unidentified, headers=by_name)
    assert other.status_code == 201 and other.json()["id"] != patient_id

    # in a submission Bundle: the Patient entry resolves to the same person
    bundle = world.submission(patient_ref="urn:uuid:6d3c1a8e-5c1e-4b7e-9a43-2f1f0c9d7e11")
    bundle["entry"].insert(
        0,
        {
            "fullUrl": "urn:uuid:6d3c1a8e-5c1e-4b7e-9a43-2f1f0c9d7e11",
            "resource": person,
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={national}",
            },
        },
    )
    bundle["entry"][1]["resource"]["requester"] = {"reference": f"PractitionerRole/{role_b}"}
    response = world.post("reqB", "", bundle)
    assert response.status_code == 200, response.text
    patient_entry = response.json()["entry"][0]
    assert patient_entry["response"]["status"].startswith("200")
    assert "resource" not in patient_entry
    assert patient_entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
    # the case names the person, so the second organization now sees the Patient
    assert world.get("reqB", f"Patient/{patient_id}").json()["name"][0]["family"] == "Berg"
    found = world.get("admin", "Patient", params={"identifier": national, "_total": "accurate"})
    assert found.json()["total"] == 1


def test_providers_cannot_submit(world: World) -> None:
    response = world.post("prov1", "", world.submission())
    assert response.status_code == 403, response.text


def test_whole_lifecycle(world: World) -> None:
    sr_id, task_id = world.submit()

    suggestions = world.get("admin", f"Task/{task_id}/$suggest-providers")
    assert suggestions.status_code == 200, suggestions.text
    ranked = [
        next(p["valueReference"]["reference"] for p in e["part"] if p["name"] == "role")
        for e in suggestions.json()["parameter"]
    ]
    assert f"PractitionerRole/{world.prov1}" in ranked
    assert f"PractitionerRole/{world.prov2}" in ranked
    assert world.get("reqA", f"Task/{task_id}/$suggest-providers").status_code == 403

    steps: list[str] = ["new"]
    response = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert response.status_code == 200, response.text
    task = response.json()
    assert status(task) == "assigned" and task["status"] == "ready"
    assert task["owner"] == {"reference": f"PractitionerRole/{world.prov1}"}
    request = world.get("admin", f"ServiceRequest/{sr_id}").json()
    assert request["performer"] == [{"reference": f"PractitionerRole/{world.prov1}"}]
    steps.append("assigned")
    assert world.get("prov1", f"Task/{task_id}").status_code == 200

    for name, expected in (("accept", "accepted"), ("start", "in-progress")):
        response = world.op("prov1", task_id, name)
        assert response.status_code == 200, response.text
        assert status(response.json()) == expected
        steps.append(expected)

    # return: needs a reason, opens a case issue, Task on hold
    assert world.op("prov1", task_id, "return").status_code == 422
    response = world.op("prov1", task_id, "return", reason="Please send the biopsy report")
    assert response.status_code == 200, response.text
    task = response.json()
    assert status(task) == "returned" and task["status"] == "on-hold"
    assert task["statusReason"]["text"] == "Please send the biopsy report"
    steps.append("returned")
    issues = world.get("reqA", "Task", params={"part-of": f"Task/{task_id}"}).json()["entry"]
    assert len(issues) == 1
    issue = issues[0]["resource"]
    assert issue["description"] == "Please send the biopsy report"
    assert issue["businessStatus"]["coding"][0]["code"] == "open"

    # the provider cannot resume before the requester answers
    response = world.op("prov1", task_id, "start")
    assert response.status_code == 409 and error_code(response) == "MSO-CASE-412"
    # only the requester answers
    assert world.op("prov1", issue["id"], "answer", answer="x").status_code == 403
    response = world.op("reqA", issue["id"], "answer", answer="Uploaded it")
    assert response.status_code == 200, response.text
    assert response.json()["businessStatus"]["coding"][0]["code"] == "resolved"
    assert world.op("reqA", issue["id"], "answer", answer="again").status_code == 409

    response = world.op("prov1", task_id, "start")
    assert response.status_code == 200, response.text
    steps.append("in-progress")

    # complete needs a recommendation
    response = world.op("prov1", task_id, "complete")
    assert response.status_code == 409 and error_code(response) == "MSO-CASE-413"
    report_id = world.report(sr_id)
    response = world.op("prov1", task_id, "complete")
    assert response.status_code == 200, response.text
    task = response.json()
    assert status(task) == "done" and task["status"] == "completed"
    assert task["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report_id}"}
    steps.append("done")
    report = world.get("reqA", f"DiagnosticReport/{report_id}").json()
    assert report["status"] == "final"
    assert report["presentedForm"][0]["contentType"] == "application/pdf"

    # nothing moves a Done case
    for who, name in (("prov1", "start"), ("admin", "cancel"), ("prov1", "return")):
        assert world.op(who, task_id, name, reason="r").status_code == 409

    history = world.get("admin", f"Task/{task_id}/_history").json()
    seen = [status(e["resource"]) for e in reversed(history["entry"])]
    assert seen == steps


def _assigned(world: World) -> tuple[str, str]:
    sr_id, task_id = world.submit()
    response = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert response.status_code == 200, response.text
    return sr_id, task_id


def test_forbidden_moves_and_wrong_roles_through_operations(world: World) -> None:
    _, task_id = world.submit()
    before = world.task(task_id)
    cases = [
        ("prov1", "accept", {}, 404),  # not assigned: the provider cannot even see it
        ("reqA", "assign", {"provider": f"PractitionerRole/{world.prov1}"}, 403),
        ("reqA", "accept", {}, 403),
        ("patient", "cancel", {}, 403),
        ("admin", "accept", {}, 403),
        ("admin", "assign", {}, 422),
    ]
    for who, name, params, expected in cases:
        response = world.op(who, task_id, name, **params)
        assert response.status_code == expected, (who, name, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    assert world.task(task_id)["meta"] == before["meta"]

    _, task_id = _assigned(world)
    before = world.task(task_id)
    cases = [
        ("prov1", "start", {}, 409),
        ("prov1", "complete", {}, 409),
        ("prov1", "return", {"reason": "r"}, 409),
        ("prov1", "reject", {}, 422),  # reason required
        ("prov2", "accept", {}, 404),
        ("reqA", "accept", {}, 403),
        ("admin", "assign", {"provider": f"PractitionerRole/{world.prov2}"}, 409),
    ]
    for who, name, params, expected in cases:
        response = world.op(who, task_id, name, **params)
        assert response.status_code == expected, (who, name, response.text)
    assert world.task(task_id)["meta"]["versionId"] == before["meta"]["versionId"]


def test_forbidden_moves_through_put_patch_and_transaction(world: World) -> None:
    _, task_id = _assigned(world)
    before = world.task(task_id)

    def moved(to: CaseStatus, **extra: Any) -> dict[str, Any]:
        from fhir_server.codes import TASK_STATUS_OF_CASE_STATUS

        body = {**before, **extra}
        body["status"] = TASK_STATUS_OF_CASE_STATUS[to]
        body["businessStatus"] = {"coding": [{"system": CASE_STATUS_SYSTEM, "code": to.value}]}
        body.pop("meta", None)
        return body

    # PUT: forbidden move (assigned -> done) and wrong role (requester accepting)
    response = world.put("prov1", f"Task/{task_id}", moved(CaseStatus.DONE))
    assert response.status_code == 409, response.text
    response = world.put("reqA", f"Task/{task_id}", moved(CaseStatus.ACCEPTED))
    assert response.status_code == 403, response.text
    # changing the owner without $assign
    other = {"reference": f"PractitionerRole/{world.prov2}"}
    response = world.put("admin", f"Task/{task_id}", {**moved(CaseStatus.ASSIGNED), "owner": other})
    assert response.status_code == 409, response.text
    # PATCH
    ops = [{"op": "replace", "path": "/status", "value": "in-progress"}]
    ops.append(
        {
            "op": "replace",
            "path": "/businessStatus",
            "value": {"coding": [{"system": CASE_STATUS_SYSTEM, "code": "in-progress"}]},
        }
    )
    assert world.patch("prov1", f"Task/{task_id}", ops).status_code == 409
    assert world.patch("reqA", f"Task/{task_id}", ops).status_code in (403, 409)
    ops_focus = [{"op": "replace", "path": "/focus", "value": {"reference": "ServiceRequest/x"}}]
    assert world.patch("admin", f"Task/{task_id}", ops_focus).status_code == 409
    # transaction Bundle
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {**moved(CaseStatus.DONE), "id": task_id},
                "request": {"method": "PUT", "url": f"Task/{task_id}"},
            }
        ],
    }
    response = world.post("prov1", "", bundle)
    assert response.status_code == 409, response.text
    bundle["entry"][0]["resource"] = {**moved(CaseStatus.ACCEPTED), "id": task_id}
    assert world.post("reqA", "", bundle).status_code == 403
    assert world.task(task_id)["meta"]["versionId"] == before["meta"]["versionId"]

    # an allowed move through PUT runs the same transition
    response = world.put("prov1", f"Task/{task_id}", {**moved(CaseStatus.ACCEPTED), "id": task_id})
    assert response.status_code == 200, response.text
    assert status(world.task(task_id)) == "accepted"
    # other edits are allowed to the case's parties
    body = {**world.task(task_id), "note": [{"text": "Reviewing"}]}
    body.pop("meta")
    assert world.put("prov1", f"Task/{task_id}", body).status_code == 200
    assert world.put("patient", f"Task/{task_id}", body).status_code == 403


def test_no_second_case_task_and_no_delete(world: World) -> None:
    sr_id, task_id = world.submit()
    rogue = {
        "resourceType": "Task",
        "status": "accepted",
        "intent": "order",
        "focus": {"reference": f"ServiceRequest/{sr_id}"},
        "owner": {"reference": f"PractitionerRole/{world.prov2}"},
    }
    assert world.post("reqA", "Task", rogue).status_code == 409
    assert world.get("prov2", f"ServiceRequest/{sr_id}").status_code == 404
    assert (
        world.client.delete(f"/fhir/Task/{task_id}", headers=world.as_("admin")).status_code == 409
    )
    response = world.client.delete(f"/fhir/ServiceRequest/{sr_id}", headers=world.as_("reqA"))
    assert response.status_code == 409


def test_reject_then_reassign(world: World) -> None:
    sr_id, task_id = _assigned(world)
    assert world.op("prov1", task_id, "reject").status_code == 422
    response = world.op("prov1", task_id, "reject", reason="Outside my expertise")
    assert response.status_code == 200, response.text
    task = response.json()
    assert status(task) == "rejected" and task["statusReason"]["text"] == "Outside my expertise"
    # provider 1 lost the case
    assert world.get("prov1", f"Task/{task_id}").status_code == 404
    assert world.get("prov1", f"ServiceRequest/{sr_id}").status_code == 404
    assert world.op("prov1", task_id, "accept").status_code == 404
    suggestions = world.get("admin", f"Task/{task_id}/$suggest-providers").json()
    refs = [
        p["valueReference"]["reference"]
        for e in suggestions["parameter"]
        for p in e["part"]
        if p["name"] == "role"
    ]
    assert f"PractitionerRole/{world.prov1}" not in refs
    response = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov2}")
    assert response.status_code == 200, response.text
    assert world.get("prov2", f"Task/{task_id}").status_code == 200
    assert world.get("prov2", f"ServiceRequest/{sr_id}").status_code == 200
    assert world.get("prov1", f"Task/{task_id}").status_code == 404
    assert world.op("prov2", task_id, "accept").status_code == 200


def test_cancel(world: World) -> None:
    sr_id, task_id = world.submit()
    assert world.op("prov1", task_id, "cancel").status_code == 404
    response = world.op("reqA", task_id, "cancel")
    assert response.status_code == 200, response.text
    assert status(response.json()) == "cancelled"
    assert world.get("reqA", f"ServiceRequest/{sr_id}").json()["status"] == "revoked"
    _, task_id = _assigned(world)
    assert world.op("admin", task_id, "cancel").status_code == 200
    _, task_id = _assigned(world)
    assert world.op("prov1", task_id, "accept").status_code == 200
    assert world.op("reqA", task_id, "cancel").status_code == 409


def test_suggest_ranks_by_workload_and_leave(world: World, client: Any) -> None:
    _, busy = _assigned(world)  # provider 1 now holds one open case
    _, task_id = world.submit()
    ranked = _ranking(world, task_id)
    assert ranked.index(world.prov2) < ranked.index(world.prov1)
    role = world.get("admin", f"PractitionerRole/{world.prov2}").json()
    now = datetime.now().astimezone()
    role["notAvailable"] = [
        {
            "description": "leave",
            "during": {
                "start": (now - timedelta(days=1)).isoformat(),
                "end": (now + timedelta(days=1)).isoformat(),
            },
        }
    ]
    role.pop("meta")
    assert client.put(f"/fhir/PractitionerRole/{world.prov2}", json=role).status_code == 200
    ranked = _ranking(world, task_id)
    assert world.prov2 not in ranked and world.prov1 in ranked
    assert busy


def _ranking(world: World, task_id: str) -> list[str]:
    response = world.get("admin", f"Task/{task_id}/$suggest-providers")
    assert response.status_code == 200, response.text
    refs = [
        p["valueReference"]["reference"].split("/")[1]
        for e in response.json()["parameter"]
        for p in e["part"]
        if p["name"] == "role"
    ]
    return [r for r in refs if r in (world.prov1, world.prov2)]


def test_case_issues(world: World) -> None:
    _, task_id = _assigned(world)
    issue = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"code": "case-issue"}]},
        "partOf": [{"reference": f"Task/{task_id}"}],
        "description": "Images are of poor quality",
    }
    assert world.post("reqA", "Task", issue).status_code == 403
    assert world.post("patient", "Task", issue).status_code == 403
    response = world.post("prov1", "Task", issue)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["businessStatus"]["coding"][0]["code"] == "open"
    assert world.get("reqA", f"Task/{created['id']}").status_code == 200
    edited = {**created, "description": "Images are blurry"}
    edited.pop("meta")
    assert world.put("reqA", f"Task/{created['id']}", edited).status_code == 403
    assert world.put("admin", f"Task/{created['id']}", edited).status_code == 200
    resolved = {
        **edited,
        "businessStatus": {
            "coding": [
                {"code": "resolved", "system": created["businessStatus"]["coding"][0]["system"]}
            ]
        },
    }
    response = world.put("prov1", f"Task/{created['id']}", resolved)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    moved = {**edited, "partOf": [{"reference": "Task/other"}]}
    assert world.put("prov1", f"Task/{created['id']}", moved).status_code == 409
    delete = world.client.delete(f"/fhir/Task/{created['id']}", headers=world.as_("reqA"))
    assert delete.status_code == 403
    delete = world.client.delete(f"/fhir/Task/{created['id']}", headers=world.as_("prov1"))
    assert delete.status_code in (200, 204)


def test_events_carry_the_case(world: World) -> None:
    from fhir_server.workflow.events import CaseEventKind

    recorded: list[Any] = []
    bus = world.app.state.services.events
    bus.subscribe(lambda _tx, event: recorded.append(event))

    def seen_mine() -> list[Any]:
        return [e for e in recorded if e.requester == f"PractitionerRole/{world.req_role}"]

    sr_id, task_id = world.submit()
    world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    events = seen_mine()
    assert [e.kind for e in events] == [CaseEventKind.SUBMITTED, CaseEventKind.ASSIGNED]
    for event in events:
        assert event.case_id == sr_id and event.task_id == task_id
        assert event.case_number == case_number(world, sr_id)
        assert event.requester_org == world.org
    assert events[1].provider == f"PractitionerRole/{world.prov1}"
    assert events[1].actor.role.value == "admin"
