"""SMART Backend Services: client_credentials with a client assertion signed by the client's own
key (RS384 with joserfc, ES384 with bare ``cryptography``), keys inline or at a JWKS URL."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_server.auth.principal import Role

TOKEN_URL = "http://testserver/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign_es384(claims: dict, private: ec.EllipticCurvePrivateKey, kid: str) -> str:
    """A compact ES384 JWS made with cryptography alone (raw r||s signature, RFC 7518 3.4)."""
    header = b64url(orjson.dumps({"alg": "ES384", "typ": "JWT", "kid": kid}))
    payload = b64url(orjson.dumps(claims))
    der = private.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return f"{header}.{payload}.{b64url(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"


def encode(header: dict, claims: dict, key) -> str:
    """Sign with exactly the header's algorithm (joserfc only signs "recommended" ones unasked)."""
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def claims_for(client_id: str, **overrides) -> dict:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


@pytest.fixture
def rsa_client(auth, unique):
    """A backend client with an inline RSA JWKS; returns (client_id, private key)."""
    client_id = f"bulk-{unique[:8]}"
    key = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS384"}, private=True)
    auth.clients.create(
        client_id=client_id,
        kind="backend",
        jwks={"keys": [key.as_dict(private=False)]},
        scope="system/*.rs system/Observation.cruds",
        organization=f"org-{unique[:6]}",
    )
    return client_id, key


def rs384(client_id: str, key: RSAKey, **overrides) -> str:
    return encode(
        {"alg": "RS384", "typ": "JWT", "kid": key.kid}, claims_for(client_id, **overrides), key
    )


def backend_token(http, assertion: str, scope: str = "system/*.rs", **extra):
    return http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
            **extra,
        },
    )


def test_rs384_assertion_gets_a_system_token(app, http, rsa_client, unique):
    client_id, key = rsa_client
    response = backend_token(http, rs384(client_id, key), scope="system/*.rs system/Patient.cud")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "system/*.rs"  # Patient.cud is not allowed for this client
    assert "refresh_token" not in body and "id_token" not in body
    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert principal.role is Role.SYSTEM
    assert principal.subject == client_id
    assert principal.organization == f"org-{unique[:6]}"


def test_es384_assertion_signed_with_cryptography_and_a_jwks_url(app, http, auth, unique):
    private = ec.generate_private_key(ec.SECP384R1())
    public_jwk = ECKey.import_key(private.public_key()).as_dict(private=False)
    public_jwk |= {"kid": "ec-1", "alg": "ES384"}
    jwks = orjson.dumps({"keys": [public_jwk]})

    class JwksHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args) -> None:
            pass

    with serving(JwksHandler) as url:
        client_id = f"ec-{unique[:8]}"
        auth.clients.create(client_id=client_id, kind="backend", jwks_url=url)
        assertion = sign_es384(claims_for(client_id), private, "ec-1")
        response = backend_token(http, assertion, scope="system/Patient.rs")
    assert response.status_code == 200, response.text
    principal = app.state.tokens.authenticate(f"Bearer {response.json()['access_token']}")
    assert principal.scopes.grants("Patient", "s")


class serving:
    """Serve ``handler`` on a loopback port for the duration of a ``with`` block."""

    def __init__(self, handler) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_replayed_jti_is_refused(http, rsa_client):
    client_id, key = rsa_client
    assertion = rs384(client_id, key)
    assert backend_token(http, assertion).status_code == 200
    replay = backend_token(http, assertion)
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    assert "jti" in replay.json()["error_description"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"exp": int(time.time()) + 3600}, "five minutes"),
        ({"exp": int(time.time()) - 60}, "expired"),
        ({"exp": None}, "exp"),
        ({"aud": "http://testserver/auth/other"}, "aud"),
        ({"jti": None}, "jti"),
        ({"sub": "somebody-else"}, "iss and sub"),
    ],
)
def test_bad_assertion_claims_are_invalid_client(http, rsa_client, overrides, fragment):
    client_id, key = rsa_client
    claims = {k: v for k, v in claims_for(client_id, **overrides).items() if v is not None}
    assertion = encode({"alg": "RS384", "typ": "JWT", "kid": key.kid}, claims, key)
    response = backend_token(http, assertion)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert fragment in response.json()["error_description"]


def test_assertion_signed_by_another_key_or_alg_is_refused(http, rsa_client):
    client_id, key = rsa_client
    stranger = RSAKey.generate_key(2048, parameters={"kid": key.kid}, private=True)
    forged = encode({"alg": "RS384", "typ": "JWT", "kid": key.kid}, claims_for(client_id), stranger)
    assert backend_token(http, forged).json()["error"] == "invalid_client"
    any_alg = RSAKey.import_key({k: v for k, v in key.as_dict(private=True).items() if k != "alg"})
    rs256 = encode({"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims_for(client_id), any_alg)
    response = backend_token(http, rs256)
    assert response.status_code == 401
    assert "RS384 or ES384" in response.json()["error_description"]
    no_kid = encode({"alg": "RS384", "typ": "JWT"}, claims_for(client_id), key)
    assert backend_token(http, no_kid).status_code == 401


def test_non_loopback_jwks_url_is_not_fetched(http, auth, unique):
    client_id = f"remote-{unique[:8]}"
    auth.clients.create(client_id=client_id, kind="backend", jwks_url="https://example.org/jwks")
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    response = backend_token(http, rs384(client_id, key))
    assert response.status_code == 401
    assert "not allowed" in response.json()["error_description"]


def test_scope_and_grant_rules(http, rsa_client, auth, unique):
    client_id, key = rsa_client
    nothing = backend_token(http, rs384(client_id, key), scope="system/Patient.d")
    assert nothing.json()["error"] == "invalid_scope"
    user_scopes = backend_token(http, rs384(client_id, key), scope="user/*.rs")
    assert user_scopes.json()["error"] == "invalid_scope"
    bad = backend_token(http, rs384(client_id, key), scope="system/Nope.rs")
    assert bad.json()["error"] == "invalid_scope"
    wrong_type = http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": "urn:other",
            "client_assertion": rs384(client_id, key),
        },
    )
    assert wrong_type.status_code == 401
    # a backend client cannot run the authorization code flow
    code = backend_token(
        http, rs384(client_id, key), scope="system/*.rs", grant_type="authorization_code"
    )
    assert code.status_code == 400


def test_confidential_asymmetric_client_authenticates_with_private_key_jwt(
    http, auth, rsa_client, unique
):
    """``client-confidential-asymmetric``: introspection with a signed assertion."""
    client_id, key = rsa_client
    token = backend_token(http, rs384(client_id, key)).json()["access_token"]
    response = http.post(
        "/auth/introspect",
        data={
            "token": token,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": rs384(client_id, key),
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["active"] is True and body["sub"] == client_id
    assert "username" not in body
