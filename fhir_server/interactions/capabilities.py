"""capabilities (http://hl7.org/fhir/R4/http.html#capabilities): ``GET [base]/metadata``.

The CapabilityStatement is generated from what the server really has: the route table
(:mod:`fhir_server.interactions.table`), the operation registry, and the SearchParameter
registry, never from a static file that could drift. ``?mode=full`` (the default) is the only
mode; ``_summary=true`` drops the per-resource details.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_server import __version__
from fhir_server.fhir.definitions import FHIR_VERSION, resource_types
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext


def capabilities(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/metadata."""
    statement = _statement(ctx.base_url, ctx.repo.registry)
    if req.param("_summary") == "true":
        statement = {
            **statement,
            "rest": [{k: v for k, v in statement["rest"][0].items() if k != "resource"}],
        }
    return FhirResponse(resource=statement)


def build_statement(base_url: str, registry: Any) -> dict[str, Any]:
    """The CapabilityStatement for a server at ``base_url`` with this search registry."""
    from fhir_server.interactions.operations import all_operations
    from fhir_server.interactions.table import ROUTES, SYSTEM_INTERACTIONS

    type_codes = sorted(
        {r.interaction for r in ROUTES if r.level in ("type", "instance") and r.interaction}
    )
    operations = all_operations()
    resources = []
    for res_type in sorted(resource_types()):
        entry: dict[str, Any] = {
            "type": res_type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{res_type}",
            "interaction": [{"code": code} for code in type_codes],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical"],
        }
        params = _search_params(registry, res_type)
        if params:
            entry["searchParam"] = params
        ops = [
            {"name": op.name, "definition": op.definition}
            for op in operations
            if op.levels & {"type", "instance"}
            and (op.resource_types is None or res_type in op.resource_types)
        ]
        if ops:
            entry["operation"] = ops
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "MSO FHIR server: FHIR R4 REST API",
        "resource": resources,
        "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
    }
    system_ops = [
        {"name": op.name, "definition": op.definition} for op in operations if "system" in op.levels
    ]
    if system_ops:
        rest["operation"] = system_ops
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "publisher": "MSO",
        "kind": "instance",
        "software": {"name": "MSO FHIR Server", "version": __version__},
        "implementation": {"description": "Medical Second Opinion FHIR server", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [rest],
    }


def _search_params(registry: Any, res_type: str) -> list[dict[str, Any]]:
    params_for = getattr(registry, "params_for", None)
    if params_for is None:
        return []
    out = []
    for code, param in sorted(params_for(res_type).items()):
        item: dict[str, Any] = {"name": code, "type": param.type}
        if getattr(param, "url", None):
            item["definition"] = param.url
        if getattr(param, "description", None):
            item["documentation"] = param.description
        out.append(item)
    return out


_built: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def _statement(base_url: str, registry: Any) -> dict[str, Any]:
    """The statement for this base URL and registry, built once."""
    key = (base_url, id(registry))
    hit = _built.get(key)
    if hit is None or hit[0] is not registry:
        hit = (registry, build_statement(base_url, registry))
        _built[key] = hit
    return hit[1]
