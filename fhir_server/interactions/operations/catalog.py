"""The built-in operations, loaded, and the invoker of ``[base]/…/$name``
(http://hl7.org/fhir/R4/operations.html#executing).

Importing this module imports every built-in operation module, each of which registers itself
in :mod:`fhir_server.interactions.operations`; the route table sends every ``$operation`` path
to :func:`invoke`.
"""

from __future__ import annotations

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import check_type
from fhir_server.interactions.operations import (
    REGISTRY,
    Operation,
    case_workflow,
    chat_read,
    deidentify_imaging,
    everything,
    export,
    import_priors,
    level_of,
    mso_stats,
    record_payment,
    subscription_status,
    validate,
)
from fhir_server.interactions.operations.parameters import check_parameters

BUILTIN_MODULES = (
    case_workflow,
    chat_read,
    deidentify_imaging,
    everything,
    export,
    import_priors,
    mso_stats,
    record_payment,
    subscription_status,
    validate,
)
"""The modules whose import registered the built-in operations."""


def invoke(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """Dispatch ``[base]/…/$name`` to its registered operation."""
    level = level_of(req)
    if req.resource_type:
        check_type(req.resource_type)
    check_parameters(req.body)
    for operation in REGISTRY.get(req.operation or "", ()):
        if level not in operation.levels:
            continue
        restricted = level != "system" and operation.resource_types is not None
        if restricted and req.resource_type not in operation.resource_types:
            continue
        if req.method == "GET" and not operation.idempotent:
            raise FhirError(
                405, "not-supported", f"${operation.name} changes data: use POST", code="MSO-OP-405"
            )
        return operation.handler(ctx, req)
    where = "/".join(p for p in (req.resource_type, "[id]" if req.resource_id else None) if p)
    raise FhirError(
        404,
        "not-supported",
        f"Operation ${req.operation} is not supported at {where or 'system'} level",
        code="MSO-OP-404",
    )


def all_operations() -> list[Operation]:
    """Every registered operation (the built-ins among them)."""
    return [op for ops in REGISTRY.values() for op in ops]
