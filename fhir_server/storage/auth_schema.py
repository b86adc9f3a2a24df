"""Tables of the SMART authorization server (:mod:`fhir_server.auth`), on the shared ``metadata``.

Secrets never sit in the clear: passwords and client secrets are argon2 hashes, authorization
codes and refresh tokens SHA-256 digests (they are long random strings, so a fast hash suffices).
Access tokens are self-contained JWTs; ``auth_access_token`` only records their ``jti`` so that
revocation and introspection work. Server signing keys live here too, so every worker process
signs with and publishes the same keys.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from fhir_server.storage.base_schema import PidType, metadata

auth_user = Table(
    "auth_user",
    metadata,
    Column("id", PidType, primary_key=True, autoincrement=True),
    Column("username", String(128), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("fhir_user", String(130), nullable=True),
    Column("practitioner_role", String(64), nullable=True),
    Column("organization", String(64), nullable=True),
    Column("patient", String(64), nullable=True),
    Column("email", String(320), nullable=True),  # notification emails (fhir_server.messaging)
    Column("totp_secret", String(64), nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created", DateTime(timezone=True), nullable=False),
    UniqueConstraint("username"),
)

auth_client = Table(
    "auth_client",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("kind", String(16), nullable=False),  # confidential | public | backend
    Column("secret_hash", String(255), nullable=True),
    Column("redirect_uris", Text, nullable=False),  # JSON array
    Column("scope", Text, nullable=False),  # allowed scopes, space-separated
    Column("jwks_url", Text, nullable=True),
    Column("jwks", Text, nullable=True),  # JSON Web Key Set
    Column("organization", String(64), nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created", DateTime(timezone=True), nullable=False),
)

auth_code = Table(
    "auth_code",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("username", String(128), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("code_challenge", String(128), nullable=True),
    Column("nonce", String(255), nullable=True),
    Column("context", Text, nullable=False),  # JSON: patient, encounter, fhirContext, banner
    Column("auth_time", DateTime(timezone=True), nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("used", Boolean, nullable=False, default=False),
    Index(None, "expires"),
)

auth_refresh_token = Table(
    "auth_refresh_token",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family", String(64), nullable=False),  # one per authorization grant
    Column("parent", String(64), nullable=True),  # the token this one replaced
    Column("client_id", String(128), nullable=False),
    Column("username", String(128), nullable=True),
    Column("scope", Text, nullable=False),
    Column("context", Text, nullable=False),
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("rotated", Boolean, nullable=False, default=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Index(None, "family"),
    Index(None, "expires"),
)

auth_access_token = Table(
    "auth_access_token",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("family", String(64), nullable=True),
    Column("client_id", String(128), nullable=False),
    Column("username", String(128), nullable=True),
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Index(None, "family"),
    Index(None, "expires"),
)

auth_launch = Table(
    "auth_launch",
    metadata,
    Column("launch_id", String(64), primary_key=True),
    Column("context", Text, nullable=False),  # JSON: patient, encounter, fhirContext
    Column("expires", DateTime(timezone=True), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
)

auth_assertion_jti = Table(
    "auth_assertion_jti",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires", DateTime(timezone=True), nullable=False),
    Index(None, "expires"),
)

auth_login_attempt = Table(
    "auth_login_attempt",
    metadata,
    Column("id", PidType, primary_key=True, autoincrement=True),
    Column("username", String(128), nullable=False),
    Column("source", String(64), nullable=True),
    Column("success", Boolean, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Index(None, "username", "at"),
    Index(None, "source", "at"),
    Index(None, "at"),
)

auth_server_key = Table(
    "auth_server_key",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("use", String(16), nullable=False),  # sig (JWT signing) | session (cookies, CSRF)
    Column("generation", Integer, nullable=False),
    Column("alg", String(16), nullable=False),
    Column("private_jwk", Text, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("retired", DateTime(timezone=True), nullable=True),
    # Two processes generating the first key race on this constraint; the loser re-reads.
    UniqueConstraint("use", "generation"),
)
