"""A small FHIR R4 REST client for the gateway, authorized as a SMART Backend Services client.

* Token: the token endpoint is discovered from ``<base>/.well-known/smart-configuration``
  (SMART App Launch 2.x, Conformance); the access token comes from the ``client_credentials``
  grant with a JWT client assertion signed with the client's private key, RS384 or ES384
  (https://hl7.org/fhir/smart-app-launch/backend-services.html, ``aud`` = the token endpoint).
  It is cached and renewed shortly before it expires, and once more on a 401.
* Interactions (http://hl7.org/fhir/R4/http.html): read, search (following ``next`` links),
  create (optionally conditional, ``If-None-Exist``), update and conditional update
  (``PUT [type]?criteria``) with ``If-Match`` versioning, and raw GETs (Binary content, the
  DICOMweb bridge) with the same token.

Every request goes to the origin (scheme, host, port) of the configured base, whatever origin
an absolute URL from the server names: a server behind a proxy writes its public name into
``next`` links, attachment URLs and its token endpoint, which the gateway may not reach from
inside the platform's network (``http://server:8080/fhir`` in ``docker-compose.yml``). The
assertion's ``aud`` stays the token endpoint the server names.

Errors are :class:`FhirClientError` carrying the HTTP status, the MSO error code and the
OperationOutcome's text; nothing a resource holds is logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import JWKRegistry

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
ERROR_CODE_SYSTEM = "https://mso.example.org/fhir/CodeSystem/error-code"
REFRESH_MARGIN = 60.0  # seconds before expiry a token is renewed
ASSERTION_LIFETIME = 240  # seconds; SMART caps it at five minutes
MAX_PAGES = 100

Params = Sequence[tuple[str, str]] | Mapping[str, str]


class FhirClientError(Exception):
    """A FHIR request failed: ``status`` (0: no answer), the MSO ``code`` and the server's text."""

    def __init__(self, status: int, text: str, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}{f' {code}' if code else ''}: {text}")
        self.status = status
        self.code = code
        self.text = text


def outcome_error(response: httpx.Response) -> FhirClientError:
    """The error of a failed answer, from its OperationOutcome when it has one."""
    text, code = response.reason_phrase or "error", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issue = (body.get("issue") or [{}])[0]
        details = issue.get("details") or {}
        text = issue.get("diagnostics") or details.get("text") or text
        code = next(
            (
                c.get("code")
                for c in details.get("coding") or ()
                if c.get("system") == ERROR_CODE_SYSTEM
            ),
            None,
        )
    elif isinstance(body, dict) and "error" in body:  # an OAuth error answer
        text = f"{body['error']}: {body.get('error_description', '')}".strip(": ")
    return FhirClientError(response.status_code, text, code)


def load_key(path: Path) -> dict[str, Any]:
    """The private JWK (JSON) at ``path``; a JWKS's first key is taken."""
    data = json.loads(path.read_text("utf-8"))
    if "keys" in data:
        data = data["keys"][0]
    return data


def signing_alg(jwk: Mapping[str, Any]) -> str:
    """RS384 for an RSA key, ES384 for an EC key (unless the key names its ``alg``)."""
    return str(jwk.get("alg") or {"RSA": "RS384", "EC": "ES384"}[str(jwk.get("kty"))])


class FhirClient:
    """One FHIR server, one backend-services client, one keep-alive HTTP session (thread-safe:
    httpx clients may be shared; the token cache is locked)."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        private_key: Mapping[str, Any],
        scope: str,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.client_id = client_id
        self.scope = scope
        self._jwk = dict(private_key)
        self._key = JWKRegistry.import_key(self._jwk)
        self._alg = signing_alg(self._jwk)
        self._http = http or httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0
        self._token_endpoint: str | None = None

    # -- authorization --------------------------------------------------------------------

    def token_endpoint(self) -> str:
        """The token endpoint named by ``<base>/.well-known/smart-configuration``."""
        if self._token_endpoint is None:
            response = self._send("GET", f"{self.base}/.well-known/smart-configuration")
            self._token_endpoint = str(response.json()["token_endpoint"])
        return self._token_endpoint

    def _assertion(self, audience: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": self._alg, "typ": "JWT"}
        if self._jwk.get("kid"):
            header["kid"] = self._jwk["kid"]
        return jwt.encode(header, claims, self._key, algorithms=[self._alg])

    def token(self, *, renew: bool = False) -> str:
        """A valid access token (cached; renewed ``REFRESH_MARGIN`` s before it expires)."""
        with self._lock:
            if not renew and self._token and time.monotonic() < self._expires - REFRESH_MARGIN:
                return self._token
            endpoint = self.token_endpoint()
            form = {
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self._assertion(endpoint),
            }
            body = self._send("POST", endpoint, data=form).json()
            self._token = str(body["access_token"])
            self._expires = time.monotonic() + float(body.get("expires_in", 300))
            log.debug("backend-services token obtained, %s s", body.get("expires_in"))
            return self._token

    # -- transport ------------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, self._reachable(url), **kwargs)
        except httpx.HTTPError as exc:
            raise FhirClientError(0, f"{type(exc).__name__} reaching the FHIR server") from exc
        if response.status_code >= 400:
            raise outcome_error(response)
        return response

    def _reachable(self, url: str) -> str:
        """``url`` on the configured base's origin (see the module docstring)."""
        target, base = httpx.URL(url), httpx.URL(self.base)
        if (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port):
            return url
        return str(target.copy_with(scheme=base.scheme, host=base.host, port=base.port))

    def url(self, path: str) -> str:
        """An absolute URL for ``path`` (relative to the FHIR base, or absolute already)."""
        return path if path.startswith(("http://", "https://")) else f"{self.base}/{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: str = FHIR_JSON,
    ) -> httpx.Response:
        """An authorized request; a 401 renews the token and tries once more."""
        sent = {"Accept": accept, **(headers or {})}
        content = None
        if body is not None:
            sent["Content-Type"] = FHIR_JSON
            content = json.dumps(body).encode()
        for attempt in (1, 2):
            sent["Authorization"] = f"Bearer {self.token(renew=attempt == 2)}"
            try:
                return self._send(
                    method, self.url(path), params=params, content=content, headers=sent
                )
            except FhirClientError as error:
                if error.status != 401 or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- interactions ---------------------------------------------------------------------

    def read(self, res_type: str, res_id: str) -> dict[str, Any]:
        """GET [type]/[id]."""
        return self.request("GET", f"{res_type}/{res_id}").json()

    def search(self, res_type: str, params: Params) -> list[dict[str, Any]]:
        """Every match of ``GET [type]?params`` (``mode`` match entries), pages followed."""
        return [entry["resource"] for entry in self.search_entries(res_type, params)]

    def search_entries(self, res_type: str, params: Params) -> Iterator[dict[str, Any]]:
        """The match entries of a search, page after page."""
        bundle = self.request("GET", res_type, params=params).json()
        for _ in range(MAX_PAGES):
            for entry in bundle.get("entry") or ():
                if (entry.get("search") or {}).get("mode", "match") == "match":
                    yield entry
            following = next(
                (
                    link["url"]
                    for link in bundle.get("link") or ()
                    if link.get("relation") == "next"
                ),
                None,
            )
            if not following:
                return
            bundle = self.request("GET", following).json()

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> dict[str, Any]:
        """POST [type] (conditional with ``If-None-Exist`` criteria); the stored resource."""
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        return self.request("POST", resource["resourceType"], body=resource, headers=headers).json()

    def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> dict[str, Any]:
        """PUT [type]/[id] (``If-Match`` the version id when given); the stored resource."""
        path = f"{resource['resourceType']}/{resource['id']}"
        return self.request("PUT", path, body=resource, headers=_version_headers(if_match)).json()

    def conditional_update(
        self,
        res_type: str,
        params: Params,
        resource: Mapping[str, Any],
        *,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        """PUT [type]?criteria: update the one match, or create; the stored resource."""
        headers = _version_headers(if_match)
        return self.request("PUT", res_type, params=params, body=resource, headers=headers).json()

    def get_bytes(self, path: str, *, accept: str = "*/*") -> bytes:
        """Raw content (a Binary's bytes, a DICOMweb answer) with the token."""
        return self.request("GET", path, accept=accept).content

    def close(self) -> None:
        """Close the HTTP session."""
        self._http.close()


def _version_headers(if_match: str | None) -> dict[str, str]:
    headers = {"Prefer": "return=representation"}
    if if_match is not None:
        headers["If-Match"] = f'W/"{if_match}"'
    return headers
