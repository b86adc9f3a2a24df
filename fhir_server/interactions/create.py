"""create, with conditional create (http://hl7.org/fhir/R4/http.html#create, #ccreate).

The server assigns the id; an id in the body is ignored as the spec requires. With
``If-None-Exist`` the criteria are searched under a lock: no match creates, one match returns
it (200), several are a 412.
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.policy import matches_beyond_reach
from fhir_server.fhir.outcome import FhirError, information
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import (
    check_type,
    criteria,
    criteria_names,
    require_body,
    run_write,
    version_headers,
    write_response,
    written,
)
from fhir_server.storage.repository import StoredResource, Tx, format_instant


def create(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/[type]."""
    res_type = check_type(req.resource_type)
    body = require_body(req)
    body.pop("id", None)
    condition = req.header("if-none-exist")
    stored, created, visible = run_write(ctx, lambda tx: create_in(tx, res_type, body, condition))
    if created:
        return write_response(ctx, req, stored, status=201, message=f"Created {stored.reference}")
    return existing_response(ctx, req, stored, visible=visible)


def existing_response(
    ctx: InteractionContext, req: FhirRequest, stored: StoredResource, *, visible: bool
) -> FhirResponse:
    """The 200 of a conditional create that matched ``stored``: as any write reply when the
    caller may see it, else only its Location and an OperationOutcome saying so."""
    message = f"{stored.reference} already exists"
    if visible:
        return write_response(ctx, req, stored, status=200, message=message, interaction="create")
    return FhirResponse(
        status=200,
        headers=version_headers(ctx, stored, location=True),
        last_updated=format_instant(stored.last_updated),
        written=(written("create", stored),),
        resource=information(
            f"{message}; reference it: it becomes visible to you once a case of yours names it"
        ),
    )


def if_none_exist_match(
    tx: Tx, res_type: str, condition: str
) -> tuple[StoredResource | None, bool]:
    """What ``If-None-Exist`` criteria match (``None``: create), under a lock on the criteria,
    and whether the caller may see it; 412 for several matches.

    When the caller sees no match, identity criteria may match beyond what it sees (one
    person, one Patient: :func:`~fhir_server.auth.policy.matches_beyond_reach`).
    """
    params = criteria(condition)
    tx.lock_criteria(res_type, params)
    matches, visible = tx.find(res_type, params, limit=2), True
    if not matches and matches_beyond_reach(tx.caller, res_type, params):
        with tx.internal():
            matches, visible = tx.find(res_type, params, limit=2), False
    if len(matches) > 1:
        raise FhirError(
            412,
            "duplicate",
            f"If-None-Exist criteria (parameters: {criteria_names(params)}) match more than "
            f"one {res_type}",
            code="MSO-REST-412",
        )
    return (matches[0] if matches else None), visible


def create_in(
    tx: Tx, res_type: str, body: dict[str, Any], condition: str | None
) -> tuple[StoredResource, bool, bool]:
    """Create ``body`` unless ``condition`` (a query string) already matches a resource;
    (the stored resource, whether it was created, whether the caller may see it)."""
    if condition:
        match, visible = if_none_exist_match(tx, res_type, condition)
        if match is not None:
            return match, False, visible
    return tx.create(body), True, True
