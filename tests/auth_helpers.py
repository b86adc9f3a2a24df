"""Test helpers for authorization: real users, clients and signed tokens without the OAuth dance.

:func:`token_for` creates the user (and client) in the database when missing and issues an access
token through :class:`~fhir_server.auth.tokens.TokenService`, exactly as the token endpoint would.
The browser-like helpers drive the login, patient-picker and consent pages over HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fhir_server.auth.principal import Role
from fhir_server.auth.server import AuthServer, build_auth_server
from fhir_server.auth.tokens import TokenService
from fhir_server.config import Settings
from fhir_server.storage.engine import build_engine

DEFAULT_AUDIENCE = "http://testserver/fhir"
_servers: dict[str, AuthServer] = {}


def auth_server(app_or_settings: Any) -> AuthServer:
    """The :class:`AuthServer` of an app (``create_app``) or one built for ``Settings``."""
    state = getattr(app_or_settings, "state", None)
    if state is not None and getattr(state, "auth", None) is not None:
        return state.auth
    settings: Settings = app_or_settings
    server = _servers.get(settings.database_url)
    if server is None:
        engine = build_engine(settings.database_url)
        server = build_auth_server(engine, settings, tokens=TokenService(engine, settings))
        _servers[settings.database_url] = server
    return server


def ensure_client(auth: AuthServer, client_id: str, *, backend: bool = False) -> None:
    """Register ``client_id`` when missing (a public client, or a backend one without keys)."""
    if auth.clients.get(client_id) is not None:
        return
    from fhir_server.auth.clients import ClientError

    try:
        if backend:
            auth.clients.create(client_id=client_id, kind="backend", jwks={"keys": []})
        else:
            auth.clients.create(
                client_id=client_id, kind="public", redirect_uris=["http://localhost/callback"]
            )
    except ClientError:
        pass  # created concurrently by another test worker


def token_for(
    app_or_settings: Any,
    *,
    role: Role | str,
    scopes: str = "user/*.cruds",
    username: str | None = None,
    organization: str | None = None,
    practitioner_role: str | None = None,
    patient: str | None = None,
    fhir_user: str | None = None,
    client_id: str = "test-client",
    encounter: str | None = None,
    audience: str | None = None,
    lifetime: int = 86400,
) -> str:
    """A real signed access token for a user of ``role`` (created when missing).

    ``role="system"`` makes a backend-services token for ``client_id`` (no user). The user name
    defaults to one derived from the role and identity, so equal calls share one account; an
    explicit ``username`` that exists with other attributes is an error. ``audience`` defaults to
    the configured ``base_url`` (``http://testserver/fhir`` when unset).
    """
    auth = auth_server(app_or_settings)
    role = Role(role)
    aud = audience or auth.settings.base_url or DEFAULT_AUDIENCE
    if role is Role.SYSTEM:
        ensure_client(auth, client_id, backend=True)
        return auth.tokens.issue_access_token(
            client_id=client_id,
            scopes=scopes,
            role=role,
            organization=organization,
            audience=aud,
            lifetime=lifetime,
        )
    ensure_client(auth, client_id)
    if role is Role.PATIENT and fhir_user is None and patient:
        fhir_user = f"Patient/{patient}"
    if fhir_user is None and practitioner_role:
        fhir_user = f"PractitionerRole/{practitioner_role}"
    identity = (organization, practitioner_role, patient, fhir_user)
    if username is None:
        suffix = hashlib.sha256(repr(identity).encode()).hexdigest()[:12]
        username = f"test-{role.value}-{suffix}"
    user = auth.users.get(username)
    if user is None:
        from fhir_server.auth.users import UserError

        try:
            user, _ = auth.users.create(
                username=username,
                password=secrets.token_urlsafe(16),
                role=role,
                fhir_user=fhir_user,
                practitioner_role=practitioner_role,
                organization=organization,
                patient=patient,
            )
        except UserError:
            user = auth.users.get(username)
            if user is None:
                raise
    found = (user.organization, user.practitioner_role, user.patient, user.fhir_user)
    if user.role is not role or found != identity:
        raise ValueError(f"user {username} exists as {user.role.value} {found}, not {identity}")
    return auth.tokens.issue_access_token(
        client_id=client_id,
        scopes=scopes,
        role=role,
        username=username,
        fhir_user=fhir_user,
        practitioner_role=practitioner_role,
        organization=organization,
        patient=patient,
        encounter=encounter,
        audience=aud,
        lifetime=lifetime,
    )


# -- driving the login pages like a browser ------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``code_verifier`` and its S256 ``code_challenge``."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.decode().rstrip("=")


def hidden_fields(html: str) -> dict[str, str]:
    """The hidden inputs (flow, csrf) of a page's form."""
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))


def checkbox_values(html: str, name: str) -> list[str]:
    """The values of the checkboxes called ``name`` (the offered scopes on the consent page)."""
    return re.findall(rf'<input type="checkbox" name="{name}" value="([^"]*)"', html)


def query_of(location: str) -> dict[str, str]:
    """The query parameters of a redirect ``Location``."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def browser_authorize(
    http: Any,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    username: str,
    password: str,
    aud: str = DEFAULT_AUDIENCE,
    state: str = "st-123",
    challenge: str | None = None,
    launch: str | None = None,
    patient: str | None = None,
    totp: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Authorize like a browser: GET authorize, post the login form (with its CSRF field),
    pick ``patient`` when asked, approve every offered scope; returns the redirect's query."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": aud,
    }
    if challenge:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    if launch:
        params["launch"] = launch
    if nonce:
        params["nonce"] = nonce
    page = http.get("/auth/authorize", params=params)
    return complete_authorization(
        http, page, username=username, password=password, patient=patient, totp=totp
    )


def complete_authorization(
    http: Any,
    page: Any,
    *,
    username: str,
    password: str,
    patient: str | None = None,
    totp: str | None = None,
) -> dict[str, str]:
    """From the login ``page`` of an authorization on: log in, pick ``patient`` when asked,
    approve every offered scope; returns the query of the redirect back to the app."""
    assert page.status_code == 200, page.text
    form = {**hidden_fields(page.text), "username": username, "password": password}
    if totp:
        form["totp"] = totp
    page = http.post("/auth/authorize/login", data=form)
    assert page.status_code == 200, page.text
    if "/auth/authorize/patient" in page.text:
        assert patient, "the server asked for a patient"
        page = http.post(
            "/auth/authorize/patient",
            data={**hidden_fields(page.text), "action": "select", "patient": patient},
        )
        assert page.status_code == 200, page.text
    assert "/auth/authorize/consent" in page.text, page.text
    done = http.post(
        "/auth/authorize/consent",
        data={
            **hidden_fields(page.text),
            "decision": "approve",
            "scope": checkbox_values(page.text, "scope"),
        },
    )
    assert done.status_code == 303, done.text
    return query_of(done.headers["location"])


def exchange_code(
    http: Any, code: str, client_id: str, verifier: str, redirect_uri: str, **extra: Any
) -> Any:
    """POST the authorization ``code`` to the token endpoint (PKCE ``verifier``); the response.
    ``extra`` form fields with the value ``None`` are left out."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": client_id,
        "code_verifier": verifier,
        **extra,
    }
    return http.post("/auth/token", data={k: v for k, v in data.items() if v is not None})


def token_by_code(
    http: Any,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    username: str,
    password: str,
    **authorize: Any,
) -> Any:
    """The token endpoint's response at the end of a whole authorization-code flow with PKCE:
    :func:`browser_authorize` (``authorize`` passes aud, launch, nonce …), then
    :func:`exchange_code`."""
    verifier, challenge = pkce_pair()
    query = browser_authorize(
        http,
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope=scope,
        username=username,
        password=password,
        challenge=challenge,
        **authorize,
    )
    return exchange_code(http, query["code"], client_id, verifier, redirect_uri)
