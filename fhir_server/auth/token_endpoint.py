"""The token endpoint, transport-free: form fields in, RFC 6749 token response (or error) out.

Grants: ``authorization_code`` with PKCE (RFC 7636; SMART App Launch "Obtain access token"),
``refresh_token`` with rotation, and ``client_credentials`` with a signed client assertion (SMART
Backend Services). Responses carry the SMART launch context
(http://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html#launch-context-arrives-with-your-access_token):
``patient``, ``encounter``, ``fhirContext``, ``need_patient_banner``, ``smart_style_url``, and an
OpenID Connect ``id_token`` when ``openid`` was granted. Errors are authlib's RFC 6749 error
objects, which the HTTP layer renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from authlib.oauth2.rfc7636.challenge import CODE_VERIFIER_PATTERN, compare_s256_code_challenge

from fhir_server.auth.assertions import AssertionVerifier
from fhir_server.auth.clients import Client, ClientStore, identify_client
from fhir_server.auth.errors import parse_requested_scopes
from fhir_server.auth.grants import GrantStore
from fhir_server.auth.principal import Role
from fhir_server.auth.scopes import ScopeSet
from fhir_server.auth.tokens import TokenService
from fhir_server.auth.users import User, UserStore
from fhir_server.config import Settings


@dataclass(slots=True)
class TokenRequest:
    """One token request: the form fields, the Authorization header and the URLs involved."""

    form: dict[str, str]
    authorization: str | None
    fhir_base: str
    token_url: str
    style_url: str


@dataclass(slots=True)
class TokenResult:
    """The JSON body to return, and who it was for (for the audit record)."""

    body: dict[str, Any]
    client_id: str
    subject: str | None
    detail: str


@dataclass(slots=True)
class TokenEndpoint:
    """Handles ``POST /auth/token``."""

    settings: Settings
    tokens: TokenService
    users: UserStore
    clients: ClientStore
    grants: GrantStore
    assertions: AssertionVerifier

    def handle(self, req: TokenRequest) -> TokenResult:
        """Run one grant; raises an authlib ``OAuth2Error`` on failure."""
        grant_type = req.form.get("grant_type")
        handlers: dict[str, Callable[[TokenRequest], TokenResult]] = {
            "authorization_code": self._authorization_code,
            "refresh_token": self._refresh_token,
            "client_credentials": self._client_credentials,
        }
        if not grant_type:
            raise InvalidRequestError(description="grant_type is required")
        if grant_type not in handlers:
            raise UnsupportedGrantTypeError(grant_type)
        return handlers[grant_type](req)

    def authenticate_client(self, req: TokenRequest) -> tuple[Client, str]:
        """The calling client and its authentication method (see :func:`identify_client`)."""
        return identify_client(
            req.form,
            req.authorization,
            self.clients,
            lambda assertion: self.assertions.verify(assertion, token_url=req.token_url),
        )

    # -- grants ------------------------------------------------------------------------------------

    def _authorization_code(self, req: TokenRequest) -> TokenResult:
        client, _ = self.authenticate_client(req)
        if client.kind == "backend":
            raise UnauthorizedClientError(description="Backend clients use client_credentials")
        code = _required(req.form, "code")
        grant = self.grants.consume_code(code)
        if grant.client_id != client.client_id:
            raise InvalidGrantError(description="The code was issued to another client")
        if req.form.get("redirect_uri") != grant.redirect_uri:
            raise InvalidGrantError(description="redirect_uri does not match the authorization")
        _check_pkce(grant.code_challenge, req.form.get("code_verifier"))
        user = self._active_user(grant.username, grant.family)
        return self._issue(
            req,
            client,
            user,
            scope=grant.scope,
            context=grant.context,
            family=grant.family,
            auth_time=grant.auth_time,
            nonce=grant.nonce,
            detail="authorization_code",
        )

    def _refresh_token(self, req: TokenRequest) -> TokenResult:
        client, _ = self.authenticate_client(req)
        token = _required(req.form, "refresh_token")
        known = self.grants.find_refresh_token(token)
        scope = known.scope if known else ""
        if known and req.form.get("scope"):
            requested = req.form["scope"].split()
            if not set(requested) <= set(known.scope.split()):
                raise InvalidScopeError(description="A refresh may only narrow the scopes")
            scope = " ".join(requested)
        grant = self.grants.rotate_refresh_token(token, client_id=client.client_id)
        assert grant.username is not None
        user = self._active_user(grant.username, grant.family)
        return self._issue(
            req,
            client,
            user,
            scope=scope,
            context=grant.context,
            family=grant.family,
            auth_time=datetime.fromtimestamp(grant.context.get("auth_time", 0), UTC),
            nonce=None,
            parent=grant.token_hash,
            detail="refresh_token",
        )

    def _client_credentials(self, req: TokenRequest) -> TokenResult:
        client, method = self.authenticate_client(req)
        if client.kind != "backend" or method != "private_key_jwt":
            raise UnauthorizedClientError(
                description="client_credentials is for backend clients with a signed assertion"
            )
        requested = parse_requested_scopes(_required(req.form, "scope"))
        granted = client.allowed_scopes.narrowed_to(requested)
        system = tuple(s for s in granted.resource_scopes if s.context == "system")
        if not system:
            raise InvalidScopeError(description="None of the requested system scopes is allowed")
        scope = str(ScopeSet(system))
        access = self.tokens.issue_access_token(
            client_id=client.client_id,
            scopes=scope,
            role=Role.SYSTEM,
            organization=client.organization,
            audience=req.fhir_base,
        )
        body = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.settings.access_token_ttl,
            "scope": scope,
        }
        return TokenResult(body, client.client_id, client.client_id, "client_credentials")

    # -- helpers -----------------------------------------------------------------------------------

    def _active_user(self, username: str, family: str) -> User:
        user = self.users.get(username)
        if user is None or user.disabled:
            self.grants.revoke_family(family)
            raise InvalidGrantError(description="The user account is disabled")
        return user

    def _issue(
        self,
        req: TokenRequest,
        client: Client,
        user: User,
        *,
        scope: str,
        context: dict[str, Any],
        family: str,
        auth_time: datetime,
        nonce: str | None,
        detail: str,
        parent: str | None = None,
    ) -> TokenResult:
        scopes = ScopeSet.parse(scope, strict=False)
        patient = user.patient if user.role is Role.PATIENT else context.get("patient")
        encounter = context.get("encounter")
        access = self.tokens.issue_for_user(
            user,
            client_id=client.client_id,
            scopes=scope,
            patient=patient,
            encounter=encounter,
            audience=req.fhir_base,
            family=family,
        )
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.settings.access_token_ttl,
            "scope": scope,
        }
        offline, online = scopes.has("offline_access"), scopes.has("online_access")
        if offline or online:
            ttl = (
                self.settings.refresh_token_ttl
                if offline
                else self.settings.online_refresh_token_ttl
            )
            stored_context = {**context, "auth_time": int(auth_time.timestamp())}
            body["refresh_token"] = self.grants.create_refresh_token(
                family=family,
                client_id=client.client_id,
                username=user.username,
                scope=scope,
                context=stored_context,
                ttl=ttl,
                parent=parent,
            )
        if scopes.has("openid"):
            body["id_token"] = self.tokens.issue_id_token(
                client_id=client.client_id,
                username=user.username,
                fhir_base=req.fhir_base,
                fhir_user=user.fhir_user if scopes.has("fhirUser") else None,
                auth_time=auth_time,
                nonce=nonce,
            )
        if patient and (scopes.has("launch") or scopes.has("launch/patient")):
            body["patient"] = patient
        if encounter and (scopes.has("launch") or scopes.has("launch/encounter")):
            body["encounter"] = encounter
        if context.get("fhirContext") and scopes.has("launch"):
            body["fhirContext"] = context["fhirContext"]
        if "patient" in body or "encounter" in body or "fhirContext" in body:
            # An EHR launch happens inside the EHR, which shows its own patient banner.
            body["need_patient_banner"] = context.get("launch") != "ehr"
            body["smart_style_url"] = req.style_url
        return TokenResult(body, client.client_id, user.username, detail)


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise InvalidRequestError(description=f"{name} is required")
    return value


def _check_pkce(challenge: str | None, verifier: str | None) -> None:
    """RFC 7636 section 4.6: the verifier must hash (S256) to the stored challenge."""
    if challenge is None:
        if verifier:
            raise InvalidGrantError(description="code_verifier sent, but no code_challenge was")
        return
    if not verifier:
        raise InvalidGrantError(description="code_verifier is required")
    if not CODE_VERIFIER_PATTERN.match(verifier) or not compare_s256_code_challenge(
        verifier, challenge
    ):
        raise InvalidGrantError(description="code_verifier does not match the code_challenge")
