"""patch (http://hl7.org/fhir/R4/http.html#patch): JSON Patch and FHIRPath Patch.

The patch is applied to the current version under the row lock, the result is validated like any
update and stored as a new version; ``If-Match`` is honoured. ``PATCH [type]?criteria`` patches
the single match.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError, gone, not_found
from fhir_server.fhir.patch import apply_patch
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import check_type, parse_etag, run_write, write_response
from fhir_server.storage.repository import StoredResource, Tx, check_version


def patch(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PATCH [base]/[type]/[id]."""
    res_type = check_type(req.resource_type)
    res_id = req.resource_id or ""
    if_match = parse_etag(req.header("if-match"))
    content_type = req.header("content-type") or ""
    stored = run_write(
        ctx, lambda tx: patch_in(tx, res_type, res_id, req.body, content_type, if_match)
    )
    return _reply(ctx, req, stored)


def conditional_patch(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PATCH [base]/[type]?[criteria]."""
    res_type = check_type(req.resource_type)
    if_match = parse_etag(req.header("if-match"))
    content_type = req.header("content-type") or ""

    def work(tx: Tx) -> StoredResource:
        matches = tx.find(res_type, req.params, limit=2)
        if len(matches) != 1:
            raise FhirError(
                412 if matches else 404,
                "multiple-matches" if matches else "not-found",
                f"Conditional patch criteria match {'several' if matches else 'no'} {res_type}",
                code="MSO-REST-412" if matches else "MSO-REST-404",
            )
        return patch_in(tx, res_type, matches[0].res_id, req.body, content_type, if_match)

    stored = run_write(ctx, work)
    return _reply(ctx, req, stored)


def _reply(ctx: InteractionContext, req: FhirRequest, stored: StoredResource) -> FhirResponse:
    return write_response(
        ctx, req, stored, status=200, message=f"Patched {stored.reference}", interaction="patch"
    )


def patch_in(
    tx: Tx, res_type: str, res_id: str, body: Any, content_type: str, if_match: int | None
) -> StoredResource:
    """Apply ``body`` (a patch document of ``content_type``) to the current version and store it."""
    current = tx.current(res_type, res_id, for_update=True)
    if current is None:
        raise not_found(res_type, res_id)
    if current.deleted:
        raise gone(res_type, res_id, current.version)
    check_version(current, if_match)
    patched = apply_patch(current.resource, body, content_type)
    stored, _ = tx.update(res_type, res_id, patched, if_match=current.version, method="PATCH")
    return stored
