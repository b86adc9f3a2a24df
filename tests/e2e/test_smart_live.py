"""SMART against a live ``mso serve`` (two workers): the SMART ``fhirclient`` library runs a
standalone launch through the login pages and reads the chosen Patient with its token; a
backend-services client signs its own assertion; keys are shared by the workers."""

from __future__ import annotations

import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from urllib.parse import urlencode

import httpx
import orjson
import pytest
from fhirclient import client as smart_client
from fhirclient.models.patient import Patient
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from fhir_server.config import Settings
from tests.auth_helpers import auth_server, complete_authorization, token_for
from tests.e2e.conftest import start_server

REDIRECT = "http://localhost:9/callback"
PASSWORD = "correct horse battery"


def root_of(base: str) -> str:
    return base.removesuffix("/fhir")


@pytest.fixture
def auth(db_url):
    return auth_server(Settings(database_url=db_url))


def create_patient(db_url: str, base: str, family: str) -> str:
    token = token_for(
        Settings(database_url=db_url), role="system", scopes="system/*.cruds", audience=base
    )
    response = httpx.post(
        f"{base}/Patient",
        json={"resourceType": "Patient", "name": [{"family": family, "given": ["Eve"]}]},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_fhirclient_standalone_launch_reads_the_patient(server, db_url, auth):
    suffix = uuid.uuid4().hex[:8]
    username, client_id = f"live-{suffix}", f"fhirclient-{suffix}"
    auth.users.create(
        username=username, password=PASSWORD, role="admin", fhir_user=f"Practitioner/pr-{suffix}"
    )
    auth.clients.create(client_id=client_id, kind="public", redirect_uris=[REDIRECT])
    patient_id = create_patient(db_url, server, f"Live{suffix}")

    # fhirclient finds the OAuth endpoints itself, in the CapabilityStatement's security element
    smart = smart_client.FHIRClient(
        settings={
            "app_id": client_id,
            "api_base": server,
            "redirect_uri": REDIRECT,
            "scope": "openid fhirUser patient/*.rs",
        }
    )
    authorize_url = smart.authorize_url
    assert "launch%2Fpatient" in authorize_url  # fhirclient asks for a patient itself
    config = config_of(server)
    assert config["issuer"] == root_of(server)
    assert smart.server.auth.auth_type == "oauth2"
    assert authorize_url.startswith(f"{config['authorization_endpoint']}?")

    with httpx.Client(base_url=root_of(server), follow_redirects=False) as browser:
        query = complete_authorization(
            browser,
            browser.get(authorize_url),
            username=username,
            password=PASSWORD,
            patient=patient_id,
        )
    smart.handle_callback(f"{REDIRECT}?{urlencode(query)}")
    assert smart.patient_id == patient_id
    assert smart.ready
    assert smart.launch_context["need_patient_banner"] is True

    patient = Patient.read(patient_id, smart.server)
    assert patient.name[0].family == f"Live{suffix}"

    # the ID token verifies against the live JWKS
    keys = KeySet.import_key_set(httpx.get(config["jwks_uri"]).json())
    claims = jwt.decode(smart.launch_context["id_token"], keys, algorithms=["RS256"]).claims
    assert claims["fhirUser"] == f"{server}/Practitioner/pr-{suffix}"
    assert claims["iss"] == config["issuer"]


def test_revoked_and_expired_tokens_are_refused_live(server, db_url, auth):
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(database_url=db_url)
    patient_id = create_patient(db_url, server, f"Rev{suffix}")
    client_id = f"rs-{suffix}"
    _, secret = auth.clients.create(
        client_id=client_id, kind="confidential", redirect_uris=[REDIRECT]
    )
    token = token_for(settings, role="admin", client_id=client_id, audience=server)
    url = f"{server}/Patient/{patient_id}"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    revoked = httpx.post(
        config_of(server)["revocation_endpoint"], data={"token": token}, auth=(client_id, secret)
    )
    assert revoked.status_code == 200
    refused = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    expired = token_for(settings, role="admin", audience=server, lifetime=-60)
    assert httpx.get(url, headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    elsewhere = token_for(settings, role="admin", audience="https://other.example.org/fhir")
    assert httpx.get(url, headers={"Authorization": f"Bearer {elsewhere}"}).status_code == 401


def config_of(base: str) -> dict:
    return httpx.get(f"{base}/.well-known/smart-configuration").json()


class _Jwks:
    """Serves one JWKS on a loopback port (the backend client's ``jwks_url``)."""

    def __init__(self, jwks: dict) -> None:
        body = orjson.dumps(jwks)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_backend_services_client_live(server, db_url, auth):
    suffix = uuid.uuid4().hex[:8]
    patient_id = create_patient(db_url, server, f"Bulk{suffix}")
    key = RSAKey.generate_key(2048, parameters={"kid": f"k-{suffix}", "alg": "RS384"}, private=True)
    jwks = _Jwks({"keys": [key.as_dict(private=False)]})
    try:
        client_id = f"backend-{suffix}"
        auth.clients.create(
            client_id=client_id, kind="backend", jwks_url=jwks.url, scope="system/*.rs"
        )
        config = config_of(server)

        def assertion() -> str:
            now = int(time.time())
            claims = {
                "iss": client_id,
                "sub": client_id,
                "aud": config["token_endpoint"],
                "exp": now + 120,
                "jti": uuid.uuid4().hex,
            }
            header = {"alg": "RS384", "typ": "JWT", "kid": key.kid}
            return jwt.encode(header, claims, key, algorithms=["RS384"])

        form = {
            "grant_type": "client_credentials",
            "scope": "system/Patient.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        }
        signed = assertion()
        response = httpx.post(config["token_endpoint"], data={**form, "client_assertion": signed})
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        read = httpx.get(
            f"{server}/Patient/{patient_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert read.status_code == 200
        # the same assertion again, possibly to the other worker: the jti is known everywhere
        replay = httpx.post(config["token_endpoint"], data={**form, "client_assertion": signed})
        assert replay.status_code == 401
        assert replay.json()["error"] == "invalid_client"
    finally:
        jwks.close()


def test_workers_share_one_signing_key_created_on_first_use(fresh_db_url, tmp_path):
    """Two fresh workers race to create the first key; both publish and sign with the same."""
    proc, base = start_server(fresh_db_url, tmp_path, workers=2)
    try:
        root = root_of(base)
        # a new connection each time, so the kernel spreads them over both workers
        kid_sets = {
            frozenset(k["kid"] for k in httpx.get(f"{root}/auth/jwks").json()["keys"])
            for _ in range(20)
        }
        assert len(kid_sets) == 1
        assert len(next(iter(kid_sets))) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=15)
