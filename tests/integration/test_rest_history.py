"""_history at instance, type and system level: order, _since, _at, _count and stable paging."""

from __future__ import annotations

import json
import time

FHIR = {"content-type": "application/fhir+json"}


def _create(client, unique: str) -> dict:
    body = {"resourceType": "Basic", "code": {"text": unique}}
    return client.post("/fhir/Basic", content=json.dumps(body), headers=FHIR).json()


def _update(client, resource: dict, text: str) -> dict:
    body = {**resource, "code": {"text": text}}
    return client.put(
        f"/fhir/Basic/{resource['id']}", content=json.dumps(body), headers=FHIR
    ).json()


def _follow(client, url: str) -> dict:
    return client.get(url.replace("http://testserver", "")).json()


def test_instance_history_lists_every_version_newest_first(client, unique):
    resource = _create(client, unique)
    _update(client, resource, "two")
    _update(client, resource, "three")
    client.delete(f"/fhir/Basic/{resource['id']}")
    bundle = client.get(f"/fhir/Basic/{resource['id']}/_history").json()
    assert bundle["type"] == "history"
    assert bundle["total"] == 4
    statuses = [e["response"]["status"] for e in bundle["entry"]]
    assert statuses == ["204 No Content", "200 OK", "200 OK", "201 Created"]
    assert [e["request"]["method"] for e in bundle["entry"]] == ["DELETE", "PUT", "PUT", "POST"]
    assert "resource" not in bundle["entry"][0]
    assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"][1:]] == ["3", "2", "1"]


def test_history_of_unknown_resource_is_404(client):
    assert client.get("/fhir/Basic/never-was/_history").status_code == 404


def test_since_and_at(client, unique):
    resource = _create(client, unique)
    time.sleep(0.01)
    middle = _update(client, resource, "two")
    time.sleep(0.01)
    _update(client, resource, "three")
    since = client.get(
        f"/fhir/Basic/{resource['id']}/_history", params={"_since": middle["meta"]["lastUpdated"]}
    ).json()
    assert [e["resource"]["meta"]["versionId"] for e in since["entry"]] == ["3", "2"]
    at = client.get(
        f"/fhir/Basic/{resource['id']}/_history", params={"_at": middle["meta"]["lastUpdated"]}
    ).json()
    assert [e["resource"]["meta"]["versionId"] for e in at["entry"]] == ["2"]
    bad = client.get(f"/fhir/Basic/{resource['id']}/_history", params={"_since": "not-a-date"})
    assert bad.status_code == 400


def test_type_history_paging_is_stable_while_data_changes(client, unique):
    resources = [_create(client, f"{unique}-{i}") for i in range(7)]
    start = resources[0]["meta"]["lastUpdated"]
    page = client.get("/fhir/Basic/_history", params={"_since": start, "_count": 3}).json()
    seen = [e["resource"]["id"] for e in page["entry"]]
    # Writes made while paging do not appear in, shift, or duplicate later pages.
    _create(client, f"{unique}-late")
    while next_link := [link["url"] for link in page["link"] if link["relation"] == "next"]:
        page = _follow(client, next_link[0])
        seen.extend(e["resource"]["id"] for e in page["entry"])
    assert sorted(seen) == sorted(r["id"] for r in resources)
    assert len(seen) == len(set(seen))


def test_system_history_and_count_limits(client, unique):
    _create(client, unique)
    bundle = client.get("/fhir/_history", params={"_count": 2}).json()
    assert len(bundle["entry"]) == 2
    assert any(link["relation"] == "next" for link in bundle["link"])
    assert client.get("/fhir/_history", params={"_count": "x"}).status_code == 400
    assert client.get("/fhir/_history", params={"_cursor": "garbage"}).status_code == 400
