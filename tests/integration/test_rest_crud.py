"""CRUD, versioning, conditional interactions and error handling over HTTP, on both databases."""

from __future__ import annotations

import json

import pytest

FHIR = {"content-type": "application/fhir+json"}


def patient(unique: str, **extra: object) -> dict:
    """A small valid Patient carrying a unique identifier."""
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test", "value": unique}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        **extra,
    }


def post(client, resource: dict, **headers: str):
    return client.post(
        f"/fhir/{resource['resourceType']}",
        content=json.dumps(resource),
        headers={**FHIR, **headers},
    )


def issue_code(response) -> str:
    """The MSO error code of an OperationOutcome response."""
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["details"]["coding"][0]["code"]


def test_create_assigns_id_version_and_headers(client, unique):
    body = patient(unique, id="client-chosen")
    response = post(client, body)
    assert response.status_code == 201
    created = response.json()
    assert created["id"] != "client-chosen"
    assert created["meta"]["versionId"] == "1"
    assert created["meta"]["lastUpdated"].endswith("Z")
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"].endswith(f"/fhir/Patient/{created['id']}/_history/1")
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert "GMT" in response.headers["last-modified"]


def test_read_vread_and_conditional_read(client, unique):
    created = post(client, patient(unique)).json()
    pid = created["id"]
    read = client.get(f"/fhir/Patient/{pid}")
    assert read.status_code == 200
    assert read.json() == created
    assert client.get(f"/fhir/Patient/{pid}", headers={"if-none-match": 'W/"1"'}).status_code == 304
    assert client.get(f"/fhir/Patient/{pid}", headers={"if-none-match": 'W/"9"'}).status_code == 200
    modified = read.headers["last-modified"]
    assert (
        client.get(f"/fhir/Patient/{pid}", headers={"if-modified-since": modified}).status_code
        == 304
    )
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert client.get(f"/fhir/Patient/{pid}", headers={"if-modified-since": old}).status_code == 200
    vread = client.get(f"/fhir/Patient/{pid}/_history/1")
    assert vread.status_code == 200 and vread.json()["meta"]["versionId"] == "1"
    missing = client.get(f"/fhir/Patient/{pid}/_history/7")
    assert missing.status_code == 404


def test_update_versions_and_if_match(client, unique):
    created = post(client, patient(unique)).json()
    pid = created["id"]
    changed = {**created, "gender": "other"}
    ok = client.put(
        f"/fhir/Patient/{pid}", content=json.dumps(changed), headers={**FHIR, "if-match": 'W/"1"'}
    )
    assert ok.status_code == 200
    assert ok.json()["meta"]["versionId"] == "2"
    assert ok.headers["etag"] == 'W/"2"'
    stale = client.put(
        f"/fhir/Patient/{pid}", content=json.dumps(changed), headers={**FHIR, "if-match": 'W/"1"'}
    )
    assert stale.status_code == 412
    assert issue_code(stale) == "MSO-REST-412"
    assert client.get(f"/fhir/Patient/{pid}").json()["meta"]["versionId"] == "2"


def test_update_creates_with_client_id(client, unique):
    body = patient(unique, id=f"c-{unique[:20]}")
    response = client.put(f"/fhir/Patient/{body['id']}", content=json.dumps(body), headers=FHIR)
    assert response.status_code == 201
    assert response.json()["meta"]["versionId"] == "1"
    again = client.put(f"/fhir/Patient/{body['id']}", content=json.dumps(body), headers=FHIR)
    assert again.status_code == 200 and again.json()["meta"]["versionId"] == "2"


@pytest.mark.parametrize(
    ("url_id", "body_id", "code"),
    [
        ("abc", None, "MSO-REST-006"),
        ("abc", "xyz", "MSO-REST-006"),
        ("bad_id!", "bad_id!", "MSO-REST-002"),
    ],
)
def test_update_id_rules(client, unique, url_id, body_id, code):
    body = patient(unique)
    if body_id:
        body["id"] = body_id
    response = client.put(f"/fhir/Patient/{url_id}", content=json.dumps(body), headers=FHIR)
    assert response.status_code == 400
    assert issue_code(response) == code


def test_delete_then_gone_then_recreate(client, unique):
    created = post(client, patient(unique)).json()
    pid = created["id"]
    deleted = client.delete(f"/fhir/Patient/{pid}")
    assert deleted.status_code == 200
    assert deleted.json()["resourceType"] == "OperationOutcome"
    gone = client.get(f"/fhir/Patient/{pid}")
    assert gone.status_code == 410
    assert issue_code(gone) == "MSO-REST-410"
    # Older versions stay readable; deleting again is idempotent and makes no new version.
    assert client.get(f"/fhir/Patient/{pid}/_history/1").status_code == 200
    assert client.get(f"/fhir/Patient/{pid}/_history/2").status_code == 410
    assert (
        client.delete(f"/fhir/Patient/{pid}", headers={"prefer": "return=minimal"}).status_code
        == 204
    )
    history = client.get(f"/fhir/Patient/{pid}/_history").json()
    assert history["total"] == 2
    revived = client.put(f"/fhir/Patient/{pid}", content=json.dumps({**created}), headers=FHIR)
    assert revived.status_code == 201
    assert revived.json()["meta"]["versionId"] == "3"


def test_delete_with_stale_if_match_changes_nothing(client, unique):
    pid = post(client, patient(unique)).json()["id"]
    response = client.delete(f"/fhir/Patient/{pid}", headers={"if-match": 'W/"5"'})
    assert response.status_code == 412
    assert client.get(f"/fhir/Patient/{pid}").status_code == 200


def test_prefer_return(client, unique):
    minimal = post(client, patient(unique), prefer="return=minimal")
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"]
    outcome = post(client, patient(unique + "x"), prefer="return=OperationOutcome")
    assert outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.json()["issue"][0]["severity"] == "information"


def test_json_patch(client, unique):
    pid = post(client, patient(unique)).json()["id"]
    ops = [
        {"op": "replace", "path": "/gender", "value": "male"},
        {"op": "add", "path": "/active", "value": True},
    ]
    response = client.patch(
        f"/fhir/Patient/{pid}",
        content=json.dumps(ops),
        headers={"content-type": "application/json-patch+json"},
    )
    assert response.status_code == 200
    assert response.json()["gender"] == "male" and response.json()["active"] is True
    assert response.json()["meta"]["versionId"] == "2"
    stale = client.patch(
        f"/fhir/Patient/{pid}",
        content=json.dumps(ops),
        headers={"content-type": "application/json-patch+json", "if-match": 'W/"1"'},
    )
    assert stale.status_code == 412
    bad = client.patch(
        f"/fhir/Patient/{pid}",
        content=json.dumps([{"op": "replace", "path": "/gender", "value": "robot"}]),
        headers={"content-type": "application/json-patch+json"},
    )
    assert bad.status_code == 400  # the patched resource fails validation: nothing stored
    assert client.get(f"/fhir/Patient/{pid}").json()["meta"]["versionId"] == "2"


def test_fhirpath_patch(client, unique):
    pid = post(client, patient(unique)).json()["id"]
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.gender"},
                    {"name": "value", "valueCode": "male"},
                ],
            }
        ],
    }
    response = client.patch(f"/fhir/Patient/{pid}", content=json.dumps(params), headers=FHIR)
    assert response.status_code == 200, response.text
    assert response.json()["gender"] == "male"


def test_conditional_create(client, unique):
    first = post(client, patient(unique), **{"if-none-exist": f"identifier=urn:test|{unique}"})
    assert first.status_code == 201
    second = post(client, patient(unique), **{"if-none-exist": f"identifier=urn:test|{unique}"})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    post(client, patient(unique))  # a duplicate made without the condition
    third = post(client, patient(unique), **{"if-none-exist": f"identifier=urn:test|{unique}"})
    assert third.status_code == 412


def test_conditional_update_and_delete(client, unique):
    body = patient(unique)
    created = client.put(
        f"/fhir/Patient?identifier=urn:test|{unique}", content=json.dumps(body), headers=FHIR
    )
    assert created.status_code == 201
    pid = created.json()["id"]
    updated = client.put(
        f"/fhir/Patient?identifier=urn:test|{unique}",
        content=json.dumps({**body, "gender": "male"}),
        headers=FHIR,
    )
    assert updated.status_code == 200
    assert updated.json()["id"] == pid and updated.json()["meta"]["versionId"] == "2"
    deleted = client.delete(f"/fhir/Patient?identifier=urn:test|{unique}")
    assert deleted.status_code == 200
    assert client.get(f"/fhir/Patient/{pid}").status_code == 410
    # No match any more: nothing to delete, still a success.
    assert client.delete(f"/fhir/Patient?identifier=urn:test|{unique}").status_code == 200


def test_conditional_delete_with_several_matches_is_refused(client, unique):
    post(client, patient(unique))
    post(client, patient(unique))
    response = client.delete(f"/fhir/Patient?identifier=urn:test|{unique}")
    assert response.status_code == 412


def test_conditional_without_criteria_or_with_unknown_parameter(client, unique):
    body = json.dumps(patient(unique))
    unknown = client.put("/fhir/Patient?no-such-param=1", content=body, headers=FHIR)
    assert unknown.status_code == 400


@pytest.mark.parametrize(
    ("method", "url", "content", "headers", "status", "code"),
    [
        ("GET", "/fhir/NotAType/1", None, {}, 404, "MSO-REST-001"),
        ("GET", "/fhir/Patient/does-not-exist", None, {}, 404, "MSO-REST-404"),
        ("POST", "/fhir/Patient", "{not json", FHIR, 400, "MSO-FHIR-001"),
        ("POST", "/fhir/Patient", "[]", FHIR, 400, "MSO-FHIR-002"),
        ("POST", "/fhir/Patient", '{"resourceType": "Observation"}', FHIR, 400, "MSO-REST-004"),
        ("POST", "/fhir/Patient", "", FHIR, 400, "MSO-REST-003"),
        (
            "POST",
            "/fhir/Patient",
            "<Patient/>",
            {"content-type": "application/fhir+xml"},
            415,
            "MSO-REST-415",
        ),
        ("GET", "/fhir/Patient/x?_format=xml", None, {}, 406, "MSO-REST-406"),
        ("POST", "/fhir/Patient/abc", "{}", FHIR, 405, "MSO-REST-405M"),
        ("GET", "/fhir/Patient/abc/_history/x/y", None, {}, 404, "MSO-REST-404P"),
        ("GET", "/fhir/Patient/$no-such-op", None, {}, 404, "MSO-OP-404"),
    ],
)
def test_errors_are_operation_outcomes(client, method, url, content, headers, status, code):
    response = client.request(method, url, content=content, headers=headers)
    assert response.status_code == status
    assert issue_code(response) == code


def test_invalid_resource_is_rejected_with_locations(client, unique):
    body = patient(unique, gender="robot", birthDate="yesterday", unknownThing=1)
    response = post(client, body)
    assert response.status_code == 400
    expressions = {e for issue in response.json()["issue"] for e in issue.get("expression", [])}
    assert {"Patient.gender", "Patient.birthDate"} <= expressions
    assert any("unknownThing" in e for e in expressions)


def test_body_over_limit_is_413(client):
    huge = json.dumps(
        {
            "resourceType": "Patient",
            "text": {"status": "generated", "div": "x" * (17 * 1024 * 1024)},
        }
    )
    response = client.post("/fhir/Patient", content=huge, headers=FHIR)
    assert response.status_code == 413
    assert issue_code(response) == "MSO-REST-413"


def test_pretty_and_format(client, unique):
    pid = post(client, patient(unique)).json()["id"]
    pretty = client.get(f"/fhir/Patient/{pid}?_pretty=true&_format=json")
    assert pretty.status_code == 200
    assert b"\n  " in pretty.content
    assert (
        client.get(f"/fhir/Patient/{pid}", headers={"accept": "application/json"}).status_code
        == 200
    )


def test_validate_operation(client, unique):
    ok = client.post("/fhir/Patient/$validate", content=json.dumps(patient(unique)), headers=FHIR)
    assert ok.status_code == 200
    assert ok.json()["issue"][0]["severity"] == "information"
    bad = client.post(
        "/fhir/Patient/$validate", content=json.dumps(patient(unique, gender="x")), headers=FHIR
    )
    assert bad.status_code == 400


def test_capability_statement_is_generated(client):
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    rest = statement["rest"][0]
    assert {i["code"] for i in rest["interaction"]} >= {"transaction", "batch", "history-system"}
    patient_entry = next(r for r in rest["resource"] if r["type"] == "Patient")
    codes = {i["code"] for i in patient_entry["interaction"]}
    assert codes >= {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "create",
        "history-instance",
        "history-type",
        "search-type",
    }
    assert any(op["name"] == "everything" for op in patient_entry["operation"])
    assert len(rest["resource"]) == 147


def test_read_with_summary_and_elements(client, unique):
    body = patient(
        unique,
        text={"status": "generated", "div": "<div xmlns='http://www.w3.org/1999/xhtml'>x</div>"},
    )
    pid = post(client, body).json()["id"]
    summary = client.get(f"/fhir/Patient/{pid}", params={"_summary": "true"}).json()
    assert "text" not in summary and summary["name"][0]["family"] == "Doe"
    assert any(tag["code"] == "SUBSETTED" for tag in summary["meta"]["tag"])
    elements = client.get(f"/fhir/Patient/{pid}", params={"_elements": "gender"}).json()
    assert elements["gender"] == "female" and "name" not in elements
    assert client.get(f"/fhir/Patient/{pid}", params={"_summary": "count"}).status_code == 400


def test_post_search_with_form_parameters(client, unique):
    post(client, patient(unique))
    form = {"content-type": "application/x-www-form-urlencoded"}
    found = client.post(
        "/fhir/Patient/_search", content=f"identifier=urn:test|{unique}", headers=form
    )
    assert found.status_code == 200
    assert len(found.json()["entry"]) == 1
    system = client.post(
        "/fhir/_search", content=f"_type=Patient&identifier=urn:test|{unique}", headers=form
    )
    assert system.status_code == 200
    assert len(system.json()["entry"]) == 1
    # A form body is not a resource: create refuses it rather than reading it as criteria.
    assert client.post("/fhir/Patient", content="gender=male", headers=form).status_code == 415
