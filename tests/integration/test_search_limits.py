"""What one search may cost (issue 21): limits refused with a 400 before anything runs, the
statement timeout (PostgreSQL), and repeated criteria that no longer cost the planner minutes.

The cancellation of a disconnected client's search is in ``tests/e2e/test_search_cancel.py``
(it needs a real socket).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from tests.conftest import authorized, make_settings


def code_of(resp) -> str:  # type: ignore[no-untyped-def]
    return resp.json()["issue"][0]["details"]["coding"][0]["code"]


@contextmanager
def app_client(db_url: str, tmp_path, **settings: object) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """A client on a fresh app over ``db_url`` with ``settings``."""
    from fhir_server.app import create_app

    app = create_app(make_settings(db_url, tmp_path, **settings))
    with TestClient(app, base_url="http://testserver", headers=authorized(db_url)) as client:
        yield client


def query(name: str, values: list[str]) -> str:
    return "&".join(f"{name}={v}" for v in values)


@pytest.mark.parametrize("strict", [False, True])
def test_too_many_criteria_is_a_400_whatever_the_handling(client, strict: bool) -> None:
    headers = {"Prefer": "handling=strict"} if strict else {}
    resp = client.get(f"/fhir/Patient?{query('name', ['x'] * 41)}", headers=headers)
    assert resp.status_code == 400
    assert code_of(resp) == "MSO-SEARCH-020"
    assert resp.json()["issue"][0]["code"] == "too-costly"
    assert client.get(f"/fhir/Patient?{query('name', ['x'] * 40)}").status_code == 200


def test_a_filter_counts_its_leaves(client) -> None:
    expression = " or ".join(f'name eq "n{i}"' for i in range(41))
    resp = client.get("/fhir/Patient", params={"_filter": expression})
    assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-020"


def test_too_many_or_values_is_a_400(client) -> None:
    values = ",".join(f"v{i}" for i in range(101))
    resp = client.get(f"/fhir/Patient?name={values}")
    assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-021"
    values = ",".join(f"v{i}" for i in range(100))
    assert client.get(f"/fhir/Patient?name={values}").status_code == 200


def test_a_chain_too_deep_is_a_400(client) -> None:
    ok = client.get("/fhir/Encounter?subject:Patient.organization.partof.name=x")
    assert ok.status_code == 200
    resp = client.get("/fhir/Encounter?subject:Patient.organization.partof.partof.name=x")
    assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-022"
    resp = client.get(
        "/fhir/Patient?_has:Observation:subject:_has:Provenance:target:"
        "_has:AuditEvent:entity:_has:Provenance:target:agent=x"
    )
    assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-022"


def test_too_many_includes_is_a_400(client) -> None:
    resp = client.get("/fhir/Observation?" + query("_include", ["Observation:subject"] * 11))
    assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-023"
    ok = client.get("/fhir/Observation?" + query("_include", ["Observation:subject"] * 10))
    assert ok.status_code == 200


def test_too_many_included_resources_is_a_400(db_url: str, tmp_path, unique: str) -> None:
    with app_client(db_url, tmp_path, search_max_included=1) as client:
        pid = client.post("/fhir/Patient", json={"resourceType": "Patient"}).json()["id"]
        for _ in range(2):
            obs = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": f"Patient/{pid}"},
            }
            assert client.post("/fhir/Observation", json=obs).status_code == 201
        resp = client.get(f"/fhir/Patient?_id={pid}&_revinclude=Observation:subject")
        assert resp.status_code == 400 and code_of(resp) == "MSO-SEARCH-024"
        resp = client.get(f"/fhir/Observation?subject=Patient/{pid}&_include=Observation:subject")
        assert resp.status_code == 200  # one Patient added


def test_repeated_criteria_cost_no_more_than_one(db_url: str, tmp_path) -> None:
    """``name=x`` 200 times took 20 s on PostgreSQL (the planner, one semi-join each)."""
    with app_client(db_url, tmp_path, search_max_criteria=500) as client:
        family = f"Rep{time.monotonic_ns()}"
        for _ in range(3):
            patient = {"resourceType": "Patient", "name": [{"family": family}]}
            assert client.post("/fhir/Patient", json=patient).status_code == 201
        start = time.monotonic()
        resp = client.get(f"/fhir/Patient?{query('name', [family] * 200)}&gender:missing=true")
        elapsed = time.monotonic() - start
        assert resp.status_code == 200 and resp.json()["total"] == 3
        assert elapsed < 3, elapsed


# -- the statement timeout (PostgreSQL) ---------------------------------------------------------


@contextmanager
def locked(db_url: str, table: str) -> Iterator[None]:
    """Hold an exclusive lock on ``table`` from another connection: a search reading it waits."""
    import psycopg

    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


# PostgreSQL only: the statement timeout is PostgreSQL's (SQLite gets the limits above).
@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize(
    "search",
    [
        "Patient?name=waits",  # one criterion: the generic-plan pool (statement_timeout)
        "Patient?name=waits&gender=male",  # on the unit's connection (the watchdog)
    ],
)
def test_a_search_over_the_timeout_is_a_503(db_url: str, tmp_path, search: str) -> None:
    with app_client(db_url, tmp_path, search_timeout_ms=300) as client:
        client.get(f"/fhir/{search}")  # connections and plans made before the lock
        with locked(db_url, "idx_string"):
            start = time.monotonic()
            resp = client.get(f"/fhir/{search}")
            elapsed = time.monotonic() - start
            assert resp.status_code == 503, resp.text
            assert code_of(resp) == "MSO-SEARCH-025"
            assert resp.json()["issue"][0]["code"] == "too-costly"
            assert elapsed < 5
            # nothing else is affected: a search on another table goes on
            assert client.get("/fhir/Patient?birthdate=2000").status_code == 200
        # the same search once the lock is gone, on the same pooled connections
        for _ in range(3):
            assert client.get(f"/fhir/{search}").status_code == 200
