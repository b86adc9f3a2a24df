"""SMART App Launch over HTTP, driven like a browser: authorization code + PKCE, consent,
standalone launch with the patient picker, EHR launch, refresh rotation, OpenID Connect."""

from __future__ import annotations

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from fhir_server.fhir.outcome import FhirError
from tests.auth_helpers import (
    browser_authorize,
    checkbox_values,
    exchange_code,
    hidden_fields,
    pkce_pair,
    query_of,
    token_by_code,
)

BASE = "http://testserver/fhir"
REDIRECT = "https://app.example.org/callback"
PASSWORD = "correct horse battery"


@pytest.fixture
def user(auth, unique):
    name = f"dr-{unique[:10]}"
    auth.users.create(
        username=name, password=PASSWORD, role="admin", fhir_user=f"Practitioner/p-{unique[:8]}"
    )
    return name


@pytest.fixture
def public_client(auth, unique):
    client_id = f"app-{unique[:10]}"
    auth.clients.create(client_id=client_id, kind="public", redirect_uris=[REDIRECT])
    return client_id


@pytest.fixture
def confidential_client(auth, unique):
    client_id = f"conf-{unique[:10]}"
    _, secret = auth.clients.create(
        client_id=client_id, kind="confidential", redirect_uris=[REDIRECT]
    )
    return client_id, secret


def exchange(http, code, client_id, verifier, **extra):
    return exchange_code(http, code, client_id, verifier, REDIRECT, **extra)


def refresh_grant(http, client_id, refresh_token, **extra):
    """POST a refresh_token grant (``extra``: scope …)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    return http.post("/auth/token", data={**data, **extra})


def test_authorization_code_with_pkce_like_a_browser(app, http, user, public_client):
    verifier, challenge = pkce_pair()
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "openid fhirUser offline_access user/*.rs",
            "state": "s-1",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert "mso_auth_sid" in page.cookies
    form = hidden_fields(page.text)
    assert set(form) == {"flow", "csrf"}

    consent = http.post(
        "/auth/authorize/login", data={**form, "username": user, "password": PASSWORD}
    )
    assert consent.status_code == 200
    offered = checkbox_values(consent.text, "scope")
    assert offered == ["user/*.rs", "fhirUser", "offline_access", "openid"]

    done = http.post(
        "/auth/authorize/consent",
        data={**hidden_fields(consent.text), "decision": "approve", "scope": offered},
    )
    assert done.status_code == 303
    query = query_of(done.headers["location"])
    assert query["state"] == "s-1" and query["code"]

    response = exchange(http, query["code"], public_client, verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == app.state.settings.access_token_ttl
    assert set(body["scope"].split()) == set(offered)
    assert body["refresh_token"] and body["id_token"]

    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}", source="1.2.3.4")
    assert principal.subject == user
    assert principal.role.value == "admin"
    assert principal.client_id == public_client
    assert principal.source == "1.2.3.4"
    assert principal.scopes.grants("Patient", "r")


def test_user_can_narrow_scopes_on_the_consent_screen(http, user, public_client):
    verifier, challenge = pkce_pair()
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "user/Patient.rs user/Observation.rs",
            "state": "s",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    consent = http.post(
        "/auth/authorize/login",
        data={**hidden_fields(page.text), "username": user, "password": PASSWORD},
    )
    done = http.post(
        "/auth/authorize/consent",
        data={**hidden_fields(consent.text), "decision": "approve", "scope": ["user/Patient.rs"]},
    )
    code = query_of(done.headers["location"])["code"]
    assert exchange(http, code, public_client, verifier).json()["scope"] == "user/Patient.rs"


def test_denied_consent_redirects_with_access_denied(http, user, public_client):
    _, challenge = pkce_pair()
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "user/*.rs",
            "state": "s-deny",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    consent = http.post(
        "/auth/authorize/login",
        data={**hidden_fields(page.text), "username": user, "password": PASSWORD},
    )
    done = http.post(
        "/auth/authorize/consent", data={**hidden_fields(consent.text), "decision": "deny"}
    )
    assert done.status_code == 303
    assert query_of(done.headers["location"]) == {
        "error": "access_denied",
        "error_description": "The user denied access",
        "state": "s-deny",
    }


def test_authorize_by_post(http, user, public_client):
    """capability ``authorize-post``: the app may POST the authorization request."""
    _, challenge = pkce_pair()
    page = http.post(
        "/auth/authorize",
        data={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "user/*.rs",
            "state": "s",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert page.status_code == 200
    assert set(hidden_fields(page.text)) == {"flow", "csrf"}


def test_confidential_client_with_basic_and_post_secrets(http, user, confidential_client):
    client_id, secret = confidential_client
    for how in ("basic", "post"):
        query = browser_authorize(
            http,
            client_id=client_id,
            redirect_uri=REDIRECT,
            scope="user/*.rs",
            username=user,
            password=PASSWORD,
        )
        data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
        if how == "basic":
            response = http.post("/auth/token", data=data, auth=(client_id, secret))
        else:
            response = http.post(
                "/auth/token", data={**data, "client_id": client_id, "client_secret": secret}
            )
        assert response.status_code == 200, response.text
    wrong = http.post(
        "/auth/token",
        data={"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT},
        auth=(client_id, "not-the-secret"),
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"].startswith("Basic")
    # a confidential client cannot pass as a public one
    public_try = http.post(
        "/auth/token",
        data={"grant_type": "authorization_code", "code": "x", "client_id": client_id},
    )
    assert public_try.status_code == 401


def test_id_token_verifies_against_the_jwks(http, user, public_client, auth):
    body = token_by_code(
        http,
        client_id=public_client,
        redirect_uri=REDIRECT,
        scope="openid fhirUser user/*.rs",
        username=user,
        password=PASSWORD,
        nonce="n-0S6_WzA2Mj",
    ).json()
    config = http.get("/.well-known/openid-configuration").json()
    assert config["issuer"] == "http://testserver"
    jwks_path = config["jwks_uri"].removeprefix("http://testserver")
    keys = KeySet.import_key_set(http.get(jwks_path).json())
    token = jwt.decode(body["id_token"], keys, algorithms=["RS256"])
    claims = token.claims
    assert claims["iss"] == "http://testserver"
    assert claims["aud"] == public_client
    assert claims["sub"] == user
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["fhirUser"] == f"{BASE}/{auth.users.get(user).fhir_user}"
    assert claims["exp"] > claims["iat"] >= claims["auth_time"]
    # the access token verifies against the same JWKS and is an RFC 9068 token
    access = jwt.decode(body["access_token"], keys, algorithms=["RS256"])
    assert access.header["typ"] == "at+jwt"
    assert access.claims["aud"] == BASE
    assert access.claims["fhirUser"] == auth.users.get(user).fhir_user
    # an ID token is not an access token
    with pytest.raises(FhirError) as info:
        auth.tokens.authenticate(f"Bearer {body['id_token']}")
    assert info.value.code == "MSO-AUTH-002"


def test_refresh_rotates_and_reuse_revokes_the_family(app, http, user, public_client):
    first = token_by_code(
        http,
        client_id=public_client,
        redirect_uri=REDIRECT,
        scope="offline_access user/*.rs",
        username=user,
        password=PASSWORD,
    ).json()

    def refresh(token, **extra):
        return refresh_grant(http, public_client, token, **extra)

    second = refresh(first["refresh_token"])
    assert second.status_code == 200, second.text
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == first["scope"]
    # narrowing on refresh is allowed, widening is not (and does not use the token up)
    widened = refresh(second["refresh_token"], scope="user/*.cruds")
    assert widened.json()["error"] == "invalid_scope"
    third = refresh(second["refresh_token"])
    assert third.status_code == 200, third.text
    third = third.json()
    assert app.state.tokens.authenticate(f"Bearer {third['access_token']}").subject == user

    # presenting a rotated token again: it leaked, so the whole family is revoked
    replay = refresh(first["refresh_token"])
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    for body in (first, second, third):
        with pytest.raises(FhirError) as info:
            app.state.tokens.authenticate(f"Bearer {body['access_token']}")
        assert info.value.status == 401
        assert info.value.code == "MSO-AUTH-005"
    assert refresh(third["refresh_token"]).json()["error"] == "invalid_grant"


def test_refresh_without_reuse_keeps_working(app, http, user, public_client):
    token = token_by_code(
        http,
        client_id=public_client,
        redirect_uri=REDIRECT,
        scope="online_access user/*.rs",
        username=user,
        password=PASSWORD,
    ).json()
    for _ in range(3):
        response = refresh_grant(
            http, public_client, token["refresh_token"], scope="user/*.rs online_access"
        )
        assert response.status_code == 200, response.text
        token = response.json()
        assert app.state.tokens.authenticate(f"Bearer {token['access_token']}").subject == user
    # another client cannot use it
    other = refresh_grant(http, "nobody", token["refresh_token"])
    assert other.status_code == 401


@pytest.fixture
def patients(client, unique):
    """Two patients with a family name unique to the test (created with the suite's token)."""
    ids = []
    for given in ("Ann", "Bob"):
        response = client.post(
            "/fhir/Patient",
            json={
                "resourceType": "Patient",
                "name": [{"family": f"Picker{unique[:8]}", "given": [given]}],
                "birthDate": "1970-01-01",
            },
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_standalone_launch_with_patient_picker(app, http, user, public_client, patients, unique):
    verifier, challenge = pkce_pair()
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "launch/patient patient/*.rs openid fhirUser",
            "state": "s",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    picker = http.post(
        "/auth/authorize/login",
        data={**hidden_fields(page.text), "username": user, "password": PASSWORD},
    )
    assert "Choose a patient" in picker.text
    found = http.post(
        "/auth/authorize/patient",
        data={**hidden_fields(picker.text), "action": "search", "q": f"Picker{unique[:8]}"},
    )
    assert found.status_code == 200
    assert all(f'value="{pid}"' in found.text for pid in patients)
    # a patient that does not exist is refused, the picker shown again
    bogus = http.post(
        "/auth/authorize/patient",
        data={**hidden_fields(found.text), "action": "select", "patient": "no-such-patient"},
    )
    assert "Choose one of the patients listed" in bogus.text
    consent = http.post(
        "/auth/authorize/patient",
        data={**hidden_fields(found.text), "action": "select", "patient": patients[1]},
    )
    assert "Allow access?" in consent.text and patients[1] in consent.text
    # consent before a patient is chosen is refused
    early = http.post(
        "/auth/authorize/consent",
        data={**hidden_fields(picker.text), "decision": "approve", "scope": ["patient/*.rs"]},
    )
    assert early.status_code == 400
    done = http.post(
        "/auth/authorize/consent",
        data={
            **hidden_fields(consent.text),
            "decision": "approve",
            "scope": checkbox_values(consent.text, "scope"),
        },
    )
    body = exchange(http, query_of(done.headers["location"])["code"], public_client, verifier)
    body = body.json()
    assert body["patient"] == patients[1]
    assert body["need_patient_banner"] is True
    assert body["smart_style_url"] == "http://testserver/auth/smart-style.json"
    assert http.get("/auth/smart-style.json").json()["color_background"]
    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert principal.patient == patients[1]


def test_patient_user_gets_their_own_patient_without_a_picker(
    app, http, auth, public_client, unique
):
    name = f"pat-{unique[:10]}"
    auth.users.create(username=name, password=PASSWORD, role="patient", patient=f"pt-{unique[:8]}")
    body = token_by_code(
        http,
        client_id=public_client,
        redirect_uri=REDIRECT,
        scope="launch/patient patient/*.rs",
        username=name,
        password=PASSWORD,
    ).json()
    assert body["patient"] == f"pt-{unique[:8]}"
    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert principal.role.value == "patient"
    assert principal.patient == f"pt-{unique[:8]}"
    assert principal.fhir_user == f"Patient/pt-{unique[:8]}"


def test_ehr_launch_with_a_launch_id(app, http, auth, user, public_client, unique):
    launch = auth.grants.create_launch(
        patient=f"p-{unique[:6]}",
        encounter=f"e-{unique[:6]}",
        fhir_context=[f"ServiceRequest/sr-{unique[:6]}"],
        ttl=60,
    )
    body = token_by_code(
        http,
        client_id=public_client,
        redirect_uri=REDIRECT,
        scope="launch openid fhirUser patient/*.rs",
        username=user,
        password=PASSWORD,
        launch=launch,
    ).json()
    assert body["patient"] == f"p-{unique[:6]}"
    assert body["encounter"] == f"e-{unique[:6]}"
    assert body["fhirContext"] == [{"reference": f"ServiceRequest/sr-{unique[:6]}"}]
    assert body["need_patient_banner"] is False
    principal = app.state.tokens.authenticate(f"Bearer {body['access_token']}")
    assert (principal.patient, principal.encounter) == (f"p-{unique[:6]}", f"e-{unique[:6]}")


def test_unknown_launch_is_redirected_as_invalid_request(http, public_client):
    _, challenge = pkce_pair()
    response = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": public_client,
            "redirect_uri": REDIRECT,
            "scope": "launch patient/*.rs",
            "state": "s",
            "aud": BASE,
            "launch": "not-a-launch",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert response.status_code == 302
    assert query_of(response.headers["location"])["error"] == "invalid_request"
