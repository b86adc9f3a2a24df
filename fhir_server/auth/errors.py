"""Small helpers shared by the OAuth endpoints for building RFC 6749 errors."""

from __future__ import annotations

from authlib.oauth2.rfc6749.errors import InvalidScopeError

from fhir_server.auth.scopes import ScopeError, ScopeSet


def ascii_text(text: str) -> str:
    """``text`` reduced to what an ``error_description`` may hold (RFC 6749 section 5.2:
    printable ASCII without double quote and backslash)."""
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')


def parse_requested_scopes(text: str | None, **error_args: object) -> ScopeSet:
    """Parse a requested scope string; ``invalid_scope`` when it is not valid SMART."""
    try:
        return ScopeSet.parse(text)
    except ScopeError as exc:
        raise InvalidScopeError(description=ascii_text(str(exc)), **error_args) from None
