"""The server's own keys, kept in the database so that every worker process shares them.

Two kinds: ``sig`` — RSA keys that sign access tokens and ID tokens (RS256; the public halves
are published at the JWKS endpoint, https://datatracker.ietf.org/doc/html/rfc7517), and
``session`` — an HMAC secret for the login pages' signed cookies and CSRF tokens.

The first key of a kind is generated on first use. Two processes doing that at once race on the
``(use, generation)`` unique constraint; the loser reads the winner's key. :meth:`KeyStore.rotate`
adds a new generation and retires the old one, whose public key stays in the JWKS for
``RETIRED_KEY_GRACE`` so that tokens it signed still verify. Each process caches the keys and
re-reads them every ``REFRESH_SECONDS`` (or on an unknown ``kid``), so a rotation done by one
process (``mso key rotate``) reaches the others without a restart.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from joserfc.jwk import RSAKey
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from fhir_server.auth.secrets import new_token
from fhir_server.storage.auth_schema import auth_server_key
from fhir_server.storage.cursors import session_secret
from fhir_server.storage.engine import WRITE_OPTION
from fhir_server.storage.repository import as_utc, utc_now

SIGNING_ALG = "RS256"
REFRESH_SECONDS = 60.0
UNKNOWN_KID_RELOAD_SECONDS = 5.0
RETIRED_KEY_GRACE = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    jwk: RSAKey
    public: RSAPublicKey
    retired: bool


class KeyStore:
    """Signing keys and the session secret, read from (and created in) the database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._keys: dict[str, _SigningKey] = {}
        self._current: _SigningKey | None = None
        self._loaded_at = 0.0
        self._session_secret: bytes | None = None

    # -- signing keys --------------------------------------------------------------------------

    def signing_key(self) -> tuple[str, RSAKey]:
        """The ``kid`` and private key that sign new tokens."""
        self._refresh_if_stale()
        assert self._current is not None
        return self._current.kid, self._current.jwk

    def public_key(self, kid: str) -> RSAPublicKey | None:
        """The public key with ``kid`` (a cryptography object, ready to verify), or ``None``."""
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._loaded_at > UNKNOWN_KID_RELOAD_SECONDS:
            self._load()
            key = self._keys.get(kid)
        elif key is not None:
            self._refresh_if_stale()
        return key.public if key else None

    def jwk(self, kid: str) -> RSAKey | None:
        """The key with ``kid`` as a joserfc key (private part included), or ``None``."""
        self._refresh_if_stale()
        key = self._keys.get(kid)
        return key.jwk if key else None

    def jwks(self) -> dict:
        """The public JSON Web Key Set: the current key and recently retired ones."""
        self._refresh_if_stale()
        return {"keys": [k.jwk.as_dict(private=False) for k in self._keys.values()]}

    def rotate(self) -> str:
        """Start signing with a new key; the old one is retired but still published."""
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
            latest = conn.execute(
                select(func.max(auth_server_key.c.generation)).where(auth_server_key.c.use == "sig")
            ).scalar()
            conn.execute(
                update(auth_server_key)
                .where(auth_server_key.c.use == "sig", auth_server_key.c.retired.is_(None))
                .values(retired=utc_now())
            )
            kid = self._insert_signing_key(conn, (latest or 0) + 1)
        self._load()
        return kid

    # -- session secret --------------------------------------------------------------------------

    def session_secret(self) -> bytes:
        """The HMAC secret for signed cookies and CSRF tokens (shared by all processes)."""
        if self._session_secret is None:
            self._session_secret = session_secret(self.engine)
        return self._session_secret

    # -- loading -----------------------------------------------------------------------------------

    def _row(self, use: str):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(
                select(auth_server_key)
                .where(auth_server_key.c.use == use)
                .order_by(auth_server_key.c.generation.desc())
                .limit(1)
            ).first()

    def _refresh_if_stale(self) -> None:
        if self._current is None or time.monotonic() - self._loaded_at > REFRESH_SECONDS:
            self._load()

    def _load(self) -> None:
        with self._lock:
            rows = self._read_signing_rows()
            if not rows:
                try:
                    with self.engine.begin() as conn:
                        self._insert_signing_key(conn, 1)
                except IntegrityError:
                    pass  # another process generated the first key at the same moment
                rows = self._read_signing_rows()
            keys: dict[str, _SigningKey] = {}
            for row in rows:
                jwk = RSAKey.import_key(orjson.loads(row.private_jwk))
                keys[row.kid] = _SigningKey(
                    row.kid, jwk, jwk.public_key, retired=row.retired is not None
                )
            self._keys = keys
            # rows come newest generation first
            self._current = keys[rows[0].kid]
            self._loaded_at = time.monotonic()

    def _read_signing_rows(self) -> list:
        cutoff = utc_now() - RETIRED_KEY_GRACE
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(auth_server_key)
                .where(auth_server_key.c.use == "sig")
                .order_by(auth_server_key.c.generation.desc())
            ).all()
        return [r for r in rows if r.retired is None or as_utc(r.retired) > cutoff]

    @staticmethod
    def _insert_signing_key(conn, generation: int) -> str:  # type: ignore[no-untyped-def]
        kid = new_token(12)
        key = RSAKey.generate_key(
            2048, parameters={"kid": kid, "alg": SIGNING_ALG, "use": "sig"}, private=True
        )
        conn.execute(
            insert(auth_server_key).values(
                kid=kid,
                use="sig",
                generation=generation,
                alg=SIGNING_ALG,
                private_jwk=orjson.dumps(key.as_dict(private=True)).decode(),
                created=utc_now(),
            )
        )
        return kid
