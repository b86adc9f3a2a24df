"""Against a running ``mso serve`` with two workers, through a real HTTP client:
concurrent writers never lose an update, races have exactly one winner, and a failed
transaction leaves nothing behind."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.conftest import server_auth

FHIR = {"content-type": "application/fhir+json"}


def _client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={**FHIR, **server_auth(base)}, timeout=30)


def test_crud_round_trip(server, unique):
    with _client(server) as http:
        created = http.post(
            "/Patient", content=json.dumps({"resourceType": "Patient", "gender": "male"})
        )
        assert created.status_code == 201
        pid = created.json()["id"]
        assert created.headers["location"].startswith(server)
        assert http.get(f"/Patient/{pid}").json()["gender"] == "male"
        body = {**created.json(), "gender": "female"}
        assert http.put(f"/Patient/{pid}", content=json.dumps(body)).status_code == 200
        assert http.delete(f"/Patient/{pid}").status_code == 200
        assert http.get(f"/Patient/{pid}").status_code == 410
        assert http.get("/metadata").json()["fhirVersion"] == "4.0.1"


def test_concurrent_updates_lose_nothing(server, unique):
    with _client(server) as http:
        resource = http.post(
            "/Basic", content=json.dumps({"resourceType": "Basic", "code": {"text": "0"}})
        ).json()
    rid = resource["id"]
    writers, each = 8, 10

    def write(worker: int) -> list[int]:
        statuses = []
        with _client(server) as http:
            for i in range(each):
                body = {"resourceType": "Basic", "id": rid, "code": {"text": f"{worker}-{i}"}}
                statuses.append(http.put(f"/Basic/{rid}", content=json.dumps(body)).status_code)
        return statuses

    with ThreadPoolExecutor(writers) as pool:
        results = [s for statuses in pool.map(write, range(writers)) for s in statuses]
    assert results == [200] * (writers * each)
    with _client(server) as http:
        final = http.get(f"/Basic/{rid}").json()
        history = http.get(f"/Basic/{rid}/_history", params={"_count": 1000}).json()
    assert final["meta"]["versionId"] == str(1 + writers * each)
    assert history["total"] == 1 + writers * each
    texts = {e["resource"]["code"]["text"] for e in history["entry"]}
    assert texts == {"0"} | {f"{w}-{i}" for w in range(writers) for i in range(each)}


def test_if_match_race_has_one_winner(server, unique):
    with _client(server) as http:
        resource = http.post(
            "/Basic", content=json.dumps({"resourceType": "Basic", "code": {"text": "v1"}})
        ).json()
    rid = resource["id"]

    def write(worker: int) -> int:
        with _client(server) as http:
            body = {"resourceType": "Basic", "id": rid, "code": {"text": f"w{worker}"}}
            return http.put(
                f"/Basic/{rid}", content=json.dumps(body), headers={"if-match": 'W/"1"'}
            ).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(write, range(8)))
    assert statuses == [200] + [412] * 7


def test_concurrent_conditional_creates_make_one_resource(server, unique):
    def create(_: int) -> int:
        with _client(server) as http:
            body = {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:race", "value": unique}],
            }
            return http.post(
                "/Patient",
                content=json.dumps(body),
                headers={"if-none-exist": f"identifier=urn:race|{unique}"},
            ).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(create, range(8)))
    assert statuses == [200] * 7 + [201]
    with _client(server) as http:
        found = http.get("/Patient", params={"identifier": f"urn:race|{unique}"}).json()
    assert len(found.get("entry", [])) == 1


def test_concurrent_create_on_update_of_one_id(server, unique):
    rid = f"race-{unique[:16]}"

    def put(_: int) -> int:
        with _client(server) as http:
            body = {"resourceType": "Basic", "id": rid, "code": {"text": "x"}}
            return http.put(f"/Basic/{rid}", content=json.dumps(body)).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(put, range(6)))
    assert statuses == [200] * 5 + [201]


def test_failed_transaction_leaves_nothing(server, unique):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:rollback", "value": unique}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "DELETE", "url": "Patient/x"}, "resource": None},
            {
                "resource": {"resourceType": "Patient", "birthDate": "not-a-date"},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    with _client(server) as http:
        response = http.post("", content=json.dumps(bundle))
        assert response.status_code == 400
        found = http.get("/Patient", params={"identifier": f"urn:rollback|{unique}"}).json()
    assert found.get("entry", []) == []
