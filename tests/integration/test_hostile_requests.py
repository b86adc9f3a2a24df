"""Hostile requests answer 4xx OperationOutcomes with stable codes, never a 500 (issue 21,
"Seven kinds of request that answer 500"): a NUL byte in an id or a search value, a version
beyond the column's range, forged paging cursors, malformed Parameters bodies, a FHIRPath
Patch part named by an object, a NUL in a JSON body, and a client gone mid-upload."""

from __future__ import annotations

import asyncio
import base64
import logging

import orjson
import pytest

from tests.conftest import authorized, make_settings

FHIR = {"content-type": "application/fhir+json"}


def issue_code(response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["details"]["coding"][0]["code"]


def refused(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert issue_code(response) == code


def next_link(bundle: dict) -> str | None:
    link = next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)
    return link.replace("http://testserver", "") if link else None


def forged(data: object) -> str:
    """A cursor as the server made them before they were signed: base64url of JSON."""
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


@pytest.fixture
def tagged(client, unique) -> str:
    """Three Patients under a tag of their own; the tag."""
    for n in range(3):
        body = {"resourceType": "Patient", "meta": {"tag": [{"code": unique}]}, "active": True}
        body["name"] = [{"family": f"hostile{n}"}]
        assert client.post("/fhir/Patient", json=body, headers=FHIR).status_code == 201
    return unique


# -- ids and versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/fhir/Patient/%00"),
        ("DELETE", "/fhir/Patient/%00"),
        ("GET", "/fhir/Patient/%00/_history"),
        ("GET", "/fhir/Patient/%00/_history/1"),
        ("GET", "/fhir/Patient/a%00b/$everything"),
        ("GET", "/fhir/Patient/" + "x" * 65),
    ],
)
def test_an_id_that_is_no_fhir_id_is_a_400(client, method, url) -> None:
    refused(client.request(method, url), 400, "MSO-REST-002")


@pytest.mark.parametrize("version", ["2147483648", "99999999999999999999", "\u00b2"])
def test_a_version_beyond_the_column_is_unknown(client, version) -> None:
    created = client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    refused(client.get(f"{created.headers['location'].split('/_history')[0]}/_history/{version}"),
            404, "MSO-REST-405")  # fmt: skip


def test_a_non_ascii_count_is_a_400(client) -> None:
    refused(client.get("/fhir/Patient/_history", params={"_count": "\u00b2"}), 400, "MSO-REST-011")
    assert client.get("/fhir/Patient", params={"_count": "\u00b2"}).status_code == 200


# -- NUL bytes in search values and bodies ----------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{"name": "\x00"}, {"subject": "Patient/\x00"}, {"_id": "\x00"}, {"name\x00": "x"}],
)
def test_a_nul_in_a_search_is_a_400_even_when_lenient(client, tagged, params) -> None:
    response = client.get("/fhir/Patient", params={"_tag": tagged, **params})
    refused(response, 400, "MSO-SEARCH-002")


def test_a_nul_in_a_posted_search_is_a_400(client, tagged) -> None:
    response = client.post(
        "/fhir/Patient/_search",
        content=f"_tag={tagged}&name=%00",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    refused(response, 400, "MSO-SEARCH-002")


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Patient", "name": [{"family": "a\x00b"}]},
        {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {
            "method": "POST", "url": "Patient"}, "resource": {
            "resourceType": "Patient", "id": "x\x00"}}]},
    ],
)  # fmt: skip
def test_a_nul_in_a_json_body_is_a_400(client, body) -> None:
    url = "/fhir" if body["resourceType"] == "Bundle" else "/fhir/Patient"
    refused(client.post(url, content=orjson.dumps(body), headers=FHIR), 400, "MSO-REST-014")


def test_an_escaped_backslash_before_u0000_is_no_nul(client) -> None:
    body = {"resourceType": "Patient", "name": [{"family": "back\\u0000slash"}]}
    response = client.post("/fhir/Patient", content=orjson.dumps(body), headers=FHIR)
    assert response.status_code == 201, response.text
    assert response.json()["name"][0]["family"] == "back\\u0000slash"


# -- signed cursors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"k": [None], "p": 1, "b": False, "m": 10, "t": None},
        {"k": [[1]], "p": 1, "b": False, "m": 10, "t": None},
        {"k": ["x"], "p": 1, "b": False, "m": 10, "t": None},
        {"k": [], "p": 1, "b": False, "m": 10, "t": "zz"},
        [1, 2],
    ],
)
def test_a_forged_search_cursor_is_a_400(client, tagged, data) -> None:
    response = client.get("/fhir/Patient", params={"_tag": tagged, "_cursor": forged(data)})
    refused(response, 400, "MSO-SEARCH-005")


def _first_cursor(client, url: str) -> str:
    link = next_link(client.get(url).json())
    assert link is not None
    return link.split("_cursor=")[1].split("&")[0]


def test_a_tampered_or_truncated_cursor_is_a_400(client, tagged) -> None:
    token = _first_cursor(client, f"/fhir/Patient?_tag={tagged}&_count=1")
    payload, mac = token.split(".")
    data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["t"] = "zz"
    for bad in (f"{forged(data)}.{mac}", token[:-2], payload, f"{payload}.", token + "A"):
        response = client.get("/fhir/Patient", params={"_tag": tagged, "_cursor": bad})
        refused(response, 400, "MSO-SEARCH-005")


def test_a_history_cursor_is_no_search_cursor(client, tagged) -> None:
    token = _first_cursor(client, "/fhir/Patient/_history?_count=1")
    response = client.get("/fhir/Patient", params={"_tag": tagged, "_cursor": token})
    refused(response, 400, "MSO-SEARCH-005")
    search_token = _first_cursor(client, f"/fhir/Patient?_tag={tagged}&_count=1")
    response = client.get("/fhir/Patient/_history", params={"_cursor": search_token})
    refused(response, 400, "MSO-REST-012")


@pytest.mark.parametrize(
    "token",
    [
        forged(["2020-01-01T00:00:00+00:00", "x", 1, "2020-01-01T00:00:00+00:00"]),
        forged(["2020-01-01T00:00:00+00:00", 9223372036854775807, 1, "2020-01-01"]),
    ],
)
def test_a_forged_history_cursor_is_a_400(client, token) -> None:
    refused(client.get("/fhir/_history", params={"_cursor": token}), 400, "MSO-REST-012")


@pytest.mark.parametrize("token", ["99999999999999999999999", "12", forged(12)])
def test_a_forged_audit_event_cursor_is_a_400(client, token) -> None:
    refused(client.get("/fhir/AuditEvent", params={"_cursor": token}), 400, "MSO-SEARCH-005")


def test_audit_events_page_with_signed_cursors(app, client, tagged) -> None:
    for _ in range(2):  # at least two events in the trail, stored
        client.get("/fhir/Patient", params={"_count": "1"})
    app.state.audit.flush()
    link = next_link(client.get("/fhir/AuditEvent?_count=1").json())
    assert link is not None and "." in link.split("_cursor=")[1]
    page = client.get(link)
    assert page.status_code == 200 and len(page.json()["entry"]) == 1


def test_cursors_are_shared_by_every_worker(client, tagged, tmp_path) -> None:
    """A cursor one process made pages on in another: the key lives in the database."""
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app

    settings = client.app.state.settings
    other = create_app(make_settings(settings.database_url, tmp_path))
    headers = authorized(settings.database_url)
    seen = [
        e["resource"]["id"]
        for e in client.get(f"/fhir/Patient?_tag={tagged}&_count=1&_sort=_id").json()["entry"]
    ]
    link = next_link(client.get(f"/fhir/Patient?_tag={tagged}&_count=1&_sort=_id").json())
    with TestClient(other, base_url="http://testserver", headers=headers) as second:
        while link:
            page = second.get(link)
            assert page.status_code == 200, page.text
            seen.extend(e["resource"]["id"] for e in page.json().get("entry", []))
            link = next_link(page.json())
    assert len(seen) == 3 == len(set(seen))


# -- operations and FHIRPath Patch ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parameters"),
    [
        ("/fhir/Task/x/$answer", [1]),
        ("/fhir/$mso-stats", ["x"]),
        ("/fhir/$mso-stats", "x"),
        ("/fhir/$mso-stats", [{"name": {"a": 1}}]),
        ("/fhir/$mso-stats", [{"name": "start", "valueDate": {"a": 1}}]),
        ("/fhir/$mso-stats", [{"name": "start", "part": [{"valueString": "x"}]}]),
        ("/fhir/Account/x/$record-payment", [{"name": "amount", "valueMoney": 5}]),
        ("/fhir/Patient/$validate", [{"name": "resource", "resource": 1}]),
    ],
)
def test_a_malformed_parameters_body_is_a_400(client, url, parameters) -> None:
    body = {"resourceType": "Parameters", "parameter": parameters}
    refused(client.post(url, json=body, headers=FHIR), 400, "MSO-OP-004")


def test_a_fhirpath_patch_part_named_by_an_object_is_a_400(client) -> None:
    created = client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    patch = {
        "resourceType": "Parameters",
        "parameter": [{"name": "operation", "part": [{"name": {"a": 1}, "valueCode": "add"}]}],
    }
    response = client.patch(f"/fhir/Patient/{created.json()['id']}", json=patch, headers=FHIR)
    refused(response, 400, "MSO-PATCH-011")


# -- a client gone mid-upload -----------------------------------------------------------------


def _upload_then_vanish(app, path: str, content_type: str) -> list[dict]:
    """Send part of a body to ``app`` at ``path``, then disconnect; the messages sent back."""
    headers = authorized(app.state.settings.database_url)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 1),
        "headers": [
            (b"host", b"testserver"), (b"content-type", content_type.encode()),
            (b"content-length", b"1000000"),
            (b"authorization", headers["Authorization"].encode()),
        ],
    }  # fmt: skip
    incoming = [
        {"type": "http.request", "body": b"{" + b" " * 65536, "more_body": True},
        {"type": "http.request", "body": b" " * 65536, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/fhir/Binary", "application/pdf"), ("/fhir/Patient", "application/fhir+json")],
)
def test_a_client_gone_mid_upload_is_no_error(client, caplog, path, content_type) -> None:
    app = client.app
    blobs = app.state.blobs.root
    before = client.get("/fhir/Binary", params={"_summary": "count"}).json()["total"]
    with caplog.at_level(logging.INFO):
        sent = _upload_then_vanish(app, path, content_type)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(r.exc_info for r in caplog.records)
    assert any("disconnected" in r.getMessage() for r in caplog.records)
    assert sent[0]["status"] == 400
    assert list(blobs.rglob(".upload-*")) == []
    after = client.get("/fhir/Binary", params={"_summary": "count"}).json()["total"]
    assert after == before


@pytest.mark.parametrize(
    "path",
    ["Patient/%00/Observation", "Patient/%00/$everything", "Patient/%00/_history", "Patient/%00"],
)
def test_an_id_that_is_not_a_fhir_id_is_refused_by_every_route(client, path: str) -> None:
    """The route table checks the ``{id}`` segment once, for every route that has one."""
    response = client.get(f"/fhir/{path}")
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-REST-002"


def test_a_request_no_route_serves_is_audited_with_its_sender(app, client) -> None:
    """Refused before it became an interaction (an id that is not an id, a path no route has),
    the request is still in the trail, under the user whose token it carried."""
    import uuid

    from fastapi.testclient import TestClient

    from tests.auth_helpers import token_for

    user = f"prober-{uuid.uuid4().hex[:8]}"
    token = token_for(app, role="admin", username=user)
    prober = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    assert prober.get("/fhir/Patient/%00").status_code == 400
    assert prober.get("/fhir/Patient/x/y/z/w/v").status_code == 404
    app.state.audit.flush()
    found = client.get("/fhir/AuditEvent", params={"altid": user}).json()
    outcomes = sorted(e["resource"]["outcome"] for e in found.get("entry", ()))
    assert outcomes == ["4", "4"], found
