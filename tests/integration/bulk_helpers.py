"""Helpers for the Bulk Data export tests: a real SMART Backend Services client and the
kick-off -> poll -> download round trip of the Bulk Data Access IG.

https://hl7.org/fhir/uv/bulkdata/STU3/export.html (kick-off, status, manifest, NDJSON files);
https://hl7.org/fhir/smart-app-launch/backend-services.html (the client's signed assertion).

Every function takes an ``httpx.Client`` (a Starlette ``TestClient`` in-process, a plain client
against a live server) and absolute or base-relative URLs, so the in-process and the live tests
share them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from joserfc import jwt
from joserfc.jwk import RSAKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
NDJSON = "application/fhir+ndjson"
SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")
ASYNC = {"Prefer": "respond-async"}


@dataclass(frozen=True)
class BackendClient:
    """A registered backend-services client and its private key."""

    client_id: str
    key: RSAKey
    token_url: str

    def assertion(self) -> str:
        """A fresh RS384 client assertion for the token endpoint (RFC 7523, SMART Backend
        Services "Authenticating to the token endpoint")."""
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": "RS384", "typ": "JWT", "kid": self.key.kid}
        return jwt.encode(header, claims, self.key, algorithms=["RS384"])

    def token(self, http: httpx.Client, scope: str = "system/*.rs") -> str:
        """An access token from the token endpoint (client_credentials grant)."""
        response = http.post(
            self.token_url,
            data={
                "grant_type": "client_credentials",
                "scope": scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(),
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_type"] == "Bearer"
        return body["access_token"]

    def headers(self, http: httpx.Client, scope: str = "system/*.rs") -> dict[str, str]:
        """``Authorization`` header with a new token for ``scope``."""
        return {"Authorization": f"Bearer {self.token(http, scope)}"}


def register_backend_client(
    clients: Any,
    token_url: str,
    *,
    client_id: str | None = None,
    scope: str = "system/*.rs",
    organization: str | None = None,
) -> BackendClient:
    """Register a backend client with an inline JWKS in ``clients`` (a
    :class:`fhir_server.auth.clients.ClientStore`), bound to ``organization`` when given."""
    client_id = client_id or f"bulk-{uuid.uuid4().hex[:12]}"
    key = RSAKey.generate_key(2048, parameters={"kid": "bulk-1", "alg": "RS384"}, private=True)
    clients.create(
        client_id=client_id,
        kind="backend",
        jwks={"keys": [key.as_dict(private=False)]},
        scope=scope,
        organization=organization,
    )
    return BackendClient(client_id, key, token_url)


def token_endpoint(http: httpx.Client, fhir_base: str) -> str:
    """The token endpoint the server's SMART discovery document names."""
    response = http.get(f"{fhir_base}/.well-known/smart-configuration")
    assert response.status_code == 200, response.text
    return response.json()["token_endpoint"]


# -- kick-off, status, download ---------------------------------------------------------------


def parameters(*pairs: tuple[str, str, Any]) -> dict[str, Any]:
    """A Parameters resource from ``(name, value[x] element, value)`` triples."""
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": name, kind: value} for name, kind, value in pairs],
    }


def kick_off(
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    *,
    params: Iterable[tuple[str, str]] | dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    prefer: str | None = "respond-async",
) -> httpx.Response:
    """GET (``body`` None) or POST (a Parameters ``body``) an ``$export`` kick-off."""
    sent = {**headers, "Accept": "application/fhir+json"}
    if prefer is not None:
        sent["Prefer"] = prefer
    if body is None:
        return http.get(url, params=params, headers=sent)
    sent["Content-Type"] = "application/fhir+json"
    return http.post(url, params=params, content=orjson.dumps(body), headers=sent)


def accepted(response: httpx.Response) -> str:
    """The status URL of a kick-off that was accepted (202 with ``Content-Location``)."""
    assert response.status_code == 202, response.text
    location = response.headers["content-location"]
    assert "/_bulk/" in location, location
    return location


def job_id_of(status_url: str) -> str:
    """The job id at the end of a status URL."""
    return status_url.rstrip("/").rsplit("/", 1)[1]


def wait_manifest(
    http: httpx.Client,
    status_url: str,
    headers: dict[str, str],
    *,
    run: Callable[[], object] | None = None,
    timeout: float = 60.0,
    on_progress: Callable[[httpx.Response], None] | None = None,
) -> dict[str, Any]:
    """Poll ``status_url`` until the manifest (200); ``run`` (e.g. ``app.state.bulk.run_pending``)
    is called before each poll. Every 202 on the way must carry ``X-Progress`` and
    ``Retry-After``."""
    deadline = time.monotonic() + timeout
    while True:
        if run is not None:
            run()
        response = http.get(status_url, headers={**headers, "Accept": "application/json"})
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("application/json") or 1, response
            return response.json()
        assert response.status_code == 202, response.text
        assert response.headers.get("x-progress"), response.headers
        assert int(response.headers["retry-after"]) >= 0
        if on_progress is not None:
            on_progress(response)
        assert time.monotonic() < deadline, f"export not done: {response.headers['x-progress']}"
        time.sleep(0.05 if run is not None else 0.2)


def ndjson(text: str) -> list[dict[str, Any]]:
    """The resources of an NDJSON body: every non-empty line must be one JSON object."""
    lines = text.split("\n")
    assert lines[-1] == "" or text == "", "an NDJSON file ends with a newline"
    out = []
    for line in lines[:-1]:
        parsed = orjson.loads(line)
        assert isinstance(parsed, dict), line[:200]
        out.append(parsed)
    return out


def download(http: httpx.Client, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The resources of one output file (200, ``application/fhir+ndjson``)."""
    response = http.get(url, headers={**headers})  # TEMP
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(NDJSON), response.headers
    return ndjson(response.text)


def check_manifest(manifest: dict[str, Any], *, request: str | None = None) -> None:
    """The manifest's shape (Bulk Data IG, "Response - Complete Status")."""
    assert manifest["requiresAccessToken"] is True
    assert isinstance(manifest["transactionTime"], str) and "T" in manifest["transactionTime"]
    assert isinstance(manifest["output"], list)
    assert isinstance(manifest.get("error", []), list)
    if request is not None:
        assert manifest["request"] == request, (manifest["request"], request)
    for item in manifest["output"]:
        assert set(item) >= {"type", "url", "count"}, item
        assert "/_bulk/" in item["url"], item


def exported(
    http: httpx.Client, manifest: dict[str, Any], headers: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Download every output file: resources by type. Each line has its file's type, each
    file holds as many lines as its ``count``."""
    check_manifest(manifest)
    out: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        resources = download(http, item["url"], headers)
        assert len(resources) == item["count"], (item, len(resources))
        assert all(r["resourceType"] == item["type"] for r in resources), item
        out.setdefault(item["type"], []).extend(resources)
    return out


def deleted_refs(http: httpx.Client, manifest: dict[str, Any], headers: dict[str, str]) -> set[str]:
    """``Type/id`` of the resources the manifest's ``deleted`` files name: Bundles whose
    entries are ``DELETE`` requests (Bulk Data IG, ``_since`` and deleted resources)."""
    refs: set[str] = set()
    for item in manifest.get("deleted", []):
        assert item["type"] == "Bundle", item
        bundles = download(http, item["url"], headers)
        assert len(bundles) == item["count"], item
        for bundle in bundles:
            assert bundle["resourceType"] == "Bundle"
            for entry in bundle.get("entry", ()):
                assert entry["request"]["method"] == "DELETE", entry
                refs.add(entry["request"]["url"])
    return refs


def ids_by_type(resources: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """Ids per type, in file order (duplicates kept: callers assert there are none)."""
    return {rtype: [r["id"] for r in items] for rtype, items in resources.items()}


# -- the same token's search -----------------------------------------------------------------


def search_all(
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    params: Iterable[tuple[str, str]] | dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every match of a search, following ``next`` links."""
    query: list[tuple[str, str]] = list(
        params.items() if isinstance(params, dict) else params or []
    )
    response = http.get(url, params=[*query, ("_count", "1000")], headers=headers)
    found: list[dict[str, Any]] = []
    while True:
        assert response.status_code == 200, response.text
        bundle = response.json()
        found += [
            e["resource"]
            for e in bundle.get("entry", ())
            if e.get("search", {}).get("mode", "match") == "match"
        ]
        following = next(
            (link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None
        )
        if following is None:
            return found
        response = http.get(following, headers=headers)


def search_count(
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    params: Iterable[tuple[str, str]] | dict[str, str] | None = None,
) -> int:
    """``total`` of the search with ``_summary=count``."""
    query: list[tuple[str, str]] = list(
        params.items() if isinstance(params, dict) else params or []
    )
    response = http.get(url, params=[*query, ("_summary", "count")], headers=headers)
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def outcome_code(response: httpx.Response) -> str | None:
    """The MSO error code of an OperationOutcome response (``issue.details.coding.code``)."""
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    for issue in body.get("issue", ()):
        for coding in (issue.get("details") or {}).get("coding", ()):
            if str(coding.get("code", "")).startswith("MSO-"):
                return coding["code"]
    return None
