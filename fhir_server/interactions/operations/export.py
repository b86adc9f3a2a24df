"""``$export`` kick-off at system, Patient and Group level (Bulk Data Access IG 3.0.0,
https://hl7.org/fhir/uv/bulkdata/STU3/export.html#bulk-data-kick-off-request).

The request is parsed and checked (:mod:`fhir_server.bulk.request`), the token's scopes must
allow every ``_type`` asked for, a Group must be one the caller may read; then a job is queued
and the answer is a 202 whose ``Content-Location`` is the status URL. The status, cancel and
download requests are :mod:`fhir_server.interactions.bulk_status`.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fhir_server.bulk import service
from fhir_server.bulk.manifest import status_url
from fhir_server.bulk.request import parse_kickoff
from fhir_server.fhir.outcome import Issue, operation_outcome
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read
from fhir_server.interactions.operations import Operation, level_of, register

IG = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"


def kickoff(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """Queue an export of what the caller may read; 202 with the status URL."""
    level = {"system": "system", "type": "patient", "instance": "group"}[level_of(req)]
    caller = service.require_principal(ctx.caller)
    request = parse_kickoff(
        ctx.repo.registry,
        level=level,
        group_id=req.resource_id,
        params=req.params,
        body=req.body,
        method=req.method,
        respond_async=req.prefer.respond_async,
        lenient=req.prefer.handling == "lenient",
    )
    service.check_scopes(caller, request)
    if level == "group":  # 404 (or 403) now rather than a failed job later
        run_read(ctx, lambda tx: tx.read("Group", req.resource_id or ""))
    path = "/".join(p for p in (req.resource_type, req.resource_id) if p)
    url = f"{ctx.base_url}/{path + '/' if path else ''}$export"
    if req.params:
        url += "?" + urlencode(req.params)
    job_id = service.start(ctx.repo.engine, ctx.settings, caller, request, url)
    issues = [Issue("information", "informational", "The export is queued", None, None)]
    issues.extend(
        Issue("warning", "not-supported", f"The parameter {name} was ignored", [name], None)
        for name in request.ignored
    )
    return FhirResponse(
        status=202,
        resource=operation_outcome(issues),
        headers={"Content-Location": status_url(ctx.base_url, job_id)},
    )


for _definition, _levels, _types in (
    ("export", frozenset({"system"}), None),
    ("patient-export", frozenset({"type"}), frozenset({"Patient"})),
    ("group-export", frozenset({"instance"}), frozenset({"Group"})),
):
    register(
        Operation(
            name="export",
            levels=_levels,
            handler=kickoff,
            definition=f"{IG}/{_definition}",
            resource_types=_types,
            idempotent=True,
            documentation="Bulk Data export (asynchronous: Prefer: respond-async)",
        )
    )
