"""capabilities (http://hl7.org/fhir/R4/http.html#capabilities): ``GET [base]/metadata``.

The CapabilityStatement is generated from what the server really has: the route table (handed
in as the context's :class:`~fhir_server.interactions.base.Router`, this module does not import
:mod:`fhir_server.interactions.table`), the operation registry, and the SearchParameter
registry, never from a static file that could drift. ``?mode=full`` (the default) is the only
mode; ``_summary=true`` drops the per-resource details. ``rest[0].security`` declares SMART on
FHIR with the OAuth endpoint URLs (:func:`fhir_server.auth.discovery.capability_security`).

The bulk of the statement depends only on the search registry and is built once per registry;
what depends on the base URL (configured, or the one the request came to) — ``implementation.url``
and the OAuth URLs — is filled in per request, so that every base gets its own URLs and a client
cannot grow the cache by sending many ``Host`` headers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from fhir_server import __version__
from fhir_server.audit import store as audit_store
from fhir_server.auth.discovery import capability_security, issuer_for
from fhir_server.codes import CANONICAL_BASE
from fhir_server.fhir.definitions import FHIR_VERSION, resource_types
from fhir_server.interactions import audit_events
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext, Router
from fhir_server.interactions.operations.catalog import all_operations
from fhir_server.messaging.topics import topics
from fhir_server.messaging.websocket import websocket_url


def capabilities(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/metadata."""
    issuer = issuer_for(ctx.base_url, ctx.settings.auth_issuer)
    statement = _for_base(_statement(ctx.repo.registry, ctx.router), ctx.base_url, issuer)
    if req.param("_summary") == "true":
        statement = {
            **statement,
            "rest": [{k: v for k, v in statement["rest"][0].items() if k != "resource"}],
        }
    return FhirResponse(resource=statement)


def build_statement(
    base_url: str, registry: Any, *, issuer: str | None = None, router: Router | None = None
) -> dict[str, Any]:
    """The CapabilityStatement for a server at ``base_url`` with this search registry and route
    table, whose authorization server is ``issuer`` (default: derived from ``base_url``).
    Without a ``router`` the statement lists no RESTful interactions."""
    return _for_base(_build_core(registry, router), base_url, issuer or issuer_for(base_url))


def _build_core(registry: Any, router: Router | None) -> dict[str, Any]:
    """Everything of the statement that does not depend on the base URL."""
    type_codes = router.type_interactions if router is not None else ()
    system_codes = router.system_interactions if router is not None else ()
    operations = all_operations()
    resources = []
    for res_type in sorted(resource_types()):
        entry: dict[str, Any] = {
            "type": res_type,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{res_type}",
            **({"interaction": [{"code": code} for code in type_codes]} if type_codes else {}),
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
        if res_type == audit_events.TYPE:
            entry.update(_audit_event_capabilities(params))
            params = entry.pop("searchParam")
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
        if res_type == "Subscription":
            entry["extension"] = [
                {"url": TOPIC_CANONICAL, "valueCanonical": url} for url in sorted(topics())
            ]
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "MSO FHIR server: FHIR R4 REST API",
        "resource": resources,
        **({"interaction": [{"code": code} for code in system_codes]} if system_codes else {}),
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
        "instantiates": [
            "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data",
            "http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/"
            "backport-subscription-server-r4",
        ],
        "software": {"name": "MSO FHIR Server", "version": __version__},
        "implementation": {"description": "Medical Second Opinion FHIR server"},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [rest],
    }


def _audit_event_capabilities(params: list[dict[str, Any]]) -> dict[str, Any]:
    """AuditEvent is append-only, served from the audit trail with the BALP parameters."""
    supported = set(audit_store.SEARCH_PARAMS)
    return {
        "interaction": [
            {"code": code}
            for code in (
                "read",
                "vread",
                "search-type",
                "create",
                "history-instance",
                "history-type",
            )
        ],
        "versioning": "versioned",
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [p for p in params if p["name"] in supported],
        "documentation": "The audit trail: append-only (update, patch and delete are 405); "
        "readable by administrators and system clients only",
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


WEBSOCKET_EXTENSION = "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket"
TOPIC_CANONICAL = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "capabilitystatement-subscriptiontopic-canonical"
)


DICOMWEB_EXTENSION = f"{CANONICAL_BASE}/StructureDefinition/capabilitystatement-dicomweb"
DICOMWEB_PATH = "/dicomweb"


def dicomweb_url(base_url: str) -> str:
    """The DICOMweb bridge's URL (``fhir_server.dicomweb``) of the FHIR server at ``base_url``:
    ``/dicomweb`` at the server root, beside ``/fhir``."""
    base = base_url.rstrip("/")
    if base.endswith("/fhir"):
        return base[: -len("/fhir")] + DICOMWEB_PATH
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}{DICOMWEB_PATH}"


def _for_base(core: dict[str, Any], base_url: str, issuer: str) -> dict[str, Any]:
    """``core`` with the URLs of ``base_url`` and ``issuer``; shallow copies, ``core`` is shared."""
    rest = core["rest"][0]
    dicomweb = dicomweb_url(base_url)
    return {
        **core,
        "implementation": {**core["implementation"], "url": base_url},
        "rest": [
            {
                "extension": [
                    {"url": WEBSOCKET_EXTENSION, "valueUrl": websocket_url(base_url)},
                    {"url": DICOMWEB_EXTENSION, "valueUrl": dicomweb},
                ],
                "mode": rest["mode"],
                "security": capability_security(issuer),
                **rest,
                "documentation": f"{rest['documentation']}; DICOMweb (QIDO-RS, WADO-RS, "
                f"STOW-RS) for the ImagingStudy resources' images at {dicomweb}",
            }
        ],
    }


_built: dict[tuple[int, int], tuple[Any, Router | None, dict[str, Any]]] = {}


def _statement(registry: Any, router: Router | None) -> dict[str, Any]:
    """The base-independent part of the statement for this registry and routes, built once."""
    key = (id(registry), id(router))
    hit = _built.get(key)
    if hit is None or hit[0] is not registry or hit[1] is not router:
        hit = (registry, router, _build_core(registry, router))
        _built[key] = hit
    return hit[2]
