"""$validate (http://hl7.org/fhir/R4/resource-operation-validate.html).

Runs the same structural validation as every write, without storing anything. The resource is
the body itself or the ``resource`` parameter of a Parameters body; the answer is always an
OperationOutcome, 200 when the resource is valid and 400 with every problem when it is not.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError, information
from fhir_server.fhir.validation import validate_resource
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.operations import Operation, register


def _resource_of(req: FhirRequest) -> dict[str, Any]:
    body = req.body
    if body is None:
        raise FhirError(
            400, "required", "$validate needs a resource in the body", code="MSO-OP-001"
        )
    if body.get("resourceType") == "Parameters" and req.resource_type != "Parameters":
        for parameter in body.get("parameter") or []:
            if parameter.get("name") == "resource" and isinstance(parameter.get("resource"), dict):
                return parameter["resource"]
        raise FhirError(
            400, "required", "Parameters has no 'resource' parameter", code="MSO-OP-002"
        )
    return body


def _validate(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    resource = _resource_of(req)
    if req.resource_type and resource.get("resourceType") != req.resource_type:
        raise FhirError(
            400,
            "invalid",
            f"Resource type '{resource.get('resourceType')}' does not match '{req.resource_type}'",
            code="MSO-REST-004",
        )
    validate_resource(resource)
    return FhirResponse(resource=information("Validation successful: no issues found"))


register(
    Operation(
        name="validate",
        levels=frozenset({"type", "instance"}),
        handler=_validate,
        definition="http://hl7.org/fhir/OperationDefinition/Resource-validate",
        idempotent=False,
        documentation="Validate a resource against the R4 structure definitions without storing it",
    )
)
