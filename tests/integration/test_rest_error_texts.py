"""Error texts name ids, paths, parameter names and codes, never a value that may be patient
data: not an identifier from search criteria, not the stored resource (issue 14, section 3)."""

from __future__ import annotations

import json
import uuid

FHIR = {"content-type": "application/fhir+json"}
SECRET = "Zebediah"


def _texts(response) -> str:
    body = response.json()
    assert body["resourceType"] in ("OperationOutcome", "Bundle"), body
    return json.dumps(body)


def _patient(client, mrn: str) -> str:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": mrn}],
        "name": [{"family": SECRET}],
    }
    response = client.post("/fhir/Patient", content=json.dumps(body), headers=FHIR)
    assert response.status_code == 201
    return response.json()["id"]


def test_if_none_exist_with_several_matches_does_not_quote_the_criteria(client):
    mrn = f"{SECRET}-{uuid.uuid4().hex}"
    _patient(client, mrn)
    _patient(client, mrn)
    response = client.post(
        "/fhir/Patient",
        content=json.dumps({"resourceType": "Patient"}),
        headers={**FHIR, "If-None-Exist": f"identifier=urn:mrn|{mrn}"},
    )
    assert response.status_code == 412
    text = _texts(response)
    assert "identifier" in text and SECRET not in text


def test_unresolved_conditional_reference_does_not_quote_its_query(client):
    mrn = f"{SECRET}-{uuid.uuid4().hex}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": f"Patient?identifier=urn:mrn|{mrn}"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    response = client.post("/fhir", content=json.dumps(bundle), headers=FHIR)
    assert response.status_code == 404
    text = _texts(response)
    assert "MSO-TX-021" in text and "identifier" in text and SECRET not in text


def test_a_failed_json_patch_does_not_echo_the_stored_resource(client):
    pid = _patient(client, uuid.uuid4().hex)
    patch = [{"op": "remove", "path": "/name/0/given"}]
    response = client.patch(
        f"/fhir/Patient/{pid}",
        content=json.dumps(patch),
        headers={"content-type": "application/json-patch+json"},
    )
    assert 400 <= response.status_code < 500
    assert SECRET not in _texts(response)
