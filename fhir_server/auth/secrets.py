"""Hashing and generation of credentials: passwords, client secrets, codes and tokens.

Passwords and client secrets are hashed with argon2id (slow on purpose); authorization codes and
refresh tokens are 256-bit random strings, so a SHA-256 digest of them is as good as a slow hash
and lets the store look them up by digest. :func:`verify_password` against a dummy hash when a
user does not exist keeps the response time of a failed login independent of the user name.
"""

from __future__ import annotations

import hashlib
import secrets
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash of a password or client secret."""
    return _hasher.hash(password)


@cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored_hash``; with ``None`` a dummy hash is checked so
    that the time taken does not reveal whether the account exists."""
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random string with ``nbytes`` of entropy (codes, refresh tokens, ids)."""
    return secrets.token_urlsafe(nbytes)


def digest(token: str) -> str:
    """The SHA-256 hex digest under which a code or refresh token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()
