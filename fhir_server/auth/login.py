"""Password (+ TOTP) login with rate limiting and lockout, shared by all worker processes.

Failed attempts are rows in ``auth_login_attempt``, so the limits hold across processes. A user
name is locked for ``login_lockout`` seconds once ``login_max_failures`` failures (since its last
successful login) fall within ``login_failure_window`` seconds; a client address likewise after
``login_max_failures_per_source``. While locked, the password is not even checked. Credentials
are compared in constant time with respect to whether the account exists (a dummy argon2 hash is
verified for unknown names), and failures never say which part was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import Engine, delete, func, insert, select

from fhir_server.auth.secrets import verify_password
from fhir_server.auth.users import User, UserStore
from fhir_server.config import Settings
from fhir_server.storage.auth_schema import auth_login_attempt as attempt
from fhir_server.storage.repository import as_utc, utc_now


class LoginFailed(Exception):
    """A login that did not succeed; ``locked_until`` is set when a lockout is in force."""

    def __init__(self, message: str, *, locked_until: datetime | None = None) -> None:
        super().__init__(message)
        self.locked_until = locked_until


@dataclass(frozen=True, slots=True)
class _Limits:
    per_user: int
    per_source: int
    window: timedelta
    lockout: timedelta


class LoginService:
    """Checks credentials and enforces the failure limits."""

    def __init__(self, engine: Engine, users: UserStore, settings: Settings) -> None:
        self.engine = engine
        self.users = users
        self.limits = _Limits(
            settings.login_max_failures,
            settings.login_max_failures_per_source,
            timedelta(seconds=settings.login_failure_window),
            timedelta(seconds=settings.login_lockout),
        )

    def login(
        self, username: str, password: str, totp_code: str | None, *, source: str | None
    ) -> User:
        """The user whose credentials these are; raises :class:`LoginFailed` otherwise."""
        username = username.strip()[:128]
        locked_until = self.locked_until(username, source)
        if locked_until is not None:
            raise LoginFailed("Too many failed logins; try again later", locked_until=locked_until)
        user, password_hash, totp_secret = self.users.credentials(username)
        ok = verify_password(password_hash, password)
        if ok and totp_secret is not None:
            ok = bool(totp_code) and pyotp.TOTP(totp_secret).verify(
                (totp_code or "").strip(), valid_window=1
            )
        if ok and user is not None and user.disabled:
            ok = False
        self._record(username, source, ok)
        if not ok or user is None:
            raise LoginFailed("Unknown user name or wrong password or one-time code")
        return user

    def locked_until(self, username: str, source: str | None) -> datetime | None:
        """When the current lockout of this user name or address ends (``None``: not locked)."""
        now = utc_now()
        horizon = now - self.limits.window - self.limits.lockout
        with self.engine.connect() as conn:
            last_success = conn.execute(
                select(func.max(attempt.c.at)).where(
                    attempt.c.username == username, attempt.c.success.is_(True)
                )
            ).scalar()
            since = max(horizon, as_utc(last_success)) if last_success else horizon
            user_failures = self._failures(conn, attempt.c.username == username, since)
            source_failures = (
                self._failures(conn, attempt.c.source == source, horizon) if source else []
            )
        ends = [
            end
            for failures, limit in (
                (user_failures, self.limits.per_user),
                (source_failures, self.limits.per_source),
            )
            if (end := self._lock_end(failures, limit, now)) is not None
        ]
        return max(ends) if ends else None

    @staticmethod
    def _failures(conn, condition, since: datetime) -> list[datetime]:  # type: ignore[no-untyped-def]
        rows = conn.execute(
            select(attempt.c.at)
            .where(condition, attempt.c.success.is_(False), attempt.c.at > since)
            .order_by(attempt.c.at)
        ).scalars()
        return [as_utc(at) for at in rows]

    def _lock_end(self, failures: list[datetime], limit: int, now: datetime) -> datetime | None:
        """The end of the latest lockout: ``limit`` failures within the window lock until the
        last of them plus the lockout period."""
        end = None
        for i in range(limit - 1, len(failures)):
            if failures[i] - failures[i - limit + 1] <= self.limits.window:
                candidate = failures[i] + self.limits.lockout
                if candidate > now:
                    end = candidate if end is None else max(end, candidate)
        return end

    def _record(self, username: str, source: str | None, success: bool) -> None:
        now = utc_now()
        with self.engine.begin() as conn:
            conn.execute(
                insert(attempt).values(
                    username=username, source=source and source[:64], success=success, at=now
                )
            )
            # Attempts older than any window that could still matter are dropped as we go.
            conn.execute(
                delete(attempt).where(attempt.c.at < now - self.limits.window - self.limits.lockout)
            )
