"""fhir_server.rest.errors on a bare FastAPI app: request validation (422) and unhandled
exceptions (500) become OperationOutcomes that never echo the rejected value."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_server.rest import errors


def _app() -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/count")
    def count(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret patient name")

    @app.post("/auth/token")
    def token() -> None:
        raise RuntimeError("boom")

    return app


def test_validation_error_is_an_outcome_naming_the_place_not_the_value() -> None:
    response = TestClient(_app()).get("/count", params={"n": "Jane-Doe-1970"})
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "MSO-HTTP-422"
    assert issue["code"] == "invalid" and issue["expression"] == ["query.n"]
    assert "Jane" not in response.text


def test_unhandled_error_is_a_500_outcome_without_the_exception_text() -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-HTTP-500"
    assert "secret" not in response.text
    oauth = client.post("/auth/token")
    assert oauth.status_code == 500 and oauth.json()["error"] == "server_error"


def test_not_found_and_method_not_allowed() -> None:
    client = TestClient(_app())
    missing = client.get("/nothing")
    assert missing.status_code == 404
    assert missing.json()["issue"][0]["code"] == "not-found"
    wrong = client.delete("/count")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
    assert wrong.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-HTTP-405"
