"""Patient/$everything (http://hl7.org/fhir/R4/patient-operation-everything.html)."""

from __future__ import annotations

from fhir_server.interactions import search
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.operations import Operation, register


def _everything(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    return search.everything(ctx, req, req.resource_id)


register(
    Operation(
        name="everything",
        levels=frozenset({"instance", "type"}),
        handler=_everything,
        definition="http://hl7.org/fhir/OperationDefinition/Patient-everything",
        resource_types=frozenset({"Patient"}),
        documentation="The patient's compartment: everything the server holds about the patient",
    )
)
