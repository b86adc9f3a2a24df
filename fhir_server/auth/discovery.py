"""Discovery documents: SMART configuration and OpenID Provider metadata.

http://hl7.org/fhir/smart-app-launch/conformance.html#using-well-known (SMART App Launch 2.x,
``/.well-known/smart-configuration``) and OpenID Connect Discovery 1.0 section 3
(``/.well-known/openid-configuration``). Both are derived from the issuer URL, and so is the
``security`` element of the CapabilityStatement with the ``oauth-uris`` extension (SMART App Launch
1.0, https://hl7.org/fhir/smart-app-launch/1.0.0/conformance/index.html; deprecated by 2.x in
favour of the well-known file, but still what clients such as fhirclient read):
:func:`issuer_for` and :func:`endpoints` are the one place these URLs are built.
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.assertions import ASSERTION_ALGS
from fhir_server.auth.keys import SIGNING_ALG
from fhir_server.auth.scopes import NON_RESOURCE_SCOPES

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
    *sorted(NON_RESOURCE_SCOPES),
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
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
# oauth-uris sub-extension -> endpoints() key
_OAUTH_URI_KEYS = {
    "authorize": "authorization_endpoint",
    "token": "token_endpoint",
    "introspect": "introspection_endpoint",
    "revoke": "revocation_endpoint",
}


def issuer_for(fhir_base: str, configured: str | None = None) -> str:
    """The issuer URL (the authorization server's root) belonging to the FHIR base ``fhir_base``:
    ``configured`` (``MSO_AUTH_ISSUER``) when set, else ``fhir_base`` without its ``/fhir``."""
    if configured:
        return configured.rstrip("/")
    base = fhir_base.rstrip("/")
    return base.removesuffix("/fhir")


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


def capability_security(issuer: str) -> dict[str, Any]:
    """``CapabilityStatement.rest.security``: the SMART-on-FHIR service and the ``oauth-uris``
    extension with the endpoints under ``issuer``."""
    urls = endpoints(issuer)
    return {
        "extension": [
            {
                "url": OAUTH_URIS,
                "extension": [
                    {"url": name, "valueUri": urls[key]} for name, key in _OAUTH_URI_KEYS.items()
                ],
            }
        ],
        "service": [
            {
                "coding": [
                    {
                        "system": SECURITY_SERVICE,
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "SMART App Launch",
            }
        ],
        "description": "SMART App Launch 2.x: send 'Authorization: Bearer <access token>'; "
        f"discovery at {issuer}/.well-known/smart-configuration",
    }
