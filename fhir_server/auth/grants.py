"""Authorization codes, refresh tokens and EHR launch contexts (stored as digests, single use).

* Codes (RFC 6749 section 4.1.2) live ``auth_code_ttl`` seconds and are consumed by an atomic
  ``UPDATE … WHERE used = false``; presenting a used code again revokes every token issued from
  it (section 4.1.2: "SHOULD revoke … all tokens previously issued based on that code").
* Refresh tokens rotate on every use (OAuth 2.0 Security BCP, section 4.14.2): each grant is a
  *family*; the old token is marked ``rotated`` and a new one issued; presenting a rotated token
  again means it leaked, so the whole family — refresh and access tokens — is revoked.
* Launch contexts are what an EHR hands an app at launch (patient, encounter, fhirContext),
  keyed by the opaque ``launch`` value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from authlib.oauth2.rfc6749.errors import InvalidGrantError
from sqlalchemy import Engine, delete, insert, select, update

from fhir_server.auth.secrets import digest, new_token
from fhir_server.storage.auth_schema import (
    auth_access_token,
    auth_code,
    auth_launch,
    auth_refresh_token,
)
from fhir_server.storage.repository import as_utc, utc_now


@dataclass(frozen=True, slots=True)
class CodeGrant:
    """What a consumed authorization code stood for. ``family`` ties its tokens together."""

    family: str
    client_id: str
    username: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    nonce: str | None
    context: dict[str, Any]
    auth_time: datetime


@dataclass(frozen=True, slots=True)
class RefreshGrant:
    """A refresh token's grant: the family, its owner and what it may be exchanged for."""

    token_hash: str
    family: str
    client_id: str
    username: str | None
    scope: str
    context: dict[str, Any]
    expires: datetime
    active: bool


class GrantStore:
    """Codes, refresh tokens and launch contexts in the database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- authorization codes ---------------------------------------------------------------------

    def create_code(
        self,
        *,
        client_id: str,
        username: str,
        redirect_uri: str,
        scope: str,
        code_challenge: str | None,
        nonce: str | None,
        context: dict[str, Any],
        auth_time: datetime,
        ttl: int,
    ) -> str:
        """Store a new authorization code and return it (only its digest is kept)."""
        code = new_token(32)
        now = utc_now()
        with self.engine.begin() as conn:
            conn.execute(delete(auth_code).where(auth_code.c.expires < now - timedelta(hours=1)))
            conn.execute(
                insert(auth_code).values(
                    code_hash=digest(code),
                    client_id=client_id,
                    username=username,
                    redirect_uri=redirect_uri,
                    scope=scope,
                    code_challenge=code_challenge,
                    nonce=nonce,
                    context=orjson.dumps(context).decode(),
                    auth_time=auth_time,
                    expires=now + timedelta(seconds=ttl),
                    used=False,
                )
            )
        return code

    def consume_code(self, code: str) -> CodeGrant:
        """Mark ``code`` used and return its grant; ``invalid_grant`` if unknown, expired or
        already used (then every token issued from it is revoked)."""
        code_hash = digest(code)
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(auth_code)
                .where(auth_code.c.code_hash == code_hash, auth_code.c.used.is_(False))
                .values(used=True)
            ).rowcount
            row = conn.execute(select(auth_code).where(auth_code.c.code_hash == code_hash)).first()
        if row is None:
            raise InvalidGrantError(description="Unknown authorization code")
        if not claimed:
            self.revoke_family(code_hash)
            raise InvalidGrantError(description="The authorization code was already used")
        if as_utc(row.expires) < utc_now():
            raise InvalidGrantError(description="The authorization code has expired")
        return CodeGrant(
            family=code_hash,
            client_id=row.client_id,
            username=row.username,
            redirect_uri=row.redirect_uri,
            scope=row.scope,
            code_challenge=row.code_challenge,
            nonce=row.nonce,
            context=orjson.loads(row.context),
            auth_time=as_utc(row.auth_time),
        )

    # -- refresh tokens --------------------------------------------------------------------------

    def create_refresh_token(
        self,
        *,
        family: str,
        client_id: str,
        username: str | None,
        scope: str,
        context: dict[str, Any],
        ttl: int,
        parent: str | None = None,
    ) -> str:
        """Store a new refresh token of ``family`` and return it."""
        token = new_token(32)
        now = utc_now()
        with self.engine.begin() as conn:
            conn.execute(
                insert(auth_refresh_token).values(
                    token_hash=digest(token),
                    family=family,
                    parent=parent,
                    client_id=client_id,
                    username=username,
                    scope=scope,
                    context=orjson.dumps(context).decode(),
                    expires=now + timedelta(seconds=ttl),
                    rotated=False,
                    revoked=False,
                    created=now,
                )
            )
        return token

    def find_refresh_token(self, token: str) -> RefreshGrant | None:
        """The grant of a refresh token (``active`` False once rotated, revoked or expired)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(auth_refresh_token).where(auth_refresh_token.c.token_hash == digest(token))
            ).first()
        if row is None:
            return None
        expires = as_utc(row.expires)
        return RefreshGrant(
            token_hash=row.token_hash,
            family=row.family,
            client_id=row.client_id,
            username=row.username,
            scope=row.scope,
            context=orjson.loads(row.context),
            expires=expires,
            active=not (row.rotated or row.revoked) and expires > utc_now(),
        )

    def rotate_refresh_token(self, token: str, *, client_id: str) -> RefreshGrant:
        """Use up a refresh token of ``client_id``; ``invalid_grant`` if it cannot be used.

        A token that was already rotated is a leaked one: its family is revoked.
        """
        grant = self.find_refresh_token(token)
        if grant is None or grant.client_id != client_id:
            raise InvalidGrantError(description="Unknown refresh token")
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(auth_refresh_token)
                .where(
                    auth_refresh_token.c.token_hash == grant.token_hash,
                    auth_refresh_token.c.rotated.is_(False),
                    auth_refresh_token.c.revoked.is_(False),
                )
                .values(rotated=True)
            ).rowcount
        if not claimed:
            self.revoke_family(grant.family)
            raise InvalidGrantError(description="The refresh token was already used or revoked")
        if grant.expires < utc_now():
            raise InvalidGrantError(description="The refresh token has expired")
        return grant

    def revoke_family(self, family: str) -> None:
        """Revoke every refresh and access token issued under one grant."""
        with self.engine.begin() as conn:
            conn.execute(
                update(auth_refresh_token)
                .where(auth_refresh_token.c.family == family)
                .values(revoked=True)
            )
            conn.execute(
                update(auth_access_token)
                .where(auth_access_token.c.family == family)
                .values(revoked=True)
            )

    # -- launch contexts -------------------------------------------------------------------------

    def create_launch(
        self,
        *,
        patient: str | None,
        encounter: str | None = None,
        fhir_context: list[str] | None = None,
        ttl: int,
    ) -> str:
        """Store an EHR launch context and return its opaque ``launch`` value."""
        launch_id = new_token(24)
        now = utc_now()
        context: dict[str, Any] = {"patient": patient, "encounter": encounter}
        if fhir_context:
            context["fhirContext"] = [{"reference": ref} for ref in fhir_context]
        with self.engine.begin() as conn:
            conn.execute(delete(auth_launch).where(auth_launch.c.expires < now))
            conn.execute(
                insert(auth_launch).values(
                    launch_id=launch_id,
                    context=orjson.dumps({k: v for k, v in context.items() if v}).decode(),
                    expires=now + timedelta(seconds=ttl),
                    created=now,
                )
            )
        return launch_id

    def resolve_launch(self, launch_id: str) -> dict[str, Any] | None:
        """The context of an unexpired launch, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(auth_launch).where(auth_launch.c.launch_id == launch_id)
            ).first()
        if row is None or as_utc(row.expires) < utc_now():
            return None
        return orjson.loads(row.context)
