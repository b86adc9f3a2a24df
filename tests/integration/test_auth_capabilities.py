"""``GET /fhir/metadata`` declares SMART on FHIR: ``rest[0].security`` with the ``oauth-uris``
extension, whose URLs are those of ``/.well-known/smart-configuration`` for the same base URL
(configured, or the one the request came to)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fhir_server.auth.discovery import OAUTH_URIS, SECURITY_SERVICE
from fhir_server.config import Settings
from fhir_server.fhir.validation import validation_issues
from fhir_server.interactions.capabilities import build_statement

# oauth-uris sub-extension -> smart-configuration key
SMART_KEYS = {
    "authorize": "authorization_endpoint",
    "token": "token_endpoint",
    "introspect": "introspection_endpoint",
    "revoke": "revocation_endpoint",
}


def oauth_uris(statement: dict) -> dict[str, str]:
    security = statement["rest"][0]["security"]
    (ext,) = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    return {e["url"]: e["valueUri"] for e in ext["extension"]}


def service_codes(statement: dict) -> set[tuple[str, str]]:
    return {
        (c["system"], c["code"])
        for s in statement["rest"][0]["security"]["service"]
        for c in s["coding"]
    }


def test_built_statement_declares_smart_and_validates():
    statement = build_statement("https://fhir.example.org/fhir", None)
    assert service_codes(statement) == {(SECURITY_SERVICE, "SMART-on-FHIR")}
    assert oauth_uris(statement) == {
        "authorize": "https://fhir.example.org/auth/authorize",
        "token": "https://fhir.example.org/auth/token",
        "introspect": "https://fhir.example.org/auth/introspect",
        "revoke": "https://fhir.example.org/auth/revoke",
    }
    assert validation_issues(statement) == []
    other = build_statement("https://fhir.example.org/fhir", None, issuer="https://login.example")
    assert oauth_uris(other)["token"] == "https://login.example/auth/token"


def test_metadata_carries_the_oauth_uris_of_the_configured_base(client):
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert validation_issues(statement) == []
    config = client.get("/fhir/.well-known/smart-configuration").json()
    assert oauth_uris(statement) == {name: config[key] for name, key in SMART_KEYS.items()}
    assert oauth_uris(statement)["authorize"] == "http://testserver/auth/authorize"
    assert statement["implementation"]["url"] == "http://testserver/fhir"
    assert service_codes(statement) == {(SECURITY_SERVICE, "SMART-on-FHIR")}
    summary = client.get("/fhir/metadata?_summary=true").json()
    assert "resource" not in summary["rest"][0]
    assert oauth_uris(summary) == oauth_uris(statement)


@pytest.fixture(scope="module")
def unconfigured_app(db_url, tmp_path_factory):
    """An app without ``MSO_BASE_URL``: URLs come from each request."""
    from fhir_server.app import create_app

    return create_app(
        Settings(database_url=db_url, data_dir=tmp_path_factory.mktemp("data"), base_url=None)
    )


def test_metadata_urls_follow_the_request_base(unconfigured_app):
    """The statement is cached, but each base URL still gets its own OAuth URLs."""
    for base in ("http://one.example:8080", "https://two.example", "http://one.example:8080"):
        http = TestClient(unconfigured_app, base_url=base)
        statement = http.get("/fhir/metadata").json()
        config = http.get("/.well-known/smart-configuration").json()
        assert config["issuer"] == base
        assert oauth_uris(statement) == {name: config[key] for name, key in SMART_KEYS.items()}
        assert statement["implementation"]["url"] == f"{base}/fhir"
        assert validation_issues(statement) == []


def test_metadata_urls_under_a_configured_issuer(db_url, tmp_path):
    from fhir_server.app import create_app

    app = create_app(
        Settings(
            database_url=db_url,
            data_dir=tmp_path,
            base_url="https://fhir.example.org/r4",
            auth_issuer="https://login.example.org/",
        )
    )
    http = TestClient(app, base_url="http://internal:8080")
    statement = http.get("/fhir/metadata").json()
    config = http.get("/.well-known/smart-configuration").json()
    app.state.repo.engine.dispose()
    assert config["issuer"] == "https://login.example.org"
    assert oauth_uris(statement) == {name: config[key] for name, key in SMART_KEYS.items()}
    assert statement["implementation"]["url"] == "https://fhir.example.org/r4"
