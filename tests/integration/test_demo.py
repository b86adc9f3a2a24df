"""``mso seed-demo`` on a fresh database, SQLite and PostgreSQL (issue 5, Demo data): it is
idempotent, leaves a case in every status, and every demo user gets a token (through
``mso token issue``) with which it sees what its role should."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fhir_server.cli import main
from fhir_server.codes import CASE_STATUS_SYSTEM, CaseStatus
from fhir_server.demo import seed_demo
from fhir_server.demo.accounts import DEMO_USERS, VIEWER_CLIENT_ID, VIEWER_REDIRECT_URI
from fhir_server.storage.auth_schema import auth_client, auth_user
from fhir_server.storage.engine import build_engine
from fhir_server.storage.schema import resource_history
from tests.conftest import make_settings


def _counts(url: str) -> tuple[int, int, int]:
    with build_engine(url).connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(resource_history)).scalar_one(),
            conn.execute(select(func.count()).select_from(auth_user)).scalar_one(),
            conn.execute(select(func.count()).select_from(auth_client)).scalar_one(),
        )


@pytest.fixture
def seeded(
    fresh_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, TestClient]]:
    """A fresh database seeded twice (``mso seed-demo``, then again), and a client on its app."""
    from fhir_server.app import create_app

    monkeypatch.setenv("MSO_DATA_DIR", str(tmp_path))  # the CLI's blob store
    settings = make_settings(fresh_db_url, tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--database-url", fresh_db_url, "seed-demo"]) == 0
    first = out.getvalue()
    assert "8 cases submitted" in first, first
    for user in DEMO_USERS:
        assert f"{user.username}" in first and user.password in first
    after_first = _counts(fresh_db_url)
    again = seed_demo(settings)
    assert not again.created_anything, again
    assert _counts(fresh_db_url) == after_first
    app = create_app(settings)
    with TestClient(app, base_url="http://testserver") as client:
        yield app, client


def _token(url: str, username: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(
            [
                "--database-url",
                url,
                "token",
                "issue",
                "--client-id",
                VIEWER_CLIENT_ID,
                "--user",
                username,
                "--audience",
                "http://testserver/fhir",
            ]
        )
    assert code == 0
    return out.getvalue().strip()


def _statuses(client: TestClient, token: str) -> list[str]:
    response = client.get(
        "/fhir/Task",
        params={"code": "case", "_count": "100"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    return sorted(
        c["code"]
        for e in response.json().get("entry", [])
        for c in e["resource"]["businessStatus"]["coding"]
        if c["system"] == CASE_STATUS_SYSTEM
    )


def test_demo_is_idempotent_and_every_user_sees_its_cases(seeded: Any) -> None:
    app, client = seeded
    url = app.state.settings.database_url
    viewer = app.state.auth.clients.get(VIEWER_CLIENT_ID)
    assert viewer.kind == "public" and viewer.redirect_uris == (VIEWER_REDIRECT_URI,)
    tokens = {user.username: _token(url, user.username) for user in DEMO_USERS}

    assert _statuses(client, tokens["admin"]) == sorted(s.value for s in CaseStatus)
    assert _statuses(client, tokens["requester.riverside"]) == sorted(
        ["new", "accepted", "in-progress", "done"]
    )
    assert _statuses(client, tokens["requester.northwind"]) == sorted(
        ["assigned", "rejected", "returned", "cancelled"]
    )
    # a provider sees the cases assigned to it; the oncologist lost the one it rejected
    assert _statuses(client, tokens["provider.cardiology"]) == sorted(
        ["assigned", "in-progress", "done"]
    )
    assert _statuses(client, tokens["provider.oncology"]) == sorted(["accepted", "returned"])
    assert _statuses(client, tokens["patient.farouk"]) == sorted(
        ["accepted", "in-progress", "done"]
    )

    # the Done case: final recommendation with its PDF, and the invoice to Riverside
    riverside = {"Authorization": f"Bearer {tokens['requester.riverside']}"}
    reports = client.get("/fhir/DiagnosticReport", headers=riverside).json()["entry"]
    assert [r["resource"]["status"] for r in reports] == ["final"]
    form = reports[0]["resource"]["presentedForm"][0]
    assert form["contentType"] == "application/pdf"
    invoices = client.get("/fhir/Invoice", headers=riverside).json()["entry"]
    assert len(invoices) == 1
    northwind = {"Authorization": f"Bearer {tokens['requester.northwind']}"}
    assert client.get("/fhir/Invoice", headers=northwind).json().get("total", 0) == 0

    # analytics for the admin only
    stats = client.get("/fhir/$mso-stats", headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert stats.status_code == 200, stats.text
    assert {p["name"]: p for p in stats.json()["parameter"]}["total"]["valueInteger"] == 8
    for user in ("requester.riverside", "provider.oncology", "patient.farouk"):
        denied = client.get("/fhir/$mso-stats", headers={"Authorization": f"Bearer {tokens[user]}"})
        assert denied.status_code == 403, (user, denied.text)
