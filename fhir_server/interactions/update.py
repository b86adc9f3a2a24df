"""update and conditional update (http://hl7.org/fhir/R4/http.html#update, #cond-update).

The body's id must be present and equal the URL's id (400 otherwise). An unknown id is created
with that id (update-as-create). ``If-Match`` makes the update conditional on the version
(412 on mismatch). ``PUT [type]?criteria``: no match creates, one match updates it, more is 412.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import (
    check_type,
    parse_etag,
    require_body,
    run_write,
    write_response,
)
from fhir_server.storage.repository import StoredResource, Tx


def update(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PUT [base]/[type]/[id]."""
    res_type = check_type(req.resource_type)
    body = require_body(req)
    res_id = req.resource_id or ""
    if body.get("id") != res_id:
        raise FhirError(
            400,
            "invalid",
            f"Resource id '{body.get('id')}' must be present and equal the URL's id '{res_id}'",
            code="MSO-REST-006",
            expression=["id"],
        )
    if_match = parse_etag(req.header("if-match"))
    stored, created = run_write(
        ctx, lambda tx: tx.update(res_type, res_id, body, if_match=if_match)
    )
    return _reply(ctx, req, stored, created)


def conditional_update(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PUT [base]/[type]?[criteria]."""
    res_type = check_type(req.resource_type)
    body = require_body(req)
    if_match = parse_etag(req.header("if-match"))
    stored, created = run_write(
        ctx, lambda tx: conditional_update_in(tx, res_type, req.params, body, if_match)
    )
    return _reply(ctx, req, stored, created)


def conditional_update_in(
    tx: Tx,
    res_type: str,
    params: list[tuple[str, str]],
    body: dict[str, Any],
    if_match: int | None,
) -> tuple[StoredResource, bool]:
    """Update the single resource matching ``params``, or create one if none does."""
    tx.lock_criteria(res_type, params)
    matches = tx.find(res_type, params, limit=2)
    if len(matches) > 1:
        raise FhirError(
            412, "multiple-matches", f"Criteria match more than one {res_type}", code="MSO-REST-412"
        )
    if not matches:
        res_id = body.get("id")
        if res_id is not None:
            return tx.update(res_type, res_id, body, if_match=if_match)
        return tx.create(body), True
    target = matches[0]
    if body.get("id") not in (None, target.res_id):
        raise FhirError(
            409,
            "conflict",
            f"Criteria match {target.reference} but the body's id is '{body.get('id')}'",
            code="MSO-REST-007",
            expression=["id"],
        )
    body["id"] = target.res_id
    return tx.update(res_type, target.res_id, body, if_match=if_match)


def _reply(
    ctx: InteractionContext, req: FhirRequest, stored: StoredResource, created: bool
) -> FhirResponse:
    status, verb = (201, "Created") if created else (200, "Updated")
    return write_response(
        ctx, req, stored, status=status, message=f"{verb} {stored.reference}", interaction="update"
    )
