"""Login: TOTP second factor, lockout per user name and per address, disabled accounts."""

from __future__ import annotations

from datetime import timedelta

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from fhir_server.storage.auth_schema import auth_login_attempt
from tests.auth_helpers import browser_authorize, hidden_fields, pkce_pair

BASE = "http://testserver/fhir"
REDIRECT = "https://app.example.org/cb"
PASSWORD = "correct horse battery"


def browser(app, source: str) -> TestClient:
    return TestClient(app, base_url="http://testserver", follow_redirects=False, client=(source, 1))


@pytest.fixture
def client_id(auth, unique):
    cid = f"app-{unique[:10]}"
    auth.clients.create(client_id=cid, kind="public", redirect_uris=[REDIRECT])
    return cid


def login_page(http, client_id):
    _, challenge = pkce_pair()
    page = http.get(
        "/auth/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "scope": "user/*.rs",
            "state": "s",
            "aud": BASE,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert page.status_code == 200
    return page


def attempt(http, page, username, password, totp=None):
    data = {**hidden_fields(page.text), "username": username, "password": password}
    if totp is not None:
        data["totp"] = totp
    return http.post("/auth/authorize/login", data=data)


def test_totp_is_required_when_the_account_has_one(app, auth, client_id, unique):
    name = f"totp-{unique[:8]}"
    _, uri = auth.users.create(username=name, password=PASSWORD, role="admin", totp=True)
    assert uri.startswith("otpauth://totp/MSO:")
    secret = pyotp.parse_uri(uri).secret
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    assert "Allow access?" not in attempt(http, page, name, PASSWORD).text
    assert "Allow access?" not in attempt(http, page, name, PASSWORD, totp="000000").text
    ok = attempt(http, page, name, PASSWORD, totp=pyotp.TOTP(secret).now())
    assert "Allow access?" in ok.text


def test_lockout_after_repeated_failures_even_with_the_right_password(app, auth, client_id, unique):
    settings = app.state.settings
    name = f"lock-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    for _ in range(settings.login_max_failures):
        assert attempt(http, page, name, "wrong password").status_code == 200
    locked = attempt(http, page, name, PASSWORD)
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.text
    # from another address too: the lockout is per user name
    elsewhere = browser(app, f"other-{unique[:8]}")
    assert attempt(elsewhere, login_page(elsewhere, client_id), name, PASSWORD).status_code == 429
    # once the failures are older than the lockout, the right password works again
    with auth.logins.engine.begin() as conn:
        conn.execute(
            update(auth_login_attempt)
            .where(auth_login_attempt.c.username == name)
            .values(at=auth_login_attempt.c.at - timedelta(seconds=settings.login_lockout + 1))
        )
    assert "Allow access?" in attempt(http, page, name, PASSWORD).text


def test_a_success_resets_the_failure_count(app, auth, client_id, unique):
    settings = app.state.settings
    name = f"reset-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    for _ in range(settings.login_max_failures - 1):
        attempt(http, page, name, "wrong password")
    assert "Allow access?" in attempt(http, page, name, PASSWORD).text
    for _ in range(settings.login_max_failures - 1):
        attempt(http, page, name, "wrong password")
    assert "Allow access?" in attempt(http, page, name, PASSWORD).text


def test_lockout_per_source_address(app, auth, client_id, unique):
    settings = app.state.settings
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    # spraying many user names from one address
    for i in range(settings.login_max_failures_per_source):
        attempt(http, page, f"spray{i}-{unique[:6]}", "wrong password")
    name = f"victim-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    assert attempt(http, page, name, PASSWORD).status_code == 429
    # the same user from a clean address is fine
    clean = browser(app, f"clean-{unique[:8]}")
    assert "Allow access?" in attempt(clean, login_page(clean, client_id), name, PASSWORD).text


def test_unknown_user_and_wrong_password_look_the_same(app, auth, client_id, unique):
    name = f"real-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    unknown = attempt(http, page, f"ghost-{unique[:8]}", PASSWORD)
    wrong = attempt(http, page, name, "wrong password")
    assert unknown.status_code == wrong.status_code == 200
    message = "Unknown user name or wrong password or one-time code"
    assert message in unknown.text and message in wrong.text


def test_disabled_user_cannot_log_in(app, auth, client_id, unique):
    name = f"off-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    auth.users.set_disabled(name)
    http = browser(app, f"ip-{unique[:8]}")
    response = attempt(http, login_page(http, client_id), name, PASSWORD)
    assert "Allow access?" not in response.text


def test_user_disabled_during_the_flow_cannot_consent(app, auth, client_id, unique):
    name = f"mid-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    http = browser(app, f"ip-{unique[:8]}")
    consent = attempt(http, login_page(http, client_id), name, PASSWORD)
    auth.users.set_disabled(name)
    done = http.post(
        "/auth/authorize/consent",
        data={**hidden_fields(consent.text), "decision": "approve", "scope": ["user/*.rs"]},
    )
    assert done.status_code == 400


def test_login_events_are_audited(app, auth, client_id, unique, monkeypatch):
    """Every login success and failure reaches ``app.state.audit.auth_event``."""
    audit = getattr(app.state, "audit", None)
    if audit is None:
        pytest.skip("no audit trail in this build")
    seen = []
    original = audit.auth_event

    def spy(kind, success, **details):
        seen.append((kind, success, details.get("subject")))
        return original(kind, success, **details)

    monkeypatch.setattr(audit, "auth_event", spy)
    name = f"aud-{unique[:8]}"
    auth.users.create(username=name, password=PASSWORD, role="admin")
    http = browser(app, f"ip-{unique[:8]}")
    page = login_page(http, client_id)
    attempt(http, page, name, "wrong password")
    _, challenge = pkce_pair()
    browser_authorize(
        http,
        client_id=client_id,
        redirect_uri=REDIRECT,
        scope="user/*.rs",
        username=name,
        password=PASSWORD,
        challenge=challenge,
    )
    assert ("login", False, name) in seen
    assert ("login", True, name) in seen
