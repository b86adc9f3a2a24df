"""Discovery documents: SMART configuration and OpenID Provider metadata.

http://hl7.org/fhir/smart-app-launch/conformance.html#using-well-known (SMART App Launch 2.x,
``/.well-known/smart-configuration``) and OpenID Connect Discovery 1.0 section 3
(``/.well-known/openid-configuration``). Both are derived from the issuer URL.
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.assertions import ASSERTION_ALGS
from fhir_server.auth.keys import SIGNING_ALG

CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-passthrough-banner",
    "context-passthrough-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "authorize-post",
]
SCOPES_SUPPORTED = [
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/*.read",
    "patient/*.write",
    "patient/*.*",
    "user/*.cruds",
    "user/*.rs",
    "user/*.read",
    "user/*.write",
    "user/*.*",
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
]
GRANT_TYPES = ["authorization_code", "refresh_token", "client_credentials"]
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


def endpoints(issuer: str) -> dict[str, str]:
    """The endpoint URLs under ``issuer``."""
    return {
        "authorization_endpoint": f"{issuer}/auth/authorize",
        "token_endpoint": f"{issuer}/auth/token",
        "jwks_uri": f"{issuer}/auth/jwks",
        "introspection_endpoint": f"{issuer}/auth/introspect",
        "revocation_endpoint": f"{issuer}/auth/revoke",
    }


def smart_configuration(issuer: str) -> dict[str, Any]:
    """The ``.well-known/smart-configuration`` document."""
    return {
        "issuer": issuer,
        **endpoints(issuer),
        "grant_types_supported": GRANT_TYPES,
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": CAPABILITIES,
    }


def openid_configuration(issuer: str) -> dict[str, Any]:
    """The ``.well-known/openid-configuration`` document."""
    return {
        "issuer": issuer,
        **endpoints(issuer),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [SIGNING_ALG],
        "scopes_supported": ["openid", "fhirUser", "profile", "offline_access"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
        "grant_types_supported": GRANT_TYPES,
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "code_challenge_methods_supported": ["S256"],
    }
