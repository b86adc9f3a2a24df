"""read and vread (http://hl7.org/fhir/R4/http.html#read, #vread), with conditional read.

A read returns the stored JSON bytes untouched (they already carry ``meta.versionId`` and
``meta.lastUpdated``), so the hot path parses nothing. ``If-None-Match`` and
``If-Modified-Since`` give 304 Not Modified.
"""

from __future__ import annotations

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import (
    check_type,
    parse_etag,
    parse_http_date,
    parse_version,
    read_response,
    run_read,
    version_headers,
)
from fhir_server.search import summary as summary_elements
from fhir_server.storage.repository import StoredResource


def read(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/[type]/[id]."""
    res_type = check_type(req.resource_type)
    res_id = req.resource_id or ""
    stored = run_read(ctx, lambda tx: tx.read(res_type, res_id), snapshot=False)
    if _not_modified(req, stored):
        return FhirResponse(status=304, headers=version_headers(ctx, stored, location=False))
    return _subsetted(req, read_response(ctx, stored), stored)


def vread(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/[type]/[id]/_history/[vid]."""
    res_type = check_type(req.resource_type)
    res_id = req.resource_id or ""
    version = parse_version(req.version_id or "")
    if version is None:
        # not quoted: the segment is whatever the client sent
        raise FhirError(404, "not-found", "That version is not known", code="MSO-REST-405")
    stored = run_read(ctx, lambda tx: tx.vread(res_type, res_id, version), snapshot=False)
    return _subsetted(req, read_response(ctx, stored), stored)


def _subsetted(req: FhirRequest, response: FhirResponse, stored: StoredResource) -> FhirResponse:
    """Apply ``_summary`` (true | text | data) or ``_elements`` to a read's resource."""
    summary = req.param("_summary")
    if summary == "false":
        summary = None
    raw_elements = req.param("_elements")
    elements = [e.strip() for e in raw_elements.split(",") if e.strip()] if raw_elements else None
    if summary not in (None, "true", "text", "data"):
        raise FhirError(
            400, "invalid", f"_summary={summary} is not allowed on read", code="MSO-REST-013"
        )
    if summary or elements:
        response.resource = summary_elements.apply(stored.resource, summary, elements)
        response.body = None
    return response


def _not_modified(req: FhirRequest, stored: StoredResource) -> bool:
    if_none_match = req.header("if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        tags = [t for t in if_none_match.split(",") if t.strip()]
        try:
            return any(parse_etag(t, "If-None-Match") == stored.version for t in tags)
        except FhirError:
            return False
    since_header = req.header("if-modified-since")
    if since_header is not None:
        since = parse_http_date(since_header)
        # HTTP dates have whole seconds: compare at that precision.
        return since is not None and stored.last_updated.replace(microsecond=0) <= since
    return False
