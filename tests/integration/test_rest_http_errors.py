"""Errors at the HTTP edge are OperationOutcomes with stable codes (issue 14, section 3):
outside ``/fhir`` (404, 405) except at the OAuth endpoints (RFC 6749 JSON); a FHIR write without
a Content-Type (415, as a wrong one); and an oversized FHIR JSON body (413) says how large files
travel (raw ``POST [base]/Binary``, referenced by ``attachment.url``)."""

from __future__ import annotations

import json

import pytest

FHIR = {"content-type": "application/fhir+json"}


def issue_code(response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert response.headers["content-type"].startswith("application/fhir+json")
    return body["issue"][0]["details"]["coding"][0]["code"]


@pytest.mark.parametrize(
    ("method", "url", "status", "code"),
    [
        ("GET", "/no-such-page", 404, "MSO-HTTP-404"),
        ("GET", "/fhirx", 404, "MSO-HTTP-404"),
        ("GET", "/fhir/.well-known/no-such-thing", 404, "MSO-HTTP-404"),
        ("DELETE", "/.well-known/smart-configuration", 405, "MSO-HTTP-405"),
    ],
)
def test_errors_outside_fhir_are_operation_outcomes(client, method, url, status, code):
    response = client.request(method, url)
    assert response.status_code == status
    assert issue_code(response) == code
    if status == 405:
        assert "GET" in response.headers["allow"]


@pytest.mark.parametrize("path", ["/auth/token", "/auth/introspect", "/auth/revoke"])
def test_oauth_endpoints_keep_rfc6749_errors(client, path):
    response = client.get(path)
    assert response.status_code == 405
    body = response.json()
    assert body["error"] == "invalid_request" and "error_description" in body
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("method", "url", "content"),
    [
        ("POST", "/fhir/Patient", '{"resourceType": "Patient"}'),
        ("PUT", "/fhir/Patient/no-type", '{"resourceType": "Patient", "id": "no-type"}'),
        ("PATCH", "/fhir/Patient/no-type", '[{"op": "add", "path": "/active", "value": true}]'),
        ("POST", "/fhir", '{"resourceType": "Bundle", "type": "batch"}'),
        ("POST", "/fhir/Patient/$validate", '{"resourceType": "Patient"}'),
    ],
)
def test_a_body_without_content_type_is_415(client, method, url, content):
    response = client.request(method, url, content=content)
    assert response.status_code == 415
    assert issue_code(response) == "MSO-REST-415"


def test_wrong_and_missing_content_type_answer_alike(client):
    wrong = client.post(
        "/fhir/Patient",
        content='{"resourceType": "Patient"}',
        headers={"content-type": "text/plain"},
    )
    missing = client.post("/fhir/Patient", content='{"resourceType": "Patient"}')
    assert wrong.status_code == missing.status_code == 415
    assert issue_code(wrong) == issue_code(missing) == "MSO-REST-415"


def test_an_operation_post_without_body_needs_no_content_type(client):
    """An operation may be POSTed with no body at all (its parameters in the URL)."""
    response = client.post("/fhir/Patient/$validate")
    assert response.status_code == 400
    assert issue_code(response) == "MSO-OP-001"  # the operation's own complaint, not 415


def test_oversized_json_body_says_how_large_files_travel(client):
    huge = json.dumps(
        {"resourceType": "Binary", "contentType": "application/pdf", "data": "A" * (17 << 20)}
    )
    response = client.post("/fhir/Binary", content=huge, headers=FHIR)
    assert response.status_code == 413
    assert issue_code(response) == "MSO-REST-413"
    text = response.json()["issue"][0]["diagnostics"]
    assert "POST [base]/Binary" in text and "attachment.url" in text and "Binary/<id>" in text
