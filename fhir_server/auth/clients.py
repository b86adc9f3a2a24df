"""Registered client applications and client authentication at the token endpoint.

Three kinds (SMART App Launch, "Client authentication"):

* ``public`` — a browser or native app with no secret; identifies itself with ``client_id`` and
  must use PKCE;
* ``confidential`` — authenticates with a client secret (``client_secret_basic`` or
  ``client_secret_post``, RFC 6749 section 2.3.1) and/or, when it registered a JWKS, with a
  signed assertion (``private_key_jwt``, RFC 7523);
* ``backend`` — SMART Backend Services: ``client_credentials`` with a signed assertion only.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import orjson
from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fhir_server.auth.scopes import ScopeSet
from fhir_server.auth.secrets import hash_password, new_token, verify_password
from fhir_server.storage.auth_schema import auth_client
from fhir_server.storage.repository import ID_PATTERN, utc_now

KINDS = ("confidential", "public", "backend")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._~\-]{1,128}$")
DEFAULT_USER_SCOPES = (
    "openid fhirUser profile launch launch/patient launch/encounter offline_access "
    "online_access patient/*.cruds user/*.cruds"
)
DEFAULT_SYSTEM_SCOPES = "system/*.cruds"


class ClientError(ValueError):
    """A client registration that is not valid."""


@dataclass(frozen=True, slots=True)
class Client:
    """A registered client application (without its secret)."""

    client_id: str
    kind: str
    redirect_uris: tuple[str, ...]
    scope: str
    has_secret: bool
    jwks_url: str | None
    jwks: dict[str, Any] | None
    organization: str | None
    disabled: bool

    @property
    def allowed_scopes(self) -> ScopeSet:
        """The scopes this client may be granted."""
        return ScopeSet.parse(self.scope, strict=False)

    @property
    def has_keys(self) -> bool:
        """True when the client registered public keys (may use ``private_key_jwt``)."""
        return bool(self.jwks_url or self.jwks)


def _client(row) -> Client:  # type: ignore[no-untyped-def]
    return Client(
        client_id=row.client_id,
        kind=row.kind,
        redirect_uris=tuple(orjson.loads(row.redirect_uris)),
        scope=row.scope,
        has_secret=row.secret_hash is not None,
        jwks_url=row.jwks_url,
        jwks=orjson.loads(row.jwks) if row.jwks else None,
        organization=row.organization,
        disabled=row.disabled,
    )


def _check_redirect_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if (
        not parts.scheme
        or parts.fragment
        or (parts.scheme in ("http", "https") and not parts.netloc)
    ):
        raise ClientError(f"redirect URI '{uri}' must be absolute and have no fragment")


class ClientStore:
    """Register and look up clients; authenticate them at the token endpoint."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        *,
        client_id: str,
        kind: str,
        redirect_uris: list[str] | tuple[str, ...] = (),
        scope: str | None = None,
        secret: str | None = None,
        jwks_url: str | None = None,
        jwks: dict[str, Any] | None = None,
        organization: str | None = None,
    ) -> tuple[Client, str | None]:
        """Register a client; returns it and the client secret when one was generated."""
        if not _CLIENT_ID.match(client_id):
            raise ClientError("client ids are 1-128 letters, digits and . _ ~ -")
        if kind not in KINDS:
            raise ClientError(f"kind must be one of {', '.join(KINDS)}")
        for uri in redirect_uris:
            _check_redirect_uri(uri)
        if organization is not None and not ID_PATTERN.match(organization):
            raise ClientError(f"organization '{organization}' is not a valid FHIR id")
        if jwks is not None and not isinstance(jwks.get("keys"), list):
            raise ClientError("a JWKS is a JSON object with a 'keys' array")
        generated = None
        if kind == "public":
            if secret or jwks or jwks_url:
                raise ClientError("a public client has no secret and no keys")
            if not redirect_uris:
                raise ClientError("a public client needs at least one redirect URI")
        elif kind == "backend":
            if not (jwks or jwks_url):
                raise ClientError("a backend client needs --jwks-url or --jwks-file")
            if secret:
                raise ClientError("backend clients authenticate with signed assertions only")
        else:
            if not redirect_uris:
                raise ClientError("a confidential client needs at least one redirect URI")
            if secret is None and not (jwks or jwks_url):
                secret = generated = new_token(32)
        scope = scope or (DEFAULT_SYSTEM_SCOPES if kind == "backend" else DEFAULT_USER_SCOPES)
        ScopeSet.parse(scope)  # raises ScopeError for an invalid scope
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(auth_client).values(
                        client_id=client_id,
                        kind=kind,
                        secret_hash=hash_password(secret) if secret else None,
                        redirect_uris=orjson.dumps(list(redirect_uris)).decode(),
                        scope=scope,
                        jwks_url=jwks_url,
                        jwks=orjson.dumps(jwks).decode() if jwks else None,
                        organization=organization,
                        disabled=False,
                        created=utc_now(),
                    )
                )
        except IntegrityError:
            raise ClientError(f"client '{client_id}' already exists") from None
        client = self.get(client_id)
        assert client is not None
        return client, generated

    def get(self, client_id: str) -> Client | None:
        """The client ``client_id`` (disabled ones included), or ``None``."""
        row = self._row(client_id)
        return _client(row) if row else None

    def all(self) -> list[Client]:
        """Every registered client, by id."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(auth_client).order_by(auth_client.c.client_id)).all()
        return [_client(r) for r in rows]

    def set_disabled(self, client_id: str, disabled: bool = True) -> bool:
        """Disable (or re-enable) a client; its tokens stop working at once."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(auth_client)
                .where(auth_client.c.client_id == client_id)
                .values(disabled=disabled)
            )
        return result.rowcount == 1

    def check_secret(self, client_id: str, secret: str) -> Client | None:
        """The client if ``secret`` is its secret (constant time whether or not it exists)."""
        row = self._row(client_id)
        if not verify_password(row.secret_hash if row else None, secret) or row is None:
            return None
        return _client(row)

    def _row(self, client_id: str):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(
                select(auth_client).where(auth_client.c.client_id == client_id)
            ).first()


def invalid_client(description: str) -> InvalidClientError:
    """The 401 ``invalid_client`` error (RFC 6749 section 5.2)."""
    return InvalidClientError(description=description, status_code=401)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``client_id`` and secret from an ``Authorization: Basic`` header (RFC 6749 2.3.1)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("Malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise invalid_client("Malformed Basic credentials")
    return unquote_plus(client_id), unquote_plus(secret)


def identify_client(
    form: dict[str, str],
    authorization: str | None,
    clients: ClientStore,
    verify_assertion: Any,
) -> tuple[Client, str]:
    """Authenticate the client of a token, introspection or revocation request.

    Returns the client and the method used (``client_secret_basic``, ``client_secret_post``,
    ``private_key_jwt`` or ``none`` for a public client). ``verify_assertion(assertion)`` checks
    a ``private_key_jwt`` assertion and returns its client.
    """
    basic = basic_credentials(authorization)
    assertion = form.get("client_assertion")
    methods = [m for m in (basic, assertion, form.get("client_secret")) if m]
    if len(methods) > 1:
        raise InvalidRequestError(description="Use exactly one client authentication method")
    if assertion is not None:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
        client = verify_assertion(assertion)
        if form.get("client_id") not in (None, client.client_id):
            raise invalid_client("client_id does not match the assertion")
        method = "private_key_jwt"
    elif basic is not None or form.get("client_secret"):
        client_id, secret = basic or (form.get("client_id", ""), form["client_secret"])
        found = clients.check_secret(client_id, secret)
        if found is None:
            raise invalid_client("Client authentication failed")
        client = found
        method = "client_secret_basic" if basic else "client_secret_post"
    else:
        found = clients.get(form.get("client_id", ""))
        if found is None or found.kind != "public":
            raise invalid_client("Client authentication failed")
        client, method = found, "none"
    if client.disabled:
        raise invalid_client("Client authentication failed")
    return client, method
