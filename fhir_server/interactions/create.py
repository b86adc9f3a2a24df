"""create, with conditional create (http://hl7.org/fhir/R4/http.html#create, #ccreate).

The server assigns the id; an id in the body is ignored as the spec requires. With
``If-None-Exist`` the criteria are searched under a lock: no match creates, one match returns
it (200), several are a 412.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import (
    check_type,
    criteria,
    require_body,
    run_write,
    write_response,
)
from fhir_server.storage.repository import StoredResource, Tx


def create(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/[type]."""
    res_type = check_type(req.resource_type)
    body = require_body(req)
    body.pop("id", None)
    condition = req.header("if-none-exist")
    stored, created = run_write(ctx, lambda tx: create_in(tx, res_type, body, condition))
    if created:
        return write_response(ctx, req, stored, status=201, message=f"Created {stored.reference}")
    return write_response(
        ctx, req, stored, status=200, message=f"{stored.reference} already exists"
    )


def create_in(
    tx: Tx, res_type: str, body: dict[str, Any], condition: str | None
) -> tuple[StoredResource, bool]:
    """Create ``body`` unless ``condition`` (a query string) already matches a resource."""
    if condition:
        params = criteria(condition)
        tx.lock_criteria(res_type, params)
        matches = tx.find(res_type, params, limit=2)
        if len(matches) > 1:
            raise FhirError(
                412,
                "duplicate",
                f"If-None-Exist criteria '{condition}' match more than one {res_type}",
                code="MSO-REST-412",
            )
        if matches:
            return matches[0], False
    return tx.create(body), True
