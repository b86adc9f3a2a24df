"""The audit trail: an AuditEvent for every interaction and auth event, searchable by admins,
append-only, and never holding chat text."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.auth_helpers import token_for


def _client(app: Any, **kw: Any) -> TestClient:
    token = token_for(app, **kw)
    return TestClient(app, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def admin(app) -> TestClient:
    return _client(app, role="admin", username=f"audit-admin-{uuid.uuid4().hex[:8]}")


def _events(admin: TestClient, app: Any, **params: str) -> list[dict[str, Any]]:
    app.state.audit.flush()
    bundle = admin.get("/fhir/AuditEvent", params={"_count": "100", **params})
    assert bundle.status_code == 200, bundle.text
    return [e["resource"] for e in bundle.json().get("entry", ()) if e["search"]["mode"] == "match"]


def test_reads_searches_and_failures_are_audited(app, client, admin) -> None:
    patient = client.post("/fhir/Patient", json={"resourceType": "Patient"}).json()
    user = f"auditor-{uuid.uuid4().hex[:8]}"
    reader = _client(app, role="admin", username=user)
    assert reader.get(f"/fhir/Patient/{patient['id']}").status_code == 200
    assert reader.get("/fhir/Patient", params={"_id": patient["id"]}).status_code == 200
    assert reader.get("/fhir/Patient/does-not-exist").status_code == 404
    events = _events(admin, app, altid=user)
    by_subtype = {e["subtype"][0]["code"]: e for e in events}
    read = by_subtype["read"]
    assert read["action"] == "R" and read["outcome"] == "0"
    assert read["entity"][0]["what"]["reference"] == f"Patient/{patient['id']}"
    assert read["agent"][0]["requestor"] is True
    assert read["agent"][0]["network"]["address"]
    search = by_subtype["search-type"]
    query = next(e for e in search["entity"] if "query" in e)["query"]
    assert base64.b64decode(query).decode() == f"_id={patient['id']}"
    failed = [e for e in events if e["outcome"] == "4"]
    assert failed and "not known" in failed[0]["outcomeDesc"].lower()
    # by patient, by entity, by date range
    about = _events(admin, app, patient=patient["id"], altid=user)
    assert {e["subtype"][0]["code"] for e in about} >= {"read", "search-type"}
    assert _events(admin, app, entity=f"Patient/{patient['id']}", altid=user)
    assert _events(admin, app, date="ge2020-01-01", altid=user)
    assert not _events(admin, app, date="lt2020-01-01", altid=user)


def test_unauthenticated_requests_are_audited_as_failures(app, admin) -> None:
    marker = uuid.uuid4().hex
    assert TestClient(app).get(f"/fhir/Patient/{marker}").status_code == 401
    events = _events(admin, app, entity=f"Patient/{marker}")
    assert events and events[0]["outcome"] == "4"
    assert events[0]["agent"][0]["who"]["display"] == "anonymous"


def test_auth_events_are_stored(app, admin) -> None:
    who = f"intruder-{uuid.uuid4().hex[:8]}"
    app.state.audit.auth_event("login", False, subject=who, source="10.0.0.9", detail="bad")
    events = _events(admin, app, altid=who)
    assert events[0]["subtype"][0]["code"] == "110122"
    assert events[0]["outcome"] == "4"
    assert _events(admin, app, altid=who, address="10.0.0.9")


def test_an_event_that_cannot_be_stored_never_fails_the_request(app, admin, caplog) -> None:
    """Events become table rows on the request's thread; a broken one is logged and dropped."""
    who = f"broken-{uuid.uuid4().hex[:8]}"
    app.state.audit.record({"resourceType": "AuditEvent", "recorded": "not an instant"})
    app.state.audit.auth_event("login", True, subject=who)
    assert "Could not store an AuditEvent" in caplog.text
    assert len(_events(admin, app, altid=who)) == 1  # the queue goes on


def test_paging_totals_and_parameter_handling(app, admin) -> None:
    user = f"pager-{uuid.uuid4().hex[:8]}"
    reader = _client(app, role="admin", username=user)
    for _ in range(5):
        reader.get("/fhir/Patient", params={"_count": "1"})
    app.state.audit.flush()
    first = admin.get(
        "/fhir/AuditEvent", params={"altid": user, "_count": "2", "_total": "accurate"}
    )
    body = first.json()
    assert body["total"] == 5 and len(body["entry"]) == 2
    seen = {e["resource"]["id"] for e in body["entry"]}
    while next_url := next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None):
        body = admin.get(next_url).json()
        seen |= {e["resource"]["id"] for e in body.get("entry", ())}
    assert len(seen) == 5
    lenient = admin.get("/fhir/AuditEvent", params={"altid": user, "bogus": "1"}).json()
    assert lenient["entry"][-1]["search"]["mode"] == "outcome"
    strict = admin.get(
        "/fhir/AuditEvent", params={"bogus": "1"}, headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400
    assert admin.get("/fhir/AuditEvent", params={"date": "yesterday"}).status_code == 400
    assert admin.get("/fhir/AuditEvent", params={"_sort": "outcome"}).status_code == 400


def test_append_only_and_admin_only(app, admin, client) -> None:
    event = _events(admin, app)[0]
    eid = event["id"]
    assert admin.get(f"/fhir/AuditEvent/{eid}").status_code == 200
    assert admin.get(f"/fhir/AuditEvent/{eid}/_history/1").status_code == 200
    assert admin.get(f"/fhir/AuditEvent/{eid}/_history/2").status_code == 404
    assert len(admin.get(f"/fhir/AuditEvent/{eid}/_history").json()["entry"]) == 1
    assert admin.put(f"/fhir/AuditEvent/{eid}", json=event).status_code == 405
    assert (
        admin.patch(
            f"/fhir/AuditEvent/{eid}",
            json=[{"op": "remove", "path": "/outcome"}],
            headers={"Content-Type": "application/json-patch+json"},
        ).status_code
        == 405
    )
    assert admin.delete(f"/fhir/AuditEvent/{eid}").status_code == 405
    assert admin.delete("/fhir/AuditEvent", params={"_id": eid}).status_code == 405
    assert admin.get(f"/fhir/AuditEvent/{eid}").json()["outcome"] == event["outcome"]
    requester = _client(app, role="requester", organization=f"org-{uuid.uuid4().hex[:6]}")
    assert requester.get(f"/fhir/AuditEvent/{eid}").status_code == 403
    assert requester.get("/fhir/AuditEvent").status_code == 403
    reported = {k: v for k, v in event.items() if k not in ("id", "meta")}
    assert requester.post("/fhir/AuditEvent", json=reported).status_code == 403
    created = client.post("/fhir/AuditEvent", json=reported)
    assert created.status_code == 201
    assert client.get(created.headers["location"]).status_code == 200
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": reported, "request": {"method": "POST", "url": "AuditEvent"}}],
    }
    stored = client.post("/fhir", json=bundle)
    assert stored.status_code == 200, stored.text
    assert stored.json()["entry"][0]["response"]["status"].startswith("201")
    bundle["entry"][0]["request"] = {"method": "PUT", "url": f"AuditEvent/{eid}"}
    bundle["entry"][0]["resource"] = event
    assert client.post("/fhir", json=bundle).status_code == 405


def test_chat_search_values_never_reach_the_trail(app, admin) -> None:
    secret = uuid.uuid4().hex
    user = f"chatty-{uuid.uuid4().hex[:8]}"
    reader = _client(app, role="admin", username=user)
    reader.get("/fhir/Communication", params={"_content": secret})
    app.state.audit.flush()
    text = admin.get("/fhir/AuditEvent", params={"altid": user}).text
    assert secret not in text
    assert base64.b64encode(f"_content={secret}".encode()).decode() not in text


def test_rejected_oauth_requests_are_audited(app, admin) -> None:
    """A wrong redirect at /auth/authorize and a bad grant at /auth/token leave a failure."""
    client_id = f"ghost-{uuid.uuid4().hex[:8]}"
    http = TestClient(app, follow_redirects=False)
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": "https://evil.example/cb",
            "scope": "openid",
            "state": "s",
            "aud": "http://testserver/fhir",
        },
    )
    assert page.status_code == 400 and "location" not in page.headers
    token = http.post(
        "/auth/token",
        data={"grant_type": "authorization_code", "code": "nope", "client_id": client_id},
    )
    assert token.status_code in (400, 401)
    app.state.audit.flush()
    failures = _events(admin, app, outcome="4", date=f"ge{_today()}", _count="1000")
    mine = [
        e
        for e in failures
        if any(
            (a.get("who") or {}).get("identifier", {}).get("value") == client_id for a in e["agent"]
        )
    ]
    assert {e["subtype"][0]["code"] for e in mine} >= {"authorize", "token-issue"}


def _today() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%d")


def test_a_transaction_gets_one_provenance_per_activity(app, admin) -> None:
    """The entries of a transaction share their Provenance (one per CREATE / UPDATE / DELETE),
    written in the same database transaction; a failed transaction leaves none."""
    u = uuid.uuid4().hex[:10]
    existing = admin.put(f"/fhir/Patient/pv-{u}", json={"resourceType": "Patient", "id": f"pv-{u}"})
    assert existing.status_code == 201
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "name": [{"family": f"A{u}"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Patient", "name": [{"family": f"B{u}"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Patient", "id": f"pv-{u}", "active": True},
                "request": {"method": "PUT", "url": f"Patient/pv-{u}"},
            },
        ],
    }
    response = admin.post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    written = [e["response"]["location"].split("/fhir/")[1] for e in response.json()["entry"]]

    def provenances(target: str) -> list[dict[str, Any]]:
        found = admin.get("/fhir/Provenance", params={"target": target, "_count": "50"})
        return [e["resource"] for e in found.json().get("entry", ())]

    (created,) = provenances(written[0].split("/_history")[0])
    assert created["activity"]["coding"][0]["code"] == "CREATE"
    assert sorted(t["reference"] for t in created["target"]) == sorted(written[:2])
    updated = [
        p for p in provenances(f"Patient/pv-{u}") if p["activity"]["coding"][0]["code"] == "UPDATE"
    ]
    assert [[t["reference"] for t in p["target"]] for p in updated] == [[written[2]]]

    bundle["entry"][2]["request"]["url"] = "Patient/other-id"  # id mismatch: the whole Bundle fails
    bundle["entry"][0]["resource"]["name"] = [{"family": f"C{u}"}]
    assert admin.post("/fhir", json=bundle).status_code == 400
    lost = admin.get("/fhir/Patient", params={"family": f"C{u}"}).json()
    assert lost.get("total", 0) == 0
