"""``private_key_jwt`` client assertions (RFC 7523 section 3; SMART Backend Services,
http://hl7.org/fhir/smart-app-launch/backend-services.html#authenticating-to-the-token-endpoint).

The assertion must be signed RS384 or ES384 with a key from the client's registered JWKS (inline,
or fetched from its JWKS URL — loopback hosts only unless ``allow_remote_jwks``, since fetching
arbitrary URLs on a client's say-so would let anyone make the server call into its own network),
name the client as both ``iss`` and ``sub``, have the token endpoint URL as ``aud``, expire at
most five minutes ahead, and carry a ``jti`` never seen before (kept until the assertion would
have expired anyway).
"""

from __future__ import annotations

import ipaddress
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Engine, delete, insert
from sqlalchemy.exc import IntegrityError

from fhir_server.auth.clients import Client, ClientStore, invalid_client
from fhir_server.storage.auth_schema import auth_assertion_jti
from fhir_server.storage.repository import utc_now

ASSERTION_ALGS = ("RS384", "ES384")
MAX_LIFETIME = 300  # seconds; SMART: "no more than five minutes in the future"
CLOCK_SKEW = 5
JWKS_FETCH_TIMEOUT = 5.0
JWKS_MAX_BYTES = 256 * 1024


def is_loopback_url(url: str) -> bool:
    """True for an http(s) URL whose host is a loopback name or address."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AssertionVerifier:
    """Checks client assertions against registered keys and remembers used ``jti`` values."""

    def __init__(self, engine: Engine, clients: ClientStore, *, allow_remote_jwks: bool) -> None:
        self.engine = engine
        self.clients = clients
        self.allow_remote_jwks = allow_remote_jwks

    def verify(self, assertion: str, *, token_url: str) -> Client:
        """The client that signed ``assertion`` for ``token_url``; raises ``invalid_client``."""
        try:
            compact = jws.extract_compact(assertion.encode())
            header = compact.headers()
            claims = orjson.loads(compact.payload)
        except (JoseError, ValueError, orjson.JSONDecodeError):
            raise invalid_client("The client assertion is not a valid JWT") from None
        if not isinstance(claims, dict):
            raise invalid_client("The client assertion is not a valid JWT")
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise invalid_client(
                f"Client assertions must be signed with {' or '.join(ASSERTION_ALGS)}"
            )
        if not header.get("kid"):
            raise invalid_client("The client assertion header needs a kid")
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id:
            raise invalid_client("The assertion's iss and sub must both be the client_id")
        client = self.clients.get(client_id)
        if client is None or client.disabled or not client.has_keys:
            raise invalid_client("Unknown client or client without registered keys")
        keys = self._key_set(client)
        try:
            jwt.decode(assertion, keys, algorithms=[alg])
        except (JoseError, ValueError):
            raise invalid_client("The client assertion signature does not verify") from None
        self._check_claims(claims, token_url)
        self._remember_jti(client_id, claims["jti"], claims["exp"])
        return client

    @staticmethod
    def _check_claims(claims: dict[str, Any], token_url: str) -> None:
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            raise invalid_client("The client assertion needs an exp claim")
        if exp + CLOCK_SKEW < now:
            raise invalid_client("The client assertion has expired")
        if exp > now + MAX_LIFETIME + CLOCK_SKEW:
            raise invalid_client("The client assertion's exp is more than five minutes ahead")
        aud = claims.get("aud")
        if token_url not in (aud if isinstance(aud, list) else [aud]):
            raise invalid_client(f"The client assertion's aud must be {token_url}")
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise invalid_client("The client assertion needs a jti claim")

    def _key_set(self, client: Client) -> KeySet:
        data = client.jwks if client.jwks is not None else self._fetch(client.jwks_url or "")
        try:
            return KeySet.import_key_set(data)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError):
            raise invalid_client("The client's registered JWKS cannot be read") from None

    def _fetch(self, url: str) -> dict[str, Any]:
        if not is_loopback_url(url) and not (
            self.allow_remote_jwks and urlsplit(url).scheme == "https"
        ):
            raise invalid_client("The client's JWKS URL is not allowed on this server")
        try:
            with urllib.request.urlopen(url, timeout=JWKS_FETCH_TIMEOUT) as response:
                body = response.read(JWKS_MAX_BYTES + 1)
            if len(body) > JWKS_MAX_BYTES:
                raise ValueError("too large")
            data = orjson.loads(body)
        except (OSError, ValueError, orjson.JSONDecodeError):
            raise invalid_client("The client's JWKS URL cannot be fetched") from None
        if not isinstance(data, dict):
            raise invalid_client("The client's JWKS URL does not serve a JWKS")
        return data

    def _remember_jti(self, client_id: str, jti: str, exp: float) -> None:
        now = utc_now()
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(auth_assertion_jti).where(auth_assertion_jti.c.expires < now))
                conn.execute(
                    insert(auth_assertion_jti).values(
                        client_id=client_id,
                        jti=jti[:255],
                        expires=datetime.fromtimestamp(exp + CLOCK_SKEW, UTC),
                    )
                )
        except IntegrityError:
            raise invalid_client("The client assertion's jti was already used") from None
