"""The one table of FHIR REST routes: HTTP routing, transaction entries and the
CapabilityStatement are all derived from it, so they cannot drift apart.

Paths are relative to the FHIR base and matched segment by segment. Placeholders: ``{type}`` a
resource type, ``{id}`` a logical id, ``{vid}`` a version, ``{op}`` an ``$operation`` name,
``{ctype}`` the resource type searched in a compartment.

The arrows go one way: this module imports every handler; handlers that need the table
(transaction and batch entries, the CapabilityStatement) are handed :data:`ROUTER` through
:attr:`InteractionContext.router <fhir_server.interactions.base.InteractionContext.router>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions import (
    audit_events,
    bulk_status,
    capabilities,
    create,
    delete,
    history,
    patch,
    read,
    search,
    transaction,
    update,
)
from fhir_server.interactions.base import FhirRequest, FhirResponse, Handler, InteractionContext
from fhir_server.interactions.operations import catalog as operations
from fhir_server.storage.repository import check_id


def _compartment_search(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/[Compartment]/[id]/[type]: search ``type`` within a compartment."""
    return search.search_compartment(
        ctx, req, req.resource_type or "", req.resource_id or "", req.compartment_type or ""
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One interaction: HTTP method, path pattern, handler and its CapabilityStatement code.

    ``level`` is ``system``, ``type`` or ``instance``; ``interaction`` the code listed under
    ``rest.interaction`` or ``rest.resource.interaction`` (``None`` for routes that are not
    interactions of their own, like ``metadata`` or operations). ``operation`` names what a
    route outside the interactions does, for its audit record (the bulk export's requests).
    """

    method: str
    pattern: tuple[str, ...]
    handler: Handler
    level: str
    interaction: str | None
    conditional: bool = False
    operation: str | None = None


ROUTES: tuple[Route, ...] = (
    Route("GET", ("metadata",), capabilities.capabilities, "system", None),
    Route("GET", (), search.search_system, "system", "search-system"),
    Route("POST", (), transaction.transaction_or_batch, "system", "transaction"),
    Route("POST", ("_search",), search.search_system, "system", None),
    Route("GET", ("_history",), history.history, "system", "history-system"),
    # the bulk export's status, cancel and download (kick-off: the $export operation)
    Route("GET", ("_bulk", "{job}"), bulk_status.status, "system", None, operation="export-status"),
    Route(
        "DELETE", ("_bulk", "{job}"), bulk_status.cancel, "system", None, operation="export-cancel"
    ),
    Route(
        "GET",
        ("_bulk", "{job}", "{file}"),
        bulk_status.download,
        "system",
        None,
        operation="export-download",
    ),
    Route("GET", ("{op}",), operations.invoke, "system", None),
    Route("POST", ("{op}",), operations.invoke, "system", None),
    Route("GET", ("{type}",), search.search_type, "type", "search-type"),
    Route("POST", ("{type}",), create.create, "type", "create"),
    Route("PUT", ("{type}",), update.conditional_update, "type", "update", conditional=True),
    Route("PATCH", ("{type}",), patch.conditional_patch, "type", "patch", conditional=True),
    Route("DELETE", ("{type}",), delete.conditional_delete, "type", "delete", conditional=True),
    Route("POST", ("{type}", "_search"), search.search_type, "type", None),
    Route("GET", ("{type}", "_history"), history.history, "type", "history-type"),
    Route("GET", ("{type}", "{op}"), operations.invoke, "type", None),
    Route("POST", ("{type}", "{op}"), operations.invoke, "type", None),
    Route("GET", ("{type}", "{id}"), read.read, "instance", "read"),
    Route("PUT", ("{type}", "{id}"), update.update, "instance", "update"),
    Route("PATCH", ("{type}", "{id}"), patch.patch, "instance", "patch"),
    Route("DELETE", ("{type}", "{id}"), delete.delete, "instance", "delete"),
    Route("GET", ("{type}", "{id}", "_history"), history.history, "instance", "history-instance"),
    Route("GET", ("{type}", "{id}", "{op}"), operations.invoke, "instance", None),
    Route("POST", ("{type}", "{id}", "{op}"), operations.invoke, "instance", None),
    Route("GET", ("{type}", "{id}", "_history", "{vid}"), read.vread, "instance", "vread"),
    Route("GET", ("{type}", "{id}", "{ctype}"), _compartment_search, "instance", None),
)

SYSTEM_INTERACTIONS = ("transaction", "batch", "search-system", "history-system")
# AuditEvents live in the audit trail's own table: these interactions are served from it.
_AUDIT_HANDLERS: dict[Handler, Handler] = {
    read.read: audit_events.read,
    read.vread: audit_events.read,
    search.search_type: audit_events.search,
    create.create: audit_events.create,
    history.history: audit_events.history,
    update.update: audit_events.refuse_change,
    update.conditional_update: audit_events.refuse_change,
    patch.patch: audit_events.refuse_change,
    patch.conditional_patch: audit_events.refuse_change,
    delete.delete: audit_events.refuse_change,
    delete.conditional_delete: audit_events.refuse_change,
}


@cache
def _routes_of_length(length: int) -> tuple[Route, ...]:
    """The routes whose pattern has ``length`` segments, in table order."""
    return tuple(route for route in ROUTES if len(route.pattern) == length)


def interaction_of(route: Route, req: FhirRequest) -> str:
    """The RESTful interaction code a request performed (for audit records)."""
    handler = route.handler
    if handler is capabilities.capabilities:
        return "capabilities"
    if handler is operations.invoke:
        return "operation"
    if handler is _compartment_search:
        return "search-compartment"
    if handler in (search.search_type, search.search_system):
        return "search-type" if route.level == "type" else "search-system"
    if route.interaction == "transaction" and isinstance(req.body, dict):
        return "batch" if req.body.get("type") == "batch" else "transaction"
    return route.interaction or "operation"


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == "{op}":
        return segment.startswith("$") and len(segment) > 1
    if pattern.startswith("{"):
        return bool(segment) and not segment.startswith(("$", "_"))
    return pattern == segment


class RouteTable:
    """:data:`ROUTES` as the :class:`~fhir_server.interactions.base.Router` handlers are given."""

    type_interactions: tuple[str, ...] = tuple(
        sorted({r.interaction for r in ROUTES if r.level in ("type", "instance") and r.interaction})
    )
    system_interactions: tuple[str, ...] = SYSTEM_INTERACTIONS

    def resolve(self, method: str, path: str, req: FhirRequest) -> Handler:
        """See :func:`resolve`."""
        return resolve_route(method, path, req).handler


def resolve(method: str, path: str, req: FhirRequest) -> Handler:
    """Find the handler for ``method`` and ``path`` and fill ``req``'s path fields.

    404 for a path no route has; 405 for a known path with another method.
    """
    return resolve_route(method, path, req).handler


def resolve_route(method: str, path: str, req: FhirRequest) -> Route:
    """Like :func:`resolve`, returning the whole :class:`Route`."""
    segments = tuple(s for s in path.strip("/").split("/") if s) if path.strip("/") else ()
    allowed: list[str] = []
    for route in _routes_of_length(len(segments)):
        if not all(_segment_matches(p, s) for p, s in zip(route.pattern, segments, strict=True)):
            continue
        if route.method != method:
            allowed.append(route.method)
            continue
        for pattern, segment in zip(route.pattern, segments, strict=True):
            if pattern == "{type}":
                req.resource_type = segment
            elif pattern == "{id}":
                req.resource_id = check_id(segment)  # before any handler or SQL
            elif pattern == "{vid}":
                req.version_id = segment
            elif pattern == "{op}":
                req.operation = segment[1:]
            elif pattern == "{ctype}":
                req.compartment_type = segment
            elif pattern == "{job}":
                req.resource_id = check_id(segment)
            elif pattern == "{file}":
                req.file_name = segment
        if route.operation is not None:
            req.operation = route.operation
        if req.resource_type == audit_events.TYPE and route.handler in _AUDIT_HANDLERS:
            return dataclasses.replace(route, handler=_AUDIT_HANDLERS[route.handler])
        return route
    if allowed:
        raise FhirError(
            405,
            "not-supported",
            f"{method} is not supported on '{path or '/'}'",
            code="MSO-REST-405M",
            headers={"Allow": ", ".join(sorted(set(allowed)))},
        )
    raise FhirError(
        404, "not-found", f"No FHIR interaction at '{path or '/'}'", code="MSO-REST-404P"
    )


ROUTER = RouteTable()
"""The route table handed to handlers in their context."""
