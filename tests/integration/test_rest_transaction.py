"""transaction and batch Bundles: ordering, urn:uuid and conditional references, atomicity."""

from __future__ import annotations

import json

FHIR = {"content-type": "application/fhir+json"}


def _send(client, bundle: dict):
    return client.post("/fhir", content=json.dumps(bundle), headers=FHIR)


def _patient(unique: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:tx", "value": unique}]}


def _count(client, unique: str) -> int:
    return len(
        client.get("/fhir/Patient", params={"identifier": f"urn:tx|{unique}"})
        .json()
        .get("entry", [])
    )


def test_transaction_resolves_urn_uuid_references(client, unique):
    patient_url = "urn:uuid:7a4a9f4e-1a0b-4c2d-9a5e-0e6a7c8b9d01"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": patient_url},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": patient_url,
                "resource": _patient(unique),
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    response = _send(client, bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    observation, patient = (e["resource"] for e in result["entry"])
    assert observation["subject"]["reference"] == f"Patient/{patient['id']}"
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created", "201 Created"]
    assert result["entry"][1]["response"]["location"].endswith(
        f"Patient/{patient['id']}/_history/1"
    )


def test_transaction_processes_in_spec_order(client, unique):
    existing = client.post(
        "/fhir/Patient", content=json.dumps(_patient(unique)), headers=FHIR
    ).json()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
            {
                "resource": {**existing, "gender": "male"},
                "request": {"method": "PUT", "url": f"Patient/{existing['id']}"},
            },
        ],
    }
    result = _send(client, bundle).json()
    # GET runs after PUT even though it comes first in the Bundle.
    assert result["entry"][0]["resource"]["gender"] == "male"
    assert result["entry"][0]["resource"]["meta"]["versionId"] == "2"


def test_failed_transaction_stores_nothing(client, unique):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient(unique), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Patient", "gender": "not-a-gender"},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    response = _send(client, bundle)
    assert response.status_code == 400
    assert "Bundle.entry[1]" in response.json()["issue"][0]["diagnostics"]
    assert _count(client, unique) == 0


def test_failed_transaction_rolls_back_updates_and_deletes(client, unique):
    keep = client.post("/fhir/Patient", content=json.dumps(_patient(unique)), headers=FHIR).json()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "DELETE", "url": f"Patient/{keep['id']}"}},
            {
                "resource": {**keep, "id": keep["id"] + "x", "gender": "male"},
                "request": {"method": "PUT", "url": f"Patient/{keep['id']}x", "ifMatch": 'W/"9"'},
            },
        ],
    }
    response = _send(client, bundle)
    assert response.status_code == 404
    still = client.get(f"/fhir/Patient/{keep['id']}")
    assert still.status_code == 200 and still.json()["meta"]["versionId"] == "1"


def test_conditional_create_and_conditional_reference(client, unique):
    client.post("/fhir/Patient", content=json.dumps(_patient(unique)), headers=FHIR)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-2222-4333-8444-555555555555",
                "resource": _patient(unique),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier=urn:tx|{unique}",
                },
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": f"Patient?identifier=urn:tx|{unique}"},
                    "performer": [{"reference": "urn:uuid:11111111-2222-4333-8444-555555555555"}],
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    result = _send(client, bundle)
    assert result.status_code == 200, result.text
    patient_entry, observation_entry = result.json()["entry"]
    assert patient_entry["response"]["status"] == "200 OK"
    pid = patient_entry["resource"]["id"]
    assert observation_entry["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert observation_entry["resource"]["performer"][0]["reference"] == f"Patient/{pid}"
    assert _count(client, unique) == 1


def test_conditional_reference_without_match_fails_the_transaction(client, unique):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient(unique), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient?identifier=urn:tx|nobody-has-this"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    assert _send(client, bundle).status_code == 404
    assert _count(client, unique) == 0


def test_batch_entries_succeed_or_fail_on_their_own(client, unique):
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": _patient(unique), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/no-such-patient"}},
            {
                "resource": {"resourceType": "Patient", "gender": "x"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "GET", "url": f"Patient?identifier=urn:tx|{unique}"}},
        ],
    }
    response = _send(client, bundle)
    assert response.status_code == 200
    entries = response.json()["entry"]
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"]["status"].startswith("404")
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert entries[2]["response"]["status"].startswith("400")
    assert entries[3]["resource"]["resourceType"] == "Bundle"
    assert _count(client, unique) == 1


def test_malformed_bundles(client):
    assert _send(client, {"resourceType": "Patient"}).status_code == 400
    assert _send(client, {"resourceType": "Bundle", "type": "collection"}).status_code == 400
    no_request = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {"resourceType": "Patient"}}],
    }
    assert _send(client, no_request).status_code == 400
    twice = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "DELETE", "url": "Patient/a"}},
            {"request": {"method": "DELETE", "url": "Patient/a"}},
        ],
    }
    assert _send(client, twice).status_code == 400
