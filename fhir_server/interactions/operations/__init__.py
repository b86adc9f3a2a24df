"""Extended operations (http://hl7.org/fhir/R4/operations.html): a registry and the invoker.

Each operation lives in its own module and registers an :class:`Operation`; the
CapabilityStatement lists what is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import check_type


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation: its name, where it may be invoked, its handler and its definition.

    ``levels`` holds ``system``, ``type`` and/or ``instance``; ``resource_types`` limits type and
    instance invocations (``None``: any type). ``idempotent`` operations may be invoked by GET.
    """

    name: str
    levels: frozenset[str]
    handler: Callable[[InteractionContext, FhirRequest], FhirResponse]
    definition: str
    resource_types: frozenset[str] | None = None
    idempotent: bool = True
    documentation: str = ""


REGISTRY: dict[str, list[Operation]] = {}


def register(operation: Operation) -> Operation:
    """Add an operation to the registry."""
    REGISTRY.setdefault(operation.name, []).append(operation)
    return operation


def level_of(req: FhirRequest) -> str:
    """system, type or instance, from which path parts the request has."""
    if req.resource_id:
        return "instance"
    return "type" if req.resource_type else "system"


def invoke(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """Dispatch ``[base]/…/$name`` to its registered operation."""
    _load_builtin()
    level = level_of(req)
    if req.resource_type:
        check_type(req.resource_type)
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


_loaded = False


def _load_builtin() -> None:
    """Import the built-in operation modules so that they register themselves (once)."""
    global _loaded
    if not _loaded:
        from fhir_server.interactions.operations import (  # noqa: F401
            case_workflow,
            everything,
            mso_stats,
            record_payment,
            validate,
        )

        _loaded = True


def all_operations() -> list[Operation]:
    """Every registered operation (built-ins loaded)."""
    _load_builtin()
    return [op for ops in REGISTRY.values() for op in ops]
