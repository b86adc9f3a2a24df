"""No input keeps an AuditEvent out of the trail, and its network address cannot be forged.

Issue 21, "Audit records silently lost": on PostgreSQL a value longer than its column (a long
``X-Forwarded-For``, a long id or reference) lost the event, and with it the whole batch of
other requests' events; and any client could set the audited address with ``X-Forwarded-For``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from fhir_server.audit import store
from fhir_server.audit.log import AuditLog
from fhir_server.serve import proxy_options
from tests.auth_helpers import token_for

PROXY = "10.77.0.1"


def _headers(app: Any, user: str | None = None) -> dict[str, str]:
    user = user or f"audit-h-{uuid.uuid4().hex[:8]}"
    token = token_for(app, role="admin", username=user)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def admin(app) -> TestClient:
    return TestClient(app, headers=_headers(app))


def _served(app: Any, trusted_proxies: str, peer: str) -> TestClient:
    """A client reaching ``app`` from ``peer`` through the ASGI stack ``mso serve`` runs (the
    uvicorn configuration of ``MSO_TRUSTED_PROXIES``)."""
    config = uvicorn.Config(app, log_config=None, **proxy_options(trusted_proxies))
    config.load()
    return TestClient(config.loaded_app, headers=_headers(app), client=(peer, 40000))


def _events(app: Any, admin: TestClient, **params: str) -> list[dict[str, Any]]:
    app.state.audit.flush()
    bundle = admin.get("/fhir/AuditEvent", params={"_count": "100", **params})
    assert bundle.status_code == 200, bundle.text
    return [e["resource"] for e in bundle.json().get("entry", ()) if e["search"]["mode"] == "match"]


def _address(event: dict[str, Any]) -> str:
    return event["agent"][0]["network"]["address"]


def test_a_long_forwarded_address_from_a_trusted_proxy_is_audited(app, admin) -> None:
    forwarded = "f" * 292 + uuid.uuid4().hex[:8]  # 300 characters, not an address at all
    marker = uuid.uuid4().hex
    http = _served(app, PROXY, PROXY)
    response = http.get(f"/fhir/Patient/{marker}", headers={"X-Forwarded-For": forwarded})
    assert response.status_code == 404
    (event,) = _events(app, admin, address=forwarded)
    assert _address(event) == forwarded  # whole in the JSON, cut (with a digest) in the column
    assert event["entity"][0]["what"]["reference"] == f"Patient/{marker}"
    # a value sharing the first characters is another value
    assert not _events(app, admin, address=forwarded[:-1] + "x")


def test_a_search_for_a_long_patient_is_audited_and_findable(app, client, admin) -> None:
    patient = "p" * 268 + uuid.uuid4().hex  # 300 characters
    assert client.get("/fhir/Observation", params={"patient": patient}).status_code in (200, 400)
    events = _events(app, admin, patient=patient)
    assert events and events[0]["subtype"][0]["code"] == "search-type"
    assert _events(app, admin, patient=f"Patient/{patient}")


def test_an_id_longer_than_64_characters_is_audited_and_findable(app, admin) -> None:
    long_id = "i" * 40 + uuid.uuid4().hex  # 72 characters: not a FHIR id
    user = f"long-id-{uuid.uuid4().hex[:8]}"
    http = TestClient(app, headers=_headers(app, user))
    assert http.get(f"/fhir/Patient/{long_id}").status_code == 400
    assert http.get("/fhir/Patient", params={"_id": long_id}).status_code in (200, 400)
    assert http.get("/fhir/Observation", params={"subject": f"Patient/{long_id}"}).status_code in (
        200,
        400,
    )
    # the read is refused before it is an interaction, and still audited under this user
    assert len(_events(app, admin, altid=user)) == 3
    assert len(_events(app, admin, patient=long_id)) == 2


def test_a_reported_event_with_long_references_is_stored(app, admin) -> None:
    """POST AuditEvent (an admin feeding its own events) with values over every column size."""
    who = "https://example.org/fhir/Practitioner/" + "w" * 250 + uuid.uuid4().hex
    what = "https://example.org/fhir/Patient/" + "q" * 250 + uuid.uuid4().hex
    body = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [
            {"requestor": True, "who": {"reference": who}, "network": {"address": "a" * 200}}
        ],
        "source": {"observer": {"display": "feeder"}},
        "entity": [{"what": {"reference": what}}],
    }
    created = admin.post("/fhir/AuditEvent", json=body)
    assert created.status_code == 201, created.text
    (found,) = _events(app, admin, agent=who)
    assert found["entity"][0]["what"]["reference"] == what
    assert _events(app, admin, entity=what, address="a" * 200)


def test_a_nul_in_a_search_value_is_no_error(app, admin) -> None:
    """PostgreSQL text cannot hold NUL: stored and searched as U+FFFD, never a 500."""
    assert admin.get("/fhir/AuditEvent", params={"patient": "a\x00b"}).status_code == 200
    assert admin.get("/fhir/AuditEvent", params={"_id": "\x00"}).status_code == 200


def test_a_forged_forwarded_for_is_ignored_by_default(app, admin) -> None:
    forged = "203.0.113.66"
    marker = uuid.uuid4().hex
    # as `mso serve` runs it with no MSO_TRUSTED_PROXIES, from the loopback
    http = _served(app, "", "127.0.0.1")
    assert http.get(f"/fhir/Patient/{marker}", headers={"X-Forwarded-For": forged}).is_client_error
    # and from a peer that is not the configured proxy
    http = _served(app, PROXY, "10.77.0.2")
    assert http.get(f"/fhir/Patient/{marker}", headers={"X-Forwarded-For": forged}).is_client_error
    # the app itself (no uvicorn in front): the ASGI client only
    http = TestClient(app, headers=_headers(app), client=("10.77.0.3", 1))
    assert http.get(f"/fhir/Patient/{marker}", headers={"X-Forwarded-For": forged}).is_client_error
    events = _events(app, admin, entity=f"Patient/{marker}")
    assert sorted(_address(e) for e in events) == ["10.77.0.2", "10.77.0.3", "127.0.0.1"]
    assert not _events(app, admin, address=forged)


def test_a_forwarded_for_from_the_configured_proxy_is_the_address(app, admin) -> None:
    marker = uuid.uuid4().hex
    http = _served(app, "10.77.0.0/16", "10.77.4.5")
    headers = {"X-Forwarded-For": "198.51.100.7, 10.77.9.9"}  # client, then an inner proxy
    assert http.get(f"/fhir/Patient/{marker}", headers=headers).status_code == 404
    (event,) = _events(app, admin, entity=f"Patient/{marker}")
    assert _address(event) == "198.51.100.7"


# -- the writer ------------------------------------------------------------------------------


def _auth_events(audit: AuditLog, count: int) -> list[str]:
    subjects = [f"batch-{uuid.uuid4().hex[:12]}" for _ in range(count)]
    for subject in subjects:
        audit.auth_event("login", True, subject=subject, source="10.1.1.1")
    return subjects


def test_one_bad_event_in_a_batch_loses_no_event(app, admin, monkeypatch, caplog) -> None:
    """A row the database refuses (here a value no driver can bind, standing for any value the
    columns were not made for) is stored without its searchable columns; the batch's other
    events are stored as they are."""
    audit = AuditLog(app.state.audit.repo, flush_interval=60)  # one batch, on flush()
    bad_id = str(uuid.uuid4())
    columns_of = store.columns_of

    def refused_for_one(event: dict[str, Any]) -> dict[str, Any]:
        columns = columns_of(event)
        return {**columns, "address": object()} if event.get("id") == bad_id else columns

    monkeypatch.setattr(store, "columns_of", refused_for_one)
    before = _auth_events(audit, 3)
    audit.record({**app_event(), "id": bad_id})
    after = _auth_events(audit, 3)
    try:
        with caplog.at_level(logging.ERROR, logger="fhir_server.audit.log"):
            audit.flush()
    finally:
        audit.close()
    for subject in before + after:
        assert len(_events(app, admin, altid=subject, address="10.1.1.1")) == 1
    (bad,) = _events(app, admin, _id=bad_id)
    assert bad["outcomeDesc"] == "bad row"
    stats = audit.stats()
    assert stats["degraded"] == 1 and stats["failures"] == 2 and stats["lost"] == 0
    assert "audit store failures so far: 2" in caplog.text


def app_event() -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "type": {"code": "rest"},
        "recorded": "2026-01-01T00:00:00Z",
        "outcome": "0",
        "outcomeDesc": "bad row",
    }


class _Unavailable:
    """``store.write_rows`` failing like a database that is down, ``failing`` times."""

    def __init__(self, failing: int) -> None:
        self.failing = failing
        self.write_rows = store.write_rows

    def __call__(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        if self.failing > 0:
            self.failing -= 1
            raise OperationalError("COPY", {}, ConnectionError("server closed the connection"))
        self.write_rows(conn, rows)


def test_an_unavailable_database_is_retried_with_backoff(app, admin, monkeypatch, caplog) -> None:
    audit = AuditLog(app.state.audit.repo, flush_interval=60, retry_initial=0.01, retry_max=0.05)
    outage = _Unavailable(failing=12)  # three rounds: batch, event, bare, renamed
    monkeypatch.setattr(store, "write_rows", outage)
    subjects = _auth_events(audit, 4)
    try:
        with caplog.at_level(logging.ERROR, logger="fhir_server.audit.log"):
            audit.flush()  # returns once everything is stored
    finally:
        audit.close()
    assert outage.failing == 0
    for subject in subjects:
        assert len(_events(app, admin, altid=subject)) == 1
    stats = audit.stats()
    assert stats == {"failures": 12, "degraded": 0, "waiting": 0, "lost": 0}
    assert "4 wait for a retry" in caplog.text
    assert "audit store failures so far: 12" in caplog.text


def test_events_still_unstored_at_shutdown_are_counted_as_lost(app, monkeypatch, caplog) -> None:
    audit = AuditLog(app.state.audit.repo, retry_initial=0.01, retry_max=0.02, close_timeout=0.2)
    monkeypatch.setattr(store, "write_rows", _Unavailable(failing=10**9))
    _auth_events(audit, 2)
    with caplog.at_level(logging.ERROR, logger="fhir_server.audit.log"):
        audit.close()
    assert audit.stats()["lost"] == 2 and audit.stats()["waiting"] == 0
    assert "2 AuditEvents could not be stored before the writer stopped" in caplog.text
