"""Unhappy paths of the authorization and token endpoints: each gets the right OAuth error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.auth_helpers import browser_authorize, hidden_fields, pkce_pair, query_of

BASE = "http://testserver/fhir"
REDIRECT = "https://app.example.org/cb"
PASSWORD = "correct horse battery"


@pytest.fixture
def user(auth, unique):
    name = f"u-{unique[:10]}"
    auth.users.create(username=name, password=PASSWORD, role="provider", practitioner_role="pr1")
    return name


@pytest.fixture
def client_id(auth, unique):
    cid = f"app-{unique[:10]}"
    auth.clients.create(
        client_id=cid, kind="public", redirect_uris=[REDIRECT], scope="openid user/*.rs"
    )
    return cid


def authorize_params(cid, **overrides):
    _, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": cid,
        "redirect_uri": REDIRECT,
        "scope": "user/*.rs",
        "state": "st",
        "aud": BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


# -- authorization endpoint ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"redirect_uri": "https://evil.example.org/cb"},
        {"redirect_uri": REDIRECT + "/extra"},
        {"redirect_uri": None},
        {"client_id": "no-such-client"},
    ],
)
def test_bad_client_or_redirect_uri_shows_an_error_page_and_never_redirects(
    http, client_id, override
):
    params = authorize_params(client_id, **override)
    response = http.get("/auth/authorize", params=params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "text/html" in response.headers["content-type"]


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"aud": "https://other.example.org/fhir"}, "invalid_request"),
        ({"aud": None}, "invalid_request"),
        ({"state": None}, "invalid_request"),
        ({"code_challenge": None}, "invalid_request"),  # public clients must use PKCE
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"scope": "user/NoSuchType.rs"}, "invalid_scope"),
        ({"scope": "user/Patient.xyz"}, "invalid_scope"),
        ({"scope": "system/*.rs"}, "invalid_scope"),  # not for a user-facing grant
    ],
)
def test_bad_authorization_requests_redirect_with_the_error(http, client_id, override, error):
    response = http.get("/auth/authorize", params=authorize_params(client_id, **override))
    assert response.status_code == 302
    assert response.headers["location"].startswith(REDIRECT + "?")
    query = query_of(response.headers["location"])
    assert query["error"] == error
    if "state" not in override:
        assert query["state"] == "st"


def test_scopes_are_narrowed_to_what_the_client_may_have(http, client_id, user):
    params = authorize_params(client_id, scope="openid user/Patient.rs user/*.cruds offline_access")
    page = http.get("/auth/authorize", params=params)
    consent = http.post(
        "/auth/authorize/login",
        data={**hidden_fields(page.text), "username": user, "password": PASSWORD},
    )
    offered = consent.text
    assert "user/Patient.rs" in offered and "openid" in offered
    assert "user/*.cruds" not in offered and "offline_access" not in offered


def test_forms_need_the_csrf_token_and_the_session_cookie(app, http, client_id, user):
    page = http.get("/auth/authorize", params=authorize_params(client_id))
    fields = hidden_fields(page.text)
    creds = {"username": user, "password": PASSWORD}
    missing = http.post("/auth/authorize/login", data={"flow": fields["flow"], **creds})
    assert missing.status_code == 400
    # tamper with the signed payload's first character: changing the last characters of the
    # signature may not change its bytes (base64 padding bits), which made this test flaky
    csrf = fields["csrf"]
    tampered = ("A" if csrf[0] != "A" else "B") + csrf[1:]
    forged = http.post("/auth/authorize/login", data={**fields, "csrf": tampered, **creds})
    assert forged.status_code == 400
    # another browser (no cookie, or its own cookie) cannot use this page's form
    other = TestClient(app, base_url="http://testserver", follow_redirects=False)
    assert other.post("/auth/authorize/login", data={**fields, **creds}).status_code == 400
    other.get("/auth/authorize", params=authorize_params(client_id))
    assert other.post("/auth/authorize/login", data={**fields, **creds}).status_code == 400
    # the real browser still can
    assert http.post("/auth/authorize/login", data={**fields, **creds}).status_code == 200


def test_wrong_password_shows_the_form_again(http, client_id, user):
    page = http.get("/auth/authorize", params=authorize_params(client_id))
    again = http.post(
        "/auth/authorize/login",
        data={**hidden_fields(page.text), "username": user, "password": "wrong password"},
    )
    assert again.status_code == 200
    assert "wrong password" in again.text
    assert "/auth/authorize/login" in again.text


# -- token endpoint --------------------------------------------------------------------------------


@pytest.fixture
def code_and_verifier(http, client_id, user):
    verifier, challenge = pkce_pair()
    query = browser_authorize(
        http,
        client_id=client_id,
        redirect_uri=REDIRECT,
        scope="user/*.rs",
        username=user,
        password=PASSWORD,
        challenge=challenge,
    )
    return query["code"], verifier


def token_request(http, **data):
    return http.post("/auth/token", data={k: v for k, v in data.items() if v is not None})


def code_grant(client_id, code, verifier, **overrides):
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    data.update(overrides)
    return data


def test_pkce_mismatch_is_invalid_grant_and_burns_the_code(http, client_id, code_and_verifier):
    code, verifier = code_and_verifier
    other_verifier, _ = pkce_pair()
    response = token_request(http, **code_grant(client_id, code, other_verifier))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert response.headers["cache-control"] == "no-store"
    # the code cannot be retried with the right verifier either
    retry = token_request(http, **code_grant(client_id, code, verifier))
    assert retry.json()["error"] == "invalid_grant"


def test_missing_code_verifier_is_invalid_grant(http, client_id, code_and_verifier):
    code, _ = code_and_verifier
    response = token_request(http, **code_grant(client_id, code, None))
    assert response.json()["error"] == "invalid_grant"


def test_redirect_uri_must_match_the_authorization(http, client_id, code_and_verifier):
    code, verifier = code_and_verifier
    response = token_request(
        http, **code_grant(client_id, code, verifier, redirect_uri=REDIRECT + "x")
    )
    assert response.json()["error"] == "invalid_grant"


def test_reused_code_is_invalid_grant_and_revokes_its_tokens(
    app, http, client_id, code_and_verifier
):
    code, verifier = code_and_verifier
    first = token_request(http, **code_grant(client_id, code, verifier))
    assert first.status_code == 200
    access = first.json()["access_token"]
    assert app.state.tokens.authenticate(f"Bearer {access}")
    second = token_request(http, **code_grant(client_id, code, verifier))
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    with pytest.raises(Exception) as info:
        app.state.tokens.authenticate(f"Bearer {access}")
    assert info.value.code == "MSO-AUTH-005"


def test_code_of_another_client_is_invalid_grant(auth, http, client_id, code_and_verifier, unique):
    other = f"other-{unique[:8]}"
    auth.clients.create(client_id=other, kind="public", redirect_uris=[REDIRECT])
    code, verifier = code_and_verifier
    response = token_request(http, **code_grant(other, code, verifier))
    assert response.json()["error"] == "invalid_grant"


def test_expired_code_is_invalid_grant(auth, http, client_id, user):
    from datetime import UTC, datetime

    code = auth.grants.create_code(
        client_id=client_id,
        username=user,
        redirect_uri=REDIRECT,
        scope="user/*.rs",
        code_challenge=None,
        nonce=None,
        context={},
        auth_time=datetime.now(UTC),
        ttl=-1,
    )
    response = token_request(http, **code_grant(client_id, code, None))
    assert response.json() == {
        "error": "invalid_grant",
        "error_description": "The authorization code has expired",
    }


def test_unknown_code_and_unknown_grant_type(http, client_id):
    assert token_request(http, **code_grant(client_id, "nope", None)).json()["error"] == (
        "invalid_grant"
    )
    unsupported = token_request(http, grant_type="password", client_id=client_id)
    assert unsupported.json()["error"] == "unsupported_grant_type"
    assert token_request(http, client_id=client_id).json()["error"] == "invalid_request"


def test_token_requests_must_be_forms_without_repeats(http, client_id):
    as_json = http.post("/auth/token", json={"grant_type": "authorization_code"})
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"
    repeated = http.post(
        "/auth/token",
        content=f"grant_type=authorization_code&code=a&code=b&client_id={client_id}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert repeated.json()["error"] == "invalid_request"


def test_unknown_public_client_is_invalid_client_401(http):
    response = token_request(
        http, grant_type="authorization_code", code="x", client_id="no-such-client"
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_disabled_user_cannot_exchange_a_code(auth, http, client_id, user, code_and_verifier):
    code, verifier = code_and_verifier
    auth.users.set_disabled(user)
    response = token_request(http, **code_grant(client_id, code, verifier))
    assert response.json()["error"] == "invalid_grant"


def test_public_client_cannot_use_client_credentials(http, client_id):
    response = token_request(
        http, grant_type="client_credentials", client_id=client_id, scope="system/*.rs"
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
