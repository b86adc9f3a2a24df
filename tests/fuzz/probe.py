"""Send a :class:`FuzzRequest` to the app and check the invariants every answer must keep.

The invariants (issue 21, "What must hold afterwards"):

1. never a 5xx, except a deliberate 501 or 503 that carries an OperationOutcome;
2. every 4xx is an OperationOutcome (``application/fhir+json``) with an issue coded ``MSO-…``;
3. every request is audited: its AuditEvent is in the trail once the audit log is flushed.
   Each request comes from its own client address (the test client's ``client`` tuple), which
   the AuditEvent records as the requestor's network address (column ``address``): that is the
   correlation. Exempt: ``metadata`` (never audited, by design); requests no route serves
   (404 ``MSO-REST-404P``, 405 ``MSO-REST-405M``, an id that is not an id) are audited too;
4. what answers FHIR JSON parses, and a Bundle's ``total`` is an integer.

A violation fails with the request, the status, the body's head and the head of the server's
traceback when it logged one.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
from fastapi.testclient import TestClient
from hypothesis import reject
from sqlalchemy import func, select

from fhir_server.interactions import capabilities
from fhir_server.interactions.base import FhirRequest
from fhir_server.interactions.table import resolve_route
from fhir_server.storage.audit_schema import audit_event
from tests.fuzz.strategies import FuzzRequest

DELIBERATE_5XX = frozenset({501, 503})


class _LastError(logging.Handler):
    """Keeps the last error the FHIR endpoint logged with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            import traceback

            lines = traceback.format_exception(*record.exc_info)
            self.last = "".join(lines[-6:])


class Probe:
    """Sends fuzz requests to ``app`` with the credential each names, and checks them."""

    def __init__(self, app: Any, credentials: dict[str, str | None]) -> None:
        self.app = app
        self.credentials = credentials
        self.engine = app.state.repo.engine
        self._errors = _LastError()
        logging.getLogger("fhir_server").addHandler(self._errors)

    def close(self) -> None:
        """Detach the log handler."""
        logging.getLogger("fhir_server").removeHandler(self._errors)

    def send(self, req: FuzzRequest) -> httpx.Response:
        """Send ``req`` from a client address of its own and check every invariant."""
        address = f"fz-{uuid.uuid4().hex[:20]}"
        headers = dict(req.headers)
        credential = self.credentials[req.auth]
        if credential is not None:
            headers["Authorization"] = credential
        http = TestClient(
            self.app, base_url="http://testserver", follow_redirects=False, client=(address, 40000)
        )
        self._errors.last = None
        try:
            response = http.request(req.method, req.url(), headers=headers, content=req.body)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
            reject()  # the client library refuses to send it: no server could see it
        self.check(req, response, address)
        return response

    # -- the invariants ------------------------------------------------------------------------

    def check(self, req: FuzzRequest, response: httpx.Response, address: str) -> None:
        """Fail with a precise message when ``response`` breaks an invariant."""
        status = response.status_code
        outcome = _outcome(response)
        if status >= 500 and not (status in DELIBERATE_5XX and outcome is not None):
            self._fail("a 5xx", req, response)
        if 400 <= status < 500 and req.method != "HEAD":  # a HEAD answer has no body
            if outcome is None:
                self._fail("a 4xx without an OperationOutcome", req, response)
            if not _mso_codes(outcome):
                self._fail("a 4xx OperationOutcome without an MSO- code", req, response)
        _check_fhir_json(self, req, response)
        if self._audit_expected(req) and not self.audited(address):
            self._fail("a request missing from the audit trail", req, response)

    def audited(self, address: str) -> int:
        """How many AuditEvents the request from ``address`` left (after a flush)."""
        self.app.state.audit.flush()
        with self.engine.connect() as conn:
            stmt = select(func.count()).where(audit_event.c.address == address)
            return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _audit_expected(req: FuzzRequest) -> bool:
        """Every request but ``GET metadata`` (never audited, by design)."""
        path = unquote(req.path, errors="replace").strip("/")
        try:
            route = resolve_route(req.method, path, FhirRequest(method=req.method))
        except Exception:
            return True  # no route serves it: audited as such
        return route.handler is not capabilities.capabilities

    def _fail(self, what: str, req: FuzzRequest, response: httpx.Response) -> None:
        trace = f"\nserver traceback (tail):\n{self._errors.last}" if self._errors.last else ""
        raise AssertionError(
            f"{what}: {req.describe()}\n-> {response.status_code} "
            f"{response.headers.get('content-type')} {response.content[:400]!r}{trace}"
        )


def _outcome(response: httpx.Response) -> dict[str, Any] | None:
    """The response's OperationOutcome, when it is one in FHIR JSON."""
    if not response.headers.get("content-type", "").startswith("application/fhir+json"):
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _mso_codes(outcome: dict[str, Any] | None) -> set[str]:
    """The ``MSO-…`` codes of an OperationOutcome's issues."""
    codes: set[str] = set()
    for issue in (outcome or {}).get("issue") or ():
        for coding in ((issue or {}).get("details") or {}).get("coding") or ():
            code = (coding or {}).get("code")
            if isinstance(code, str) and code.startswith("MSO-"):
                codes.add(code)
    return codes


def _check_fhir_json(probe: Probe, req: FuzzRequest, response: httpx.Response) -> None:
    """FHIR JSON parses; a Bundle's ``total`` (when present) is a non-negative integer."""
    if not response.content or not response.headers.get("content-type", "").startswith(
        "application/fhir+json"
    ):
        return
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        probe._fail("an unparseable FHIR JSON body", req, response)
    if isinstance(body, dict) and body.get("resourceType") == "Bundle" and "total" in body:
        total = body["total"]
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            probe._fail("a Bundle.total that is not an unsignedInt", req, response)
