"""Error responses never carry resource content or client values that may be patient data.

Issue 14: a JSON Patch error echoed the whole stored resource (the jsonpatch library's text).
Every 4xx here is asserted by its code, and the distinctive value must be absent from the body.
"""

from __future__ import annotations

import json
import logging

import pytest

FHIR = {"content-type": "application/fhir+json"}
JSON_PATCH = {"content-type": "application/json-patch+json"}
SECRET_NAME = "Quorblewitz"


def _code(response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["details"]["coding"][0]["code"]


@pytest.fixture
def patient_id(client, unique) -> str:
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test", "value": unique}],
        "name": [{"family": SECRET_NAME, "given": [SECRET_NAME + "-given"]}],
        "birthDate": "1961-02-03",
    }
    response = client.post("/fhir/Patient", content=json.dumps(resource), headers=FHIR)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("ops", "status", "code"),
    [
        ([{"op": "remove", "path": "/nothing/here"}], 422, "MSO-PATCH-003"),
        ([{"op": "replace", "path": "/name/7/family", "value": "X"}], 422, "MSO-PATCH-003"),
        ([{"op": "move", "from": "/name", "path": "/name/0/x"}], 422, "MSO-PATCH-003"),
        ([{"op": "test", "path": "/name/0/family", "value": "Other"}], 422, "MSO-PATCH-002"),
        ([{"op": "test", "path": "/birthDate", "value": "2000-01-01"}], 422, "MSO-PATCH-002"),
        ([{"op": "replace", "path": "/gender", "value": "robot"}], 422, "MSO-PATCH-003"),
        ([{"op": "add", "path": "/gender", "value": "robot"}], 400, "MSO-VAL-007"),
    ],
)
def test_json_patch_errors_do_not_echo_the_resource(
    client, patient_id, caplog, ops, status, code
) -> None:
    with caplog.at_level(logging.DEBUG):
        response = client.patch(
            f"/fhir/Patient/{patient_id}", content=json.dumps(ops), headers=JSON_PATCH
        )
    assert response.status_code == status, response.text
    assert _code(response) == code
    for secret in (SECRET_NAME, "1961-02-03", "robot"):
        assert secret not in response.text
        assert secret not in caplog.text


def test_fhirpath_patch_errors_do_not_echo_the_resource(client, patient_id) -> None:
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.name.where(family.foo(1))"},
                    {"name": "value", "valueString": "x"},
                ],
            }
        ],
    }
    response = client.patch(f"/fhir/Patient/{patient_id}", content=json.dumps(params), headers=FHIR)
    assert response.status_code == 400, response.text
    assert _code(response) == "MSO-PATCH-011"
    assert SECRET_NAME not in response.text


def test_invalid_birth_date_is_not_echoed(client) -> None:
    resource = {"resourceType": "Patient", "birthDate": "1999-99-99-SECRET"}
    response = client.post("/fhir/Patient", content=json.dumps(resource), headers=FHIR)
    assert response.status_code == 400
    assert _code(response) == "MSO-VAL-002"
    assert "SECRET" not in response.text
    assert "Patient.birthDate" in response.text  # the path is named


def test_malformed_json_is_not_echoed(client) -> None:
    response = client.post(
        "/fhir/Patient", content=b'{"resourceType": "Patient", "name": SECRET}', headers=FHIR
    )
    assert response.status_code == 400
    assert _code(response) == "MSO-FHIR-001"
    assert "SECRET" not in response.text


@pytest.mark.parametrize(
    "query",
    [
        "birthdate=SECRET",
        "birthdate=ge1999-99-SECRET",
        "identifier=a|b|SECRET",
        "_lastUpdated=SECRET",
        "_count=SECRET",
        "_total=SECRET",
        "_filter=given eq x SECRET",
        "_filter=SECRET",
        "general-practitioner=Patient/SECRET",
    ],
)
def test_search_value_errors_are_not_echoed(client, query) -> None:
    strict = client.get(f"/fhir/Patient?{query}", headers={"prefer": "handling=strict"})
    lenient = client.get(f"/fhir/Patient?{query}", headers={"prefer": "handling=lenient"})
    assert strict.status_code in (200, 400), strict.text
    for response in (strict, lenient):
        assert "SECRET" not in response.text
