"""Binary: raw upload and download, blob streaming, size limits, FHIR JSON form."""

from __future__ import annotations

import base64
import hashlib
import json

FHIR = {"content-type": "application/fhir+json"}


def test_raw_upload_and_download(client, app):
    payload = bytes(range(256)) * 4096  # 1 MiB, above the inline threshold
    created = client.post(
        "/fhir/Binary", content=payload, headers={"content-type": "application/pdf"}
    )
    assert created.status_code == 201
    resource = created.json()
    assert resource["contentType"] == "application/pdf"
    assert "data" not in resource
    raw = client.get(f"/fhir/Binary/{resource['id']}", headers={"accept": "application/pdf"})
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/pdf"
    assert raw.content == payload
    as_json = client.get(
        f"/fhir/Binary/{resource['id']}", headers={"accept": "application/fhir+json"}
    )
    assert as_json.status_code == 200
    assert base64.b64decode(as_json.json()["data"]) == payload
    digest = hashlib.sha256(payload).hexdigest()
    assert app.state.blobs.path_of(digest).exists()


def test_raw_update_makes_a_new_version(client):
    created = client.post(
        "/fhir/Binary", content=b"one", headers={"content-type": "text/plain"}
    ).json()
    updated = client.put(
        f"/fhir/Binary/{created['id']}", content=b"two", headers={"content-type": "text/plain"}
    )
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] == "2"
    assert (
        client.get(f"/fhir/Binary/{created['id']}", headers={"accept": "text/plain"}).content
        == b"two"
    )
    old = client.get(f"/fhir/Binary/{created['id']}/_history/1", headers={"accept": "text/plain"})
    assert old.content == b"one"


def test_fhir_json_binary_with_inline_data(client):
    body = {
        "resourceType": "Binary",
        "contentType": "text/plain",
        "data": base64.b64encode(b"hello").decode(),
    }
    created = client.post("/fhir/Binary", content=json.dumps(body), headers=FHIR).json()
    raw = client.get(f"/fhir/Binary/{created['id']}", headers={"accept": "text/plain"})
    assert raw.content == b"hello"
    assert raw.headers["content-type"].startswith("text/plain")


def test_upload_over_limit_is_413_and_leaves_nothing(tmp_path, db_url):
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from tests.conftest import authorized, make_settings

    app = create_app(make_settings(db_url, tmp_path, max_binary_bytes=1000))
    with TestClient(app, headers=authorized(db_url)) as small:
        response = small.post(
            "/fhir/Binary", content=b"x" * 5000, headers={"content-type": "image/png"}
        )
        assert response.status_code == 413
        # Without a Content-Length (chunked), the limit is enforced while streaming.
        chunked = small.post(
            "/fhir/Binary",
            content=iter([b"x" * 600, b"y" * 600]),
            headers={"content-type": "image/png"},
        )
        assert chunked.status_code == 413
        blob_root = app.state.blobs.root
        leftovers = [p for p in blob_root.rglob("*") if p.is_file()] if blob_root.exists() else []
        assert leftovers == []
