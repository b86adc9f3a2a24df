"""Every write's AuditEvent names what it wrote (``Type/id/_history/vid``), so that
``AuditEvent?entity=Type/id`` finds it: creates (whose URL names no id), conditional creates
(the match, or the new resource), creates-on-update, updates, patches, deletes, and each
resource written by a transaction or batch Bundle entry. Issue 14, section 2."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.auth_helpers import token_for

PATCH = {"content-type": "application/json-patch+json"}


@pytest.fixture(scope="module")
def admin(app) -> TestClient:
    token = token_for(app, role="admin", username=f"audit-w-{uuid.uuid4().hex[:8]}")
    return TestClient(app, headers={"Authorization": f"Bearer {token}"})


def _events(app: Any, admin: TestClient, entity: str) -> list[dict[str, Any]]:
    app.state.audit.flush()
    bundle = admin.get("/fhir/AuditEvent", params={"entity": entity, "_count": "100"})
    assert bundle.status_code == 200, bundle.text
    return [e["resource"] for e in bundle.json().get("entry", ())]


def _named(event: dict[str, Any]) -> list[str]:
    """The resources an event names (role Domain Resource; a Patient is also named as such)."""
    return [
        e["what"]["reference"]
        for e in event.get("entity", ())
        if "what" in e and e["role"]["code"] == "4"
    ]


def _only(app: Any, admin: TestClient, entity: str, subtype: str) -> dict[str, Any]:
    events = [e for e in _events(app, admin, entity) if e["subtype"][0]["code"] == subtype]
    assert len(events) == 1, [e["subtype"] for e in _events(app, admin, entity)]
    return events[0]


def _patient(u: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:audit", "value": u}]}


def test_create_names_the_created_version(app, admin) -> None:
    response = admin.post("/fhir/Patient", json=_patient(uuid.uuid4().hex))
    assert response.status_code == 201
    pid = response.json()["id"]
    event = _only(app, admin, f"Patient/{pid}", "create")
    assert event["action"] == "C"
    assert f"Patient/{pid}/_history/1" in _named(event)
    # the created Patient is the event's patient too
    found = admin.get("/fhir/AuditEvent", params={"patient": pid, "subtype": "create"})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [event["id"]]


def test_conditional_create_names_the_match_or_the_new_resource(app, admin) -> None:
    u = uuid.uuid4().hex
    condition = {"If-None-Exist": f"identifier=urn:audit|{u}"}
    created = admin.post("/fhir/Patient", json=_patient(u), headers=condition)
    assert created.status_code == 201
    pid = created.json()["id"]
    matched = admin.post("/fhir/Patient", json=_patient(u), headers=condition)
    assert matched.status_code == 200
    events = [
        e for e in _events(app, admin, f"Patient/{pid}") if e["subtype"][0]["code"] == "create"
    ]
    assert len(events) == 2
    assert all(_named(e) == [f"Patient/{pid}/_history/1"] for e in events)


def test_update_create_on_update_patch_and_delete(app, admin) -> None:
    pid = f"aw-{uuid.uuid4().hex[:12]}"
    body = {**_patient(pid), "id": pid}
    assert admin.put(f"/fhir/Patient/{pid}", json=body).status_code == 201
    assert admin.put(f"/fhir/Patient/{pid}", json={**body, "active": True}).status_code == 200
    patch = [{"op": "replace", "path": "/active", "value": False}]
    patched = admin.patch(f"/fhir/Patient/{pid}", content=json.dumps(patch), headers=PATCH)
    assert patched.status_code == 200, patched.text
    assert admin.delete(f"/fhir/Patient/{pid}").status_code == 200
    events = _events(app, admin, f"Patient/{pid}")
    named = {(e["subtype"][0]["code"], e["action"], tuple(_named(e))) for e in events}
    assert named >= {
        ("update", "U", (f"Patient/{pid}/_history/1",)),
        ("update", "U", (f"Patient/{pid}/_history/2",)),
        ("patch", "U", (f"Patient/{pid}/_history/3",)),
        ("delete", "D", (f"Patient/{pid}/_history/4",)),
    }


def test_conditional_update_that_creates_names_the_new_resource(app, admin) -> None:
    u = uuid.uuid4().hex
    response = admin.put(f"/fhir/Patient?identifier=urn:audit|{u}", json=_patient(u))
    assert response.status_code == 201
    pid = response.json()["id"]
    event = _only(app, admin, f"Patient/{pid}", "update")
    assert _named(event) == [f"Patient/{pid}/_history/1"]


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundle_entries_are_each_audited_with_what_they_wrote(app, admin, kind) -> None:
    u = uuid.uuid4().hex
    existing = admin.post("/fhir/Patient", json=_patient(f"{u}-old")).json()["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": _patient(f"{u}-new"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": _patient(f"{u}-old"),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier=urn:audit|{u}-old",
                },
            },
            {
                "resource": {**_patient(f"{u}-old"), "id": existing, "active": True},
                "request": {"method": "PUT", "url": f"Patient/{existing}"},
            },
        ],
    }
    if kind == "batch":
        bundle["entry"].pop(1)  # a batch entry must not depend on another's write
    response = admin.post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    new = response.json()["entry"][0]["response"]["location"].split("/fhir/")[1]
    new_ref = new.split("/_history/")[0]
    created = _only(app, admin, new_ref, "create")
    assert created["action"] == "C" and _named(created) == [new]
    on_existing = _events(app, admin, f"Patient/{existing}")
    updated = next(e for e in on_existing if e["subtype"][0]["code"] == "update")
    assert _named(updated) == [f"Patient/{existing}/_history/2"]
    if kind == "transaction":
        # the conditional create that matched names the match
        matched = [e for e in on_existing if e["subtype"][0]["code"] == "create"]
        assert len(matched) == 2  # the plain create before the Bundle, and the matching entry


def test_a_failed_audit_row_is_logged_without_its_values(app, caplog) -> None:
    """A database error quotes the row's values; the log names the event's id and the error's
    type only (an AuditEvent may hold a search's values)."""
    event = {"resourceType": "AuditEvent", "id": uuid.uuid4().hex}
    event["recorded"] = "2026-01-01T00:00:00Z"
    event["entity"] = [{"query": "aWRlbnRpZmllcj1aZWJlZGlhaA=="}]  # identifier=Zebediah
    event["outcomeDesc"] = "Zebediah"
    app.state.audit.record(event)
    app.state.audit.flush()
    assert "Could not store an AuditEvent" not in caplog.text
    app.state.audit.record(event)  # the same id again: the unique index refuses it
    app.state.audit.flush()
    assert "Could not store an AuditEvent" in caplog.text
    assert "Zebediah" not in caplog.text and "aWRlbnRpZmllcj1" not in caplog.text
