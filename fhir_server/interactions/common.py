"""Helpers every interaction handler shares: running work in a unit, checking bodies, replies."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fhir_server.fhir.definitions import is_resource_type
from fhir_server.fhir.outcome import FhirError, information
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext, Written
from fhir_server.storage.repository import (
    StoredResource,
    Tx,
    as_utc,
    format_instant,
)

T = TypeVar("T")

# Versions are stored in a 32-bit integer column: a larger number names no version.
MAX_VERSION = 2**31 - 1


def run_write(ctx: InteractionContext, work: Callable[[Tx], T]) -> T:
    """Run ``work`` in the enclosing transaction Bundle's unit, or in a new write unit."""
    if ctx.tx is not None:
        return work(ctx.tx)
    return ctx.repo.write(work, caller=ctx.caller)


def run_read(ctx: InteractionContext, work: Callable[[Tx], T], *, snapshot: bool = True) -> T:
    """Run ``work`` in the enclosing unit, or in a new read unit.

    ``snapshot=False`` is for work that issues one statement (read, vread): it then runs in
    autocommit mode, without BEGIN/COMMIT round trips.
    """
    if ctx.tx is not None:
        return work(ctx.tx)
    return ctx.repo.read_only(work, caller=ctx.caller, snapshot=snapshot)


def check_type(resource_type: str | None) -> str:
    """404 for a URL that names no R4 resource type."""
    if not resource_type or not is_resource_type(resource_type):
        raise FhirError(
            404, "not-supported", f"Unknown resource type '{resource_type}'", code="MSO-REST-001"
        )
    return resource_type


def parse_count(raw: str) -> int | None:
    """The non-negative integer ``raw`` spells in ASCII digits (``None`` for anything else:
    ``str.isdigit`` also accepts digits ``int`` refuses, such as superscripts)."""
    return int(raw) if raw.isascii() and raw.isdigit() else None


def parse_version(raw: str) -> int | None:
    """The version number ``raw`` names, or ``None`` when it names none that can exist."""
    version = parse_count(raw)
    return version if version is not None and version <= MAX_VERSION else None


def require_body(req: FhirRequest) -> dict[str, Any]:
    """The request's resource, whose resourceType must match the URL's type."""
    body = req.body
    if body is None:
        raise FhirError(
            400, "required", "This interaction needs a resource in the body", code="MSO-REST-003"
        )
    if body.get("resourceType") != req.resource_type:
        raise FhirError(
            400,
            "invalid",
            f"Resource type '{body.get('resourceType')}' does not match the URL's type "
            f"'{req.resource_type}'",
            code="MSO-REST-004",
            expression=["resourceType"],
        )
    return body


def parse_etag(value: str | None, header: str = "If-Match") -> int | None:
    """The version number in an ETag such as ``W/"3"`` (or ``"3"``, or ``3``)."""
    if value is None:
        return None
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    version = parse_count(raw.strip('"'))
    if version is None:
        raise FhirError(
            400, "invalid", f"{header} value '{value}' is not a version ETag", code="MSO-REST-005"
        )
    return version


def criteria_names(params: list[tuple[str, str]]) -> str:
    """The parameter names of search criteria, for error texts: their values (an identifier,
    a name) may be patient data and are never quoted."""
    return ", ".join(dict.fromkeys(name for name, _ in params)) or "none"


def http_date(value: datetime) -> str:
    """An RFC 9110 HTTP date (``Last-Modified``)."""
    return format_datetime(as_utc(value), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    """Parse an HTTP date; ``None`` when it is malformed (the header is then ignored)."""
    try:
        return as_utc(parsedate_to_datetime(value))
    except (TypeError, ValueError):
        return None


def criteria(query: str) -> list[tuple[str, str]]:
    """Search criteria from a query string (``If-None-Exist`` or a conditional URL)."""
    return parse_qsl(query.lstrip("?"), keep_blank_values=True)


def version_headers(
    ctx: InteractionContext, stored: StoredResource, *, location: bool
) -> dict[str, str]:
    """ETag, Last-Modified and (for writes) Location of a stored version."""
    headers = {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}
    if location:
        headers["Location"] = (
            f"{ctx.base_url}/{stored.res_type}/{stored.res_id}/_history/{stored.version}"
        )
    return headers


def written(interaction: str, stored: StoredResource) -> Written:
    """What the audit trail names for a write of ``stored`` by ``interaction``."""
    return Written(interaction, f"{stored.reference}/_history/{stored.version}")


def write_response(
    ctx: InteractionContext,
    req: FhirRequest,
    stored: StoredResource,
    *,
    status: int,
    message: str,
    interaction: str | None = None,
) -> FhirResponse:
    """The reply to create/update/patch, shaped by ``Prefer: return=…``; it names ``stored``
    as written by ``interaction`` (default: ``create`` for a 201, else ``update``)."""
    headers = version_headers(ctx, stored, location=True)
    response = FhirResponse(
        status=status,
        headers=headers,
        last_updated=format_instant(stored.last_updated),
        written=(written(interaction or ("create" if status == 201 else "update"), stored),),
    )
    preference = req.prefer.return_
    if preference == "OperationOutcome":
        response.resource = information(message)
    elif preference != "minimal":
        response.body = stored.content
    return response


def read_response(ctx: InteractionContext, stored: StoredResource) -> FhirResponse:
    """The reply to read/vread: the stored JSON as-is with its version headers."""
    return FhirResponse(
        body=stored.content,
        headers=version_headers(ctx, stored, location=False),
        last_updated=format_instant(stored.last_updated),
    )
