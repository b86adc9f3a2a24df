"""Signed paging cursors: the ``_cursor`` of search, history and AuditEvent pages.

A cursor is the server's own state handed to the client (keyset position, snapshot bound,
total), so it is sealed with an HMAC and never parsed unless the MAC is right: a tampered,
truncated or foreign cursor is refused before any of its content reaches SQL.

Format: ``<payload>.<mac>``, both unpadded base64url; ``payload`` is the JSON the caller gave,
``mac`` is HMAC-SHA256 over ``purpose NUL payload`` (a history cursor is no search cursor).

Key: derived (HMAC-SHA256 with a fixed label) from the server's session secret, the ``session``
row of ``auth_server_key`` (:mod:`fhir_server.auth.keys` signs cookies and CSRF tokens with it).
The row is created on first use if the authorization server has not made it yet, in the same
JWK form and with the same race handling (the loser of the ``(use, generation)`` race reads the
winner's row), so every worker process shares the key and it survives restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from fhir_server.storage.auth_schema import auth_server_key
from fhir_server.storage.engine import WRITE_OPTION
from fhir_server.storage.records import utc_now

_LABEL = b"mso-paging-cursor-v1"
_SESSION_USE = "session"
_keys: WeakKeyDictionary[Engine, bytes] = WeakKeyDictionary()
_lock = threading.Lock()


def cursor_key(engine: Engine) -> bytes:
    """The key that signs paging cursors on ``engine``'s database (read once per process)."""
    key = _keys.get(engine)
    if key is None:
        with _lock:
            key = _keys.get(engine)
            if key is None:
                secret = session_secret(engine)
                key = hmac.new(secret, _LABEL, hashlib.sha256).digest()
                _keys[engine] = key
    return key


def seal(payload: Any, key: bytes, purpose: str) -> str:
    """``payload`` (JSON-serialisable) as a signed, opaque cursor for ``purpose``."""
    body = orjson.dumps(payload)
    return f"{_b64(body)}.{_b64(_mac(key, purpose, body))}"


def unseal(token: str | None, key: bytes, purpose: str) -> Any | None:
    """The payload of a cursor :func:`seal` made for ``purpose`` with ``key``; ``None`` for
    anything else (tampered, truncated, another purpose's, another server's, not a cursor)."""
    if not token or not token.isascii():
        return None
    body_part, dot, mac_part = token.partition(".")
    if not dot:
        return None
    try:
        body, mac = _unb64(body_part), _unb64(mac_part)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(key, purpose, body)):
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:  # pragma: no cover - only a key compromise gets here
        return None


def _mac(key: bytes, purpose: str, body: bytes) -> bytes:
    return hmac.new(key, purpose.encode() + b"\x00" + body, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_secret(engine: Engine) -> bytes:
    """The raw bytes of the server's session secret (``auth_server_key`` row ``session``),
    created once, shared by every process, if missing: it signs cookies and CSRF tokens
    (:class:`fhir_server.auth.keys.KeyStore`) and, derived, paging cursors."""
    secret = _read_session_secret(engine)
    if secret is None:
        try:
            writing = engine.connect().execution_options(**{WRITE_OPTION: True})
            with writing as conn, conn.begin():
                conn.execute(insert(auth_server_key).values(**_new_session_row()))
        except IntegrityError:
            pass  # another process created it first
        secret = _read_session_secret(engine)
    assert secret is not None
    return secret


def _read_session_secret(engine: Engine) -> bytes | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(auth_server_key.c.private_jwk)
            .where(auth_server_key.c.use == _SESSION_USE)
            .order_by(auth_server_key.c.generation.desc())
            .limit(1)
        ).first()
    if row is None:
        return None
    return _unb64(orjson.loads(row.private_jwk)["k"])


def _new_session_row() -> dict[str, Any]:
    """A new ``session`` row: a 256-bit secret as an oct JWK."""
    jwk = {"k": _b64(secrets.token_bytes(32)), "kty": "oct"}
    return {
        "kid": secrets.token_urlsafe(12),
        "use": _SESSION_USE,
        "generation": 1,
        "alg": "HS256",
        "private_jwk": orjson.dumps(jwk).decode(),
        "created": utc_now(),
    }
