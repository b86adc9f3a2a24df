"""The gateway's FHIR client behind a proxy (a public name inside the server's answers, another
name inside the platform's network), and its signing key: no sockets, an httpx mock transport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import RSAKey

from dicom_gateway.fhir_client import FhirClient, load_key
from dicom_gateway.keygen import ensure_key

PUBLIC = "https://mso.example.org"
INTERNAL = "http://server:8080/fhir"


def _server(seen: list[httpx.Request]) -> httpx.MockTransport:
    """A server that names itself by its public URL everywhere."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.endswith("/.well-known/smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": f"{PUBLIC}/auth/token"})
        if path == "/auth/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 300})
        page = request.url.params.get("page")
        entry = [{"resource": {"resourceType": "Patient", "id": page or "1"}}]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "entry": entry}
        if page is None:
            bundle["link"] = [{"relation": "next", "url": f"{PUBLIC}/fhir/Patient?page=2"}]
        return httpx.Response(200, json=bundle)

    return httpx.MockTransport(answer)


def test_every_request_goes_to_the_configured_origin_and_aud_stays_public(
    tmp_path: Path,
) -> None:
    ensure_key(tmp_path / "key.json", tmp_path / "public.json")
    seen: list[httpx.Request] = []
    client = FhirClient(
        INTERNAL,
        client_id="dicom-gateway",
        private_key=load_key(tmp_path / "key.json"),
        scope="system/Patient.rs",
        http=httpx.Client(transport=_server(seen)),
    )
    found = client.search("Patient", [("name", "x")])
    assert [p["id"] for p in found] == ["1", "2"]
    assert {(r.url.scheme, r.url.host, r.url.port) for r in seen} == {("http", "server", 8080)}
    token_request = next(r for r in seen if r.url.path == "/auth/token")
    form = dict(httpx.QueryParams(token_request.content.decode()))
    public_key = RSAKey.import_key(json.loads((tmp_path / "public.json").read_text())["keys"][0])
    claims = jwt.decode(form["client_assertion"], public_key, algorithms=["RS384"]).claims
    assert claims["aud"] == f"{PUBLIC}/auth/token"
    assert seen[-1].url.params["page"] == "2" and seen[-1].headers["authorization"] == "Bearer t"


def test_the_key_is_created_once_and_only_its_public_half_is_published(tmp_path: Path) -> None:
    private, public = tmp_path / "keys" / "gateway.jwk", tmp_path / "keys" / "gateway.jwks"
    assert ensure_key(private, public) is True
    first = private.read_text()
    assert private.stat().st_mode & 0o777 == 0o600
    assert ensure_key(private, public) is False
    assert private.read_text() == first
    (published,) = json.loads(public.read_text())["keys"]
    assert published["kty"] == "RSA" and published["alg"] == "RS384" and published["kid"]
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(published)
