"""The authorization server's parts, built once per process by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from fhir_server.auth.assertions import AssertionVerifier
from fhir_server.auth.clients import ClientStore
from fhir_server.auth.grants import GrantStore
from fhir_server.auth.keys import KeyStore
from fhir_server.auth.login import LoginService
from fhir_server.auth.session import FlowSigner
from fhir_server.auth.token_endpoint import TokenEndpoint
from fhir_server.auth.tokens import TokenService
from fhir_server.auth.users import UserStore
from fhir_server.config import Settings


@dataclass
class AuthServer:
    """Stores and services of the authorization server (``app.state.auth``)."""

    settings: Settings
    keys: KeyStore
    tokens: TokenService
    users: UserStore
    clients: ClientStore
    grants: GrantStore
    logins: LoginService
    assertions: AssertionVerifier
    token_endpoint: TokenEndpoint
    _flows: FlowSigner | None = field(default=None, repr=False)

    @property
    def flows(self) -> FlowSigner:
        """Signer of login-page flows (built on first use: its secret lives in the database)."""
        if self._flows is None:
            self._flows = FlowSigner(self.keys.session_secret(), ttl=self.settings.auth_flow_ttl)
        return self._flows


def build_auth_server(
    engine: Engine, settings: Settings, *, tokens: TokenService | None = None
) -> AuthServer:
    """Wire the authorization server over ``engine`` (reusing ``tokens`` when given, so the FHIR
    endpoint and the token endpoint share one key cache); touches no table until first use."""
    tokens = tokens or TokenService(engine, settings)
    keys = tokens.keys
    users = UserStore(engine)
    clients = ClientStore(engine)
    grants = GrantStore(engine)
    assertions = AssertionVerifier(engine, clients, allow_remote_jwks=settings.allow_remote_jwks)
    return AuthServer(
        settings=settings,
        keys=keys,
        tokens=tokens,
        users=users,
        clients=clients,
        grants=grants,
        logins=LoginService(engine, users, settings),
        assertions=assertions,
        token_endpoint=TokenEndpoint(settings, tokens, users, clients, grants, assertions),
    )
