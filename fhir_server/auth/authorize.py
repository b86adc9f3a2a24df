"""The authorization request (RFC 6749 section 4.1.1; SMART App Launch "Obtain authorization
code"), transport-free: validate it, and find the patients a user may pick.

Errors before the client and its redirect URI are known good are *page* errors (shown to the
user, never redirected — RFC 6749 section 4.1.2.1, so that the endpoint cannot be used as an open
redirector). Later errors are redirected back to the client with ``error`` and ``state``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from authlib.oauth2.rfc6749.errors import (
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedResponseTypeError,
)
from authlib.oauth2.rfc7636.challenge import CODE_CHALLENGE_PATTERN

from fhir_server.auth.clients import ClientStore
from fhir_server.auth.errors import parse_requested_scopes
from fhir_server.auth.grants import GrantStore
from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import ScopeSet
from fhir_server.auth.tokens import fhir_base_without_slash
from fhir_server.auth.users import User
from fhir_server.storage.repository import ID_PATTERN, Repository

AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "aud",
    "launch",
    "code_challenge",
    "code_challenge_method",
    "nonce",
)
PICKER_SCOPES = ScopeSet.parse("user/Patient.rs")
PICKER_PAGE = 50


class PageError(Exception):
    """An authorization request error shown on a page with status 400 (no redirect)."""


def validate_request(
    params: Iterable[tuple[str, str]],
    *,
    clients: ClientStore,
    grants: GrantStore,
    fhir_base: str,
) -> dict[str, Any]:
    """Check an authorization request; returns the flow to carry through the login pages.

    Raises :class:`PageError` while the client or redirect URI is not established, and an
    authlib ``OAuth2Error`` with ``redirect_uri`` and ``state`` set afterwards.
    """
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for key, value in params:
        if key in values:
            repeated.add(key)
        values[key] = value
    client = clients.get(values.get("client_id", ""))
    if client is None or client.disabled:
        raise PageError("Unknown or disabled client application (client_id)")
    redirect_uri = values.get("redirect_uri")
    if "client_id" in repeated or "redirect_uri" in repeated:
        raise PageError("client_id and redirect_uri may be given only once")
    if not redirect_uri or redirect_uri not in client.redirect_uris:
        raise PageError("The redirect_uri is not registered for this client application")
    state = values.get("state")

    def fail(error: type[OAuth2Error], description: str) -> OAuth2Error:
        return error(description=description, state=state, redirect_uri=redirect_uri)

    if repeated:
        raise fail(InvalidRequestError, f"Repeated parameters: {', '.join(sorted(repeated))}")
    if client.kind == "backend":
        raise fail(UnauthorizedClientError, "Backend clients cannot use the authorization code")
    if values.get("response_type") != "code":
        raise UnsupportedResponseTypeError(
            values.get("response_type", ""), state=state, redirect_uri=redirect_uri
        )
    if not state:
        raise fail(InvalidRequestError, "state is required")
    aud = values.get("aud")
    if not aud or fhir_base_without_slash(aud) != fhir_base_without_slash(fhir_base):
        raise fail(InvalidRequestError, f"aud must be the FHIR base URL {fhir_base}")
    challenge = values.get("code_challenge")
    if challenge:
        if values.get("code_challenge_method") != "S256":
            raise fail(InvalidRequestError, "code_challenge_method must be S256")
        if not CODE_CHALLENGE_PATTERN.match(challenge):
            raise fail(InvalidRequestError, "Malformed code_challenge")
    elif client.kind == "public":
        raise fail(InvalidRequestError, "Public clients must use PKCE (code_challenge, S256)")
    requested = parse_requested_scopes(values.get("scope"), state=state, redirect_uri=redirect_uri)
    granted = client.allowed_scopes.narrowed_to(requested)
    # System scopes are for backend services; a user-facing grant never carries them.
    granted = ScopeSet(
        tuple(s for s in granted.resource_scopes if s.context != "system"), granted.other
    )
    if not granted.resource_scopes and not granted.other:
        raise fail(InvalidScopeError, "None of the requested scopes may be granted to this client")
    context: dict[str, Any] = {}
    launch = values.get("launch")
    if launch:
        resolved = grants.resolve_launch(launch)
        if resolved is None:
            raise fail(InvalidRequestError, "Unknown or expired launch")
        context = {**resolved, "launch": "ehr"}
    elif granted.has("launch/patient"):
        context = {"launch": "standalone"}
    return {
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "scope": str(granted),
        "state": state,
        "code_challenge": challenge,
        "nonce": values.get("nonce"),
        "context": context,
    }


def needs_patient_choice(flow: dict[str, Any], user: User) -> bool:
    """True when a standalone launch asked for a patient and none is settled yet."""
    scopes = flow["scope"].split()
    return (
        "launch/patient" in scopes
        and not flow["context"].get("patient")
        and user.role is not Role.PATIENT
    )


def picker_principal(user: User, client_id: str) -> Principal:
    """The caller the patient picker searches as: the user, limited to reading Patients."""
    return Principal(
        subject=user.username,
        role=user.role,
        scopes=PICKER_SCOPES,
        client_id=client_id,
        fhir_user=user.fhir_user,
        practitioner_role=user.practitioner_role,
        organization=user.organization,
        patient=user.patient,
    )


def find_patients(
    repo: Repository,
    *,
    principal: Principal,
    fhir_base: str,
    settings: Any,
    name: str | None = None,
    patient_id: str | None = None,
) -> list[dict[str, Any]]:
    """Patients ``principal`` may see, through the repository's search (so the access policy
    applies): by name, by id, or the first page."""
    params = [("_sort", "family")]
    if name:
        params.append(("name", name))
    if patient_id is not None:
        if not ID_PATTERN.match(patient_id):
            return []
        params.append(("_id", patient_id))
    count = min(PICKER_PAGE, settings.max_page_size)
    with repo.unit(caller=principal, snapshot=False) as tx:
        page = tx.search("Patient", params, count=count, base_url=fhir_base)
    return [_patient_summary(stored.resource) for stored in page.matches]


def _patient_summary(patient: dict[str, Any]) -> dict[str, Any]:
    names = patient.get("name") or [{}]
    name = names[0]
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
    return {
        "id": patient["id"],
        "name": text or f"Patient/{patient['id']}",
        "birthDate": patient.get("birthDate", ""),
        "gender": patient.get("gender", ""),
    }


_PLAIN_SCOPES = {
    "openid": "Confirm your identity to the application",
    "fhirUser": "Tell the application which FHIR user you are",
    "profile": "Share your basic profile",
    "launch": "Open in the context of the current EHR session",
    "launch/patient": "Work with the patient you choose",
    "launch/encounter": "Work with the current encounter",
    "offline_access": "Keep access after you sign out (until revoked)",
    "online_access": "Keep access while you stay signed in",
}
_CONTEXT_TEXT = {
    "patient": "about the selected patient",
    "user": "that you can access",
    "system": "on the whole system",
}
_PERMISSION_TEXT = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def describe_scope(text: str) -> str:
    """A plain-language line for the consent screen."""
    if text in _PLAIN_SCOPES:
        return _PLAIN_SCOPES[text]
    parsed = ScopeSet.parse(text, strict=False).resource_scopes
    if not parsed:
        return text
    scope = parsed[0]
    verbs = [word for letter, word in _PERMISSION_TEXT.items() if letter in scope.permissions]
    what = "all data" if scope.resource_type == "*" else f"{scope.resource_type} resources"
    restriction = " matching " + "&".join(f"{k}={v}" for k, v in scope.restriction)
    return (
        f"{', '.join(verbs).capitalize()} {what} {_CONTEXT_TEXT[scope.context]}"
        f"{restriction if scope.restriction else ''}"
    )
