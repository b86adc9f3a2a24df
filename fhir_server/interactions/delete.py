"""delete and conditional delete (http://hl7.org/fhir/R4/http.html#delete, #cdelete).

Deletion is soft: a new version marked deleted; reads then answer 410 Gone and vread of older
versions still works. Deleting an unknown or already deleted resource succeeds (idempotent).
Conditional delete removes the single match; several matches are a 412.
"""

from __future__ import annotations

from fhir_server.fhir.outcome import FhirError, information
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import (
    check_type,
    parse_etag,
    run_write,
    written,
)
from fhir_server.storage.repository import StoredResource, Tx


def delete(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """DELETE [base]/[type]/[id]."""
    res_type = check_type(req.resource_type)
    res_id = req.resource_id or ""
    if_match = parse_etag(req.header("if-match"))
    stored = run_write(ctx, lambda tx: tx.delete(res_type, res_id, if_match=if_match))
    return _reply(req, stored, f"{res_type}/{res_id}")


def conditional_delete(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """DELETE [base]/[type]?[criteria]."""
    res_type = check_type(req.resource_type)
    stored = run_write(ctx, lambda tx: conditional_delete_in(tx, res_type, req.params))
    return _reply(req, stored, stored.reference if stored else f"{res_type} matching the criteria")


def conditional_delete_in(
    tx: Tx, res_type: str, params: list[tuple[str, str]]
) -> StoredResource | None:
    """Delete the one resource matching ``params`` (none: nothing to do; several: 412)."""
    matches = tx.find(res_type, params, limit=2)
    if len(matches) > 1:
        raise FhirError(
            412,
            "multiple-matches",
            f"Criteria match several {res_type}; conditional delete deletes a single one",
            code="MSO-REST-412",
        )
    if not matches:
        return None
    return tx.delete(res_type, matches[0].res_id)


def _reply(req: FhirRequest, stored: StoredResource | None, what: str) -> FhirResponse:
    headers = {"ETag": stored.etag} if stored else {}
    wrote = (written("delete", stored),) if stored else ()
    if req.prefer.return_ == "minimal":
        return FhirResponse(status=204, headers=headers, written=wrote)
    message = f"Deleted {what}" if stored else f"Nothing to delete: {what} does not exist"
    return FhirResponse(status=200, resource=information(message), headers=headers, written=wrote)
