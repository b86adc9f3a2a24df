"""State of one browser's way through login, patient choice and consent, kept on the client.

The browser holds a random session id in an HttpOnly cookie. Each form carries the *flow* — the
validated authorization request plus what has been settled so far (user, patient) — serialized
and signed with the server's session secret and bound to that session id, and a CSRF token
derived from the same id. A form posted from another site lacks the cookie (SameSite=Lax) or the
matching token; a flow copied out of one browser is useless in another. Both expire after
``auth_flow_ttl`` seconds.
"""

from __future__ import annotations

import hmac
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from fhir_server.auth.secrets import new_token

SESSION_COOKIE = "mso_auth_sid"


class FlowError(Exception):
    """A form whose flow or CSRF token is missing, forged, expired or from another session."""


class FlowSigner:
    """Signs and checks flows and CSRF tokens with the server's session secret."""

    def __init__(self, secret: bytes, *, ttl: int) -> None:
        self.ttl = ttl
        self._flows = URLSafeTimedSerializer(secret, salt="mso-auth-flow")
        self._csrf = URLSafeTimedSerializer(secret, salt="mso-auth-csrf")

    @staticmethod
    def new_session_id() -> str:
        """A fresh random session id for the cookie."""
        return new_token(24)

    def csrf_token(self, sid: str) -> str:
        """The CSRF token for forms shown to session ``sid``."""
        return self._csrf.dumps(sid)

    def check_csrf(self, sid: str | None, token: str | None) -> None:
        """Raise :class:`FlowError` unless ``token`` was made for session ``sid``."""
        if not sid or not token:
            raise FlowError("The form is missing its session or CSRF token")
        try:
            owner = self._csrf.loads(token, max_age=self.ttl)
        except BadSignature:
            raise FlowError("The form's CSRF token is invalid or expired") from None
        if not isinstance(owner, str) or not hmac.compare_digest(owner, sid):
            raise FlowError("The form's CSRF token belongs to another session")

    def dump(self, flow: dict[str, Any], sid: str) -> str:
        """Serialize and sign ``flow`` for session ``sid``."""
        return self._flows.dumps({"sid": sid, "flow": flow})

    def load(self, token: str | None, sid: str | None) -> dict[str, Any]:
        """The flow signed for session ``sid``; raises :class:`FlowError` otherwise."""
        if not token or not sid:
            raise FlowError("The authorization request is missing; start again from the app")
        try:
            data = self._flows.loads(token, max_age=self.ttl)
        except BadSignature:
            raise FlowError("The authorization request expired; start again from the app") from None
        if not isinstance(data, dict) or not hmac.compare_digest(str(data.get("sid")), sid):
            raise FlowError("The authorization request belongs to another browser session")
        return data["flow"]
