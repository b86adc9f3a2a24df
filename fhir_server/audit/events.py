"""Build AuditEvent and Provenance resources (pure functions, no I/O).

AuditEvents follow the shape of IHE Basic Audit Log Patterns (BALP): ``type`` ``rest`` with the
RESTful interaction as ``subtype`` for FHIR requests, DICOM "User Authentication" for logins
and token events; the requesting user and the client application as agents with the network
address; the resources touched (and the patient, when known) as entities, a search's query
as a base64 ``query`` entity. They never carry resource content: in particular no chat text.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from fhir_server.auth.principal import Principal

AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
MSO_SUBTYPE = "https://mso.example.org/fhir/CodeSystem/audit-event-subtype"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
USER_SYSTEM = "https://mso.example.org/fhir/sid/user"
CLIENT_SYSTEM = "https://mso.example.org/fhir/sid/client"
PROVENANCE_ACTIVITY = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"

# RESTful interaction -> AuditEvent.action (C create, R read, U update, D delete, E execute).
ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "search-type": "E",
    "search-system": "E",
    "search-compartment": "E",
    "update": "U",
    "patch": "U",
    "delete": "D",
    "capabilities": "R",
    "transaction": "E",
    "batch": "E",
    "operation": "E",
}
# Login and token events (DICOM "User Authentication" with an MSO subtype).
AUTH_SUBTYPES = {
    "login": (DCM, "110122", "Login"),
    "logout": (DCM, "110123", "Logout"),
    "authorize": (MSO_SUBTYPE, "authorize", "Authorization request"),
    "token": (MSO_SUBTYPE, "token-issue", "Access token issued"),
    "refresh": (MSO_SUBTYPE, "token-refresh", "Access token refreshed"),
    "introspect": (MSO_SUBTYPE, "token-introspect", "Token introspected"),
    "revoke": (MSO_SUBTYPE, "token-revoke", "Token revoked"),
    "launch": (MSO_SUBTYPE, "launch", "Launch context created"),
    "export": (MSO_SUBTYPE, "export", "Bulk data export"),
}


@dataclass(slots=True)
class Interaction:
    """What happened in one FHIR request, as the REST layer saw it (``interaction`` ``None``:
    a request no route serves, refused before it became an interaction)."""

    interaction: str | None
    status: int
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: str | None = None
    operation: str | None = None
    query: str | None = None
    source: str | None = None
    message: str | None = None
    patients: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)  # versioned references of what was written


def outcome_code(status: int) -> str:
    """AuditEvent.outcome for an HTTP status: 0 success, 4 minor (client) or 8 serious failure."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _agents(
    principal: Principal | None,
    *,
    subject: str | None,
    client_id: str | None,
    source: str | None,
) -> list[dict[str, Any]]:
    """The human (or system) requestor and the client application, with the network address."""
    network = {"address": source, "type": "2"} if source else None
    user: dict[str, Any] = {
        "type": {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]},
        "requestor": True,
    }
    name = principal.subject if principal is not None else subject
    if principal is not None and principal.fhir_user:
        user["who"] = {"reference": principal.fhir_user}
        user["altId"] = principal.subject
    elif name:
        user["who"] = {"identifier": {"system": USER_SYSTEM, "value": name}}
    else:
        user["who"] = {"display": "anonymous"}
    if principal is not None:
        user["role"] = [{"text": principal.role.value}]
    if network:
        user["network"] = network
    agents = [user]
    client = principal.client_id if principal is not None else client_id
    if client:
        agents.append(
            {
                "type": {"coding": [_coding(DCM, "110150", "Application")]},
                "who": {"identifier": {"system": CLIENT_SYSTEM, "value": client}},
                "requestor": False,
            }
        )
    return agents


def _source() -> dict[str, Any]:
    return {
        "site": "MSO",
        "observer": {"display": "MSO FHIR Server"},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }


def interaction_event(
    principal: Principal | None, event: Interaction, recorded: str
) -> dict[str, Any]:
    """The AuditEvent of one FHIR interaction."""
    code = "search-type" if event.interaction == "search-compartment" else event.interaction
    references = list(event.entities)
    if event.resource_type and event.resource_id:
        ref = f"{event.resource_type}/{event.resource_id}"
        written = {r.split("/_history/")[0] for r in references}
        if ref not in written:
            references.insert(0, f"{ref}/_history/{event.version_id}" if event.version_id else ref)
    entities: list[dict[str, Any]] = [
        {
            "what": {"reference": ref},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
        }
        for ref in references
    ]
    for patient in event.patients:
        entities.append(
            {
                "what": {"reference": f"Patient/{patient}"},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if event.query is not None:
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "description": event.resource_type or "system",
                "query": base64.b64encode(event.query.encode()).decode("ascii"),
            }
        )
    if event.operation:
        entities.append({"name": f"${event.operation}", "description": "operation"})
    audit: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _coding(AUDIT_TYPE, "rest", "RESTful Operation"),
        "subtype": [_coding(INTERACTION, code, code)] if code else [],
        "action": ACTIONS.get(event.interaction, "E"),
        "recorded": recorded,
        "outcome": outcome_code(event.status),
        "agent": _agents(principal, subject=None, client_id=None, source=event.source),
        "source": _source(),
    }
    if event.message and event.status >= 400:
        audit["outcomeDesc"] = f"HTTP {event.status}: {event.message}"[:500]
    if entities:
        audit["entity"] = entities
    return audit


def auth_event(
    kind: str,
    success: bool,
    recorded: str,
    *,
    subject: str | None = None,
    client_id: str | None = None,
    source: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of a login, logout or token event (``kind`` a key of AUTH_SUBTYPES)."""
    system, code, display = AUTH_SUBTYPES[kind]
    audit: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _coding(DCM, "110114", "User Authentication"),
        "subtype": [_coding(system, code, display)],
        "action": "E",
        "recorded": recorded,
        "outcome": "0" if success else "4",
        "agent": _agents(None, subject=subject, client_id=client_id, source=source),
        "source": _source(),
    }
    if detail:
        audit["outcomeDesc"] = detail[:500]
    return audit


def provenance(
    principal: Principal, targets: list[str], activity: str, recorded: str
) -> dict[str, Any]:
    """The Provenance of the writes of one unit with one ``activity`` (the v3-DataOperation
    code CREATE, UPDATE or DELETE): ``targets`` are versioned references."""
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                _coding(
                    "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "author",
                    "Author",
                )
            ]
        },
    }
    if principal.fhir_user:
        agent["who"] = {"reference": principal.fhir_user}
    else:
        agent["who"] = {"identifier": {"system": USER_SYSTEM, "value": principal.subject}}
    agents = [agent]
    if principal.client_id:
        agents.append(
            {
                "type": {
                    "coding": [
                        _coding(
                            "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "assembler",
                            "Assembler",
                        )
                    ]
                },
                "who": {"identifier": {"system": CLIENT_SYSTEM, "value": principal.client_id}},
            }
        )
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target} for target in targets],
        "recorded": recorded,
        "activity": {"coding": [_coding(PROVENANCE_ACTIVITY, activity)]},
        "agent": agents,
    }
