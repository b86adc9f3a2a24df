"""Extended operations (http://hl7.org/fhir/R4/operations.html): the registry.

Each operation lives in its own module and registers an :class:`Operation` here when imported;
this package imports none of them (the arrows go from the operation modules to the registry).
:mod:`fhir_server.interactions.operations.catalog` loads the built-in ones and invokes them; the
CapabilityStatement lists what is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext


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
