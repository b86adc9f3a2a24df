"""Errors of the routes outside ``/fhir`` as OperationOutcomes (http://hl7.org/fhir/R4/http.html).

The FHIR endpoint answers its own errors (:mod:`fhir_server.rest.fhir`); what FastAPI and
Starlette answer for everything else — a path no route has (404), a method a route does not
take (405), a request that fails a route's parameter validation (422), an unhandled exception
(500) — would be ``{"detail": …}``. :func:`install` makes those an OperationOutcome with the same
status and a stable ``MSO-HTTP-<status>`` code, except at the OAuth endpoints whose clients
expect RFC 6749 §5.2 error JSON (``/auth/token``, ``/auth/introspect``, ``/auth/revoke``).

The texts name the method and path only: never a parameter's value, which could be patient data.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fhir_server.fhir import jsonio
from fhir_server.fhir.outcome import FhirError

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json; charset=utf-8"
OAUTH_JSON_PATHS = frozenset({"/auth/token", "/auth/introspect", "/auth/revoke"})
"""Endpoints that answer errors as RFC 6749 JSON (``error``, ``error_description``)."""

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# HTTP status -> FHIR IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html)
_ISSUE_TYPES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
}


def install(app: FastAPI) -> None:
    """Answer every error FastAPI or Starlette produces for ``app`` as described above."""
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)


def _http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    where = f"'{request.url.path}'"
    if status == 404:
        message = f"Nothing is served at {where}"
    elif status == 405:
        message = f"{request.method} is not supported on {where}"
    else:
        message = f"{_phrase(status)} ({request.method} {where})"
    return error_response(request, status, message, headers=dict(exc.headers or {}))


def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Only where each problem is (``loc``), never the rejected value (``input``).
    where = sorted({".".join(str(part) for part in e.get("loc", ())) for e in exc.errors()})
    message = f"Invalid request to '{request.url.path}': check {', '.join(where) or 'the request'}"
    return error_response(request, 422, message, expression=where or None)


def _unhandled(request: Request, exc: Exception) -> Response:
    log.error("Unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "Internal server error")


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    expression: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error reply for ``request``: RFC 6749 JSON at the OAuth endpoints, else an
    OperationOutcome with the stable code ``MSO-HTTP-<status>``."""
    if request.url.path in OAUTH_JSON_PATHS:
        return JSONResponse(
            {
                "error": "server_error" if status >= 500 else "invalid_request",
                "error_description": message,
            },
            status_code=status,
            headers={**(headers or {}), **_NO_STORE},
        )
    error = FhirError(
        status,
        "exception" if status >= 500 else _ISSUE_TYPES.get(status, "processing"),
        message,
        code=f"MSO-HTTP-{status}",
        expression=expression,
    )
    return Response(
        jsonio.dumps(error.to_outcome()),
        status_code=status,
        headers=headers,
        media_type=FHIR_JSON,
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
