"""Bearer tokens: what ``TokenService.authenticate`` accepts and refuses, introspection,
revocation, discovery documents, signing keys and the ``token_for`` test helper."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from sqlalchemy import event

from fhir_server.auth.principal import Role
from fhir_server.fhir.outcome import FhirError
from tests.auth_helpers import token_for

BASE = "http://testserver/fhir"


@pytest.fixture
def http(app) -> TestClient:
    return TestClient(app, base_url="http://testserver", follow_redirects=False)


@pytest.fixture
def tokens(app):
    return app.state.tokens


def refused(tokens, header, **kw) -> FhirError:
    with pytest.raises(FhirError) as info:
        tokens.authenticate(header, **kw)
    assert info.value.status == 401
    assert info.value.issue_code == "login"
    return info.value


def test_token_for_issues_a_real_token(app, tokens, unique):
    token = token_for(
        app, role="requester", organization=f"org-{unique[:6]}", scopes="user/*.rs launch"
    )
    principal = tokens.authenticate(f"Bearer {token}")
    assert principal.role is Role.REQUESTER
    assert principal.organization == f"org-{unique[:6]}"
    assert principal.client_id == "test-client"
    assert principal.scopes.has("launch")
    # equal calls share the account; a system token has the client as subject
    again = token_for(app, role="requester", organization=f"org-{unique[:6]}")
    assert tokens.authenticate(f"Bearer {again}").subject == principal.subject
    system = tokens.authenticate(f"Bearer {token_for(app, role='system', scopes='system/*.rs')}")
    assert (system.role, system.subject) == (Role.SYSTEM, "test-client")
    patient = tokens.authenticate(
        f"Bearer {token_for(app, role='patient', patient=f'pt-{unique[:6]}')}"
    )
    assert patient.patient == f"pt-{unique[:6]}"
    assert patient.fhir_user == f"Patient/pt-{unique[:6]}"


def test_token_for_works_from_settings(app, tokens):
    token = token_for(app.state.settings, role="admin")
    assert tokens.authenticate(f"Bearer {token}").role is Role.ADMIN


def test_missing_header_has_no_error_attribute(tokens):
    for header in (None, "", "   "):
        error = refused(tokens, header)
        assert error.code == "MSO-AUTH-001"
        assert error.headers["WWW-Authenticate"] == 'Bearer realm="mso"'


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
    ],
)
def test_malformed_tokens(tokens, header):
    error = refused(tokens, header)
    assert error.code == "MSO-AUTH-002"
    challenge = error.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="mso", error="invalid_token", error_description="')


def test_tampered_token_fails_the_signature(app, tokens):
    token = token_for(app, role="admin")
    header, payload, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "system"
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).decode().rstrip("=")
    assert refused(tokens, f"Bearer {header}.{forged}.{signature}").code == "MSO-AUTH-002"


def test_token_signed_by_another_key_is_refused(app, tokens):
    from joserfc.jwk import RSAKey

    kid, _ = tokens.keys.signing_key()
    stranger = RSAKey.generate_key(2048, private=True)
    claims = {
        "sub": "x",
        "aud": BASE,
        "iss": "http://testserver",
        "exp": int(time.time()) + 60,
        "jti": "j",
        "role": "admin",
        "scope": "user/*.cruds",
    }
    token = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": kid}, claims, stranger)
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-002"


def test_expired_token(app, tokens):
    token = token_for(app, role="admin", lifetime=-60)
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-003"


def test_wrong_audience(app, tokens):
    token = token_for(app, role="admin", audience="https://elsewhere.example.org/fhir")
    error = refused(tokens, f"Bearer {token}")
    assert error.code == "MSO-AUTH-004"


def test_audience_from_the_request_when_no_base_url_is_configured(app, tokens):
    """Without MSO_BASE_URL the caller passes the base URL the request came to."""
    from fhir_server.auth.tokens import TokenService

    unconfigured = TokenService(
        tokens.engine, app.state.settings.model_copy(update={"base_url": None})
    )
    ok = token_for(app, role="admin")
    assert unconfigured.authenticate(f"Bearer {ok}", audience=BASE + "/")
    assert unconfigured.authenticate(f"Bearer {ok}")  # aud at least matches its own issuer
    error = refused(unconfigured, f"Bearer {ok}", audience="http://other.example.org/fhir")
    assert error.code == "MSO-AUTH-004"


def test_revoked_token(app, tokens):
    token = token_for(app, role="admin")
    principal = tokens.authenticate(f"Bearer {token}")
    tokens.revoke(principal.token_id)
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-005"


def test_disabling_a_user_stops_their_tokens_at_once(app, auth, tokens, unique):
    name = f"dis-{unique[:8]}"
    token = token_for(app, role="provider", username=name, practitioner_role="pr-1")
    assert tokens.authenticate(f"Bearer {token}").subject == name
    assert auth.users.set_disabled(name)
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-006"
    auth.users.set_disabled(name, False)
    assert tokens.authenticate(f"Bearer {token}")


def test_disabling_a_client_stops_its_tokens(app, auth, tokens, unique):
    client_id = f"c-{unique[:8]}"
    token = token_for(app, role="system", client_id=client_id, scopes="system/*.rs")
    auth.clients.set_disabled(client_id)
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-006"


class _CountingDriver:
    """Passes everything to a DB-API connection, counting the statements its cursors run."""

    def __init__(self, real, executed: list[str]) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_executed", executed)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._real, name, value)

    def cursor(self):
        cursor = self._real.cursor()
        executed, execute = self._executed, cursor.execute

        class Counting:
            def __getattr__(self, name):
                return getattr(cursor, name)

            def execute(self, sql, *args):
                executed.append(sql)
                return execute(sql, *args)

        return Counting()


def test_authenticate_is_one_query_and_fast(app, tokens, monkeypatch):
    token = token_for(app, role="admin")
    header = f"Bearer {token}"
    tokens.authenticate(header)  # warm: keys loaded, signature verified once
    executed: list[str] = []
    raw_connection = tokens.engine.raw_connection

    class CountingFairy:
        def __init__(self, fairy) -> None:
            self.fairy = fairy
            self.driver_connection = _CountingDriver(fairy.driver_connection, executed)

        def __getattr__(self, name):
            return getattr(self.fairy, name)

    def counting_raw_connection():
        return CountingFairy(raw_connection())

    core: list[str] = []

    def count_core(_conn, _cursor, statement, *_args):
        core.append(statement)

    monkeypatch.setattr(tokens.engine, "raw_connection", counting_raw_connection)
    event.listen(tokens.engine, "before_cursor_execute", count_core)
    try:
        tokens.authenticate(header)
    finally:
        event.remove(tokens.engine, "before_cursor_execute", count_core)
        monkeypatch.undo()
    assert len(executed) == 1 and "auth_access_token" in executed[0]
    assert core == []
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        tokens.authenticate(header)
    per_call = (time.perf_counter() - started) / rounds
    assert per_call < 0.005, f"authenticate took {per_call * 1e6:.0f} µs"


def test_key_rotation_keeps_old_tokens_valid_and_publishes_both_keys(app, http, tokens):
    old_kid, _ = tokens.keys.signing_key()
    before = token_for(app, role="admin")
    new_kid = tokens.keys.rotate()
    assert new_kid != old_kid
    after = token_for(app, role="admin")
    assert jwt.decode(after, tokens.keys.jwk(new_kid)).header["kid"] == new_kid
    kids = {k["kid"] for k in http.get("/auth/jwks").json()["keys"]}
    assert {old_kid, new_kid} <= kids
    assert all("d" not in k for k in http.get("/auth/jwks").json()["keys"])  # public only
    assert tokens.authenticate(f"Bearer {before}")
    assert tokens.authenticate(f"Bearer {after}")


def test_another_process_shares_the_keys(app, tokens):
    """A second TokenService (another worker) verifies tokens the first one signed."""
    from fhir_server.auth.tokens import TokenService

    other = TokenService(tokens.engine, app.state.settings)
    token = token_for(app, role="admin")
    assert other.authenticate(f"Bearer {token}").role is Role.ADMIN


# -- discovery ----------------------------------------------------------------------------------


def test_smart_configuration(http):
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        response = http.get(path)
        assert response.status_code == 200
        config = response.json()
        assert config["issuer"] == "http://testserver"
        assert config["authorization_endpoint"] == "http://testserver/auth/authorize"
        assert config["token_endpoint"] == "http://testserver/auth/token"
        assert config["jwks_uri"] == "http://testserver/auth/jwks"
        assert config["introspection_endpoint"] == "http://testserver/auth/introspect"
        assert config["revocation_endpoint"] == "http://testserver/auth/revoke"
        assert config["code_challenge_methods_supported"] == ["S256"]
        assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
        assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
        assert {"authorization_code", "client_credentials", "refresh_token"} <= set(
            config["grant_types_supported"]
        )
        assert "code" in config["response_types_supported"]
        assert {"launch-ehr", "permission-v2", "authorize-post", "sso-openid-connect"} <= set(
            config["capabilities"]
        )
    openid = http.get("/.well-known/openid-configuration").json()
    assert openid["id_token_signing_alg_values_supported"] == ["RS256"]


# -- introspection and revocation ---------------------------------------------------------------


@pytest.fixture
def confidential(auth, unique):
    client_id = f"rs-{unique[:8]}"
    _, secret = auth.clients.create(
        client_id=client_id, kind="confidential", redirect_uris=["https://rs.example.org/cb"]
    )
    return client_id, secret


def test_introspection(app, http, confidential, unique):
    token = token_for(
        app,
        role="patient",
        patient=f"pt-{unique[:6]}",
        scopes="patient/*.rs launch/patient",
        client_id=f"app-{unique[:6]}",
    )
    response = http.post("/auth/introspect", data={"token": token}, auth=confidential)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["active"] is True
    assert body["scope"] == "patient/*.rs launch/patient"
    assert body["client_id"] == f"app-{unique[:6]}"
    assert body["patient"] == f"pt-{unique[:6]}"
    assert body["fhirUser"] == f"{BASE}/Patient/pt-{unique[:6]}"
    assert body["exp"] > time.time()
    assert body["token_type"] == "Bearer"
    for inactive in ("garbage", token_for(app, role="admin", lifetime=-60)):
        response = http.post("/auth/introspect", data={"token": inactive}, auth=confidential)
        assert response.json() == {"active": False}


def test_introspection_needs_an_authenticated_client(app, http, auth, unique):
    token = token_for(app, role="admin")
    anonymous = http.post("/auth/introspect", data={"token": token})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "invalid_client"
    public = f"pub-{unique[:8]}"
    auth.clients.create(client_id=public, kind="public", redirect_uris=["https://x.org/cb"])
    as_public = http.post("/auth/introspect", data={"token": token, "client_id": public})
    assert as_public.status_code == 400
    wrong = http.post("/auth/introspect", data={"token": token}, auth=("rs", "bad"))
    assert wrong.status_code == 401


def test_revocation_of_an_access_token(app, http, tokens, confidential):
    client_id, _ = confidential
    token = token_for(app, role="admin", client_id=client_id)
    assert tokens.authenticate(f"Bearer {token}")
    response = http.post(
        "/auth/revoke", data={"token": token, "token_type_hint": "access_token"}, auth=confidential
    )
    assert response.status_code == 200
    assert refused(tokens, f"Bearer {token}").code == "MSO-AUTH-005"
    assert http.post("/auth/introspect", data={"token": token}, auth=confidential).json() == {
        "active": False
    }
    # unknown tokens are fine (RFC 7009 section 2.2); another client's token is refused
    assert http.post("/auth/revoke", data={"token": "nope"}, auth=confidential).status_code == 200
    foreign = token_for(app, role="admin", client_id="someone-else")
    refusal = http.post("/auth/revoke", data={"token": foreign}, auth=confidential)
    assert refusal.status_code == 400
    assert tokens.authenticate(f"Bearer {foreign}")
