"""What a resource is, as far as access goes: chat content, an in-app notification, and the
references the access rows are made of. Pure functions of the resource's JSON, shared by the
rules (:mod:`.policy`), the access rows (:mod:`.access_index`) and the case projection
(:mod:`.case_projection`).
"""

from __future__ import annotations

from typing import Any

from fhir_server.codes import COMMUNICATION_CATEGORY_SYSTEM, COMMUNICATION_NOTIFICATION


def is_notification(res_type: str, body: dict[str, Any]) -> bool:
    """An in-app notification: a Communication of the MSO category ``notification``."""
    if res_type != "Communication":
        return False
    return any(
        (c or {}).get("system") == COMMUNICATION_CATEGORY_SYSTEM
        and (c or {}).get("code") == COMMUNICATION_NOTIFICATION
        for concept in body.get("category") or ()
        for c in (concept or {}).get("coding") or ()
    )


def is_chat(res_type: str, body: dict[str, Any]) -> bool:
    """Chat content: a Communication about a case (basedOn its ServiceRequest), or a Binary
    attached to a Communication (securityContext). Admins never see it."""
    if res_type == "Communication":
        return references(body.get("basedOn"), "ServiceRequest")
    if res_type == "Binary":
        return (
            id_of((body.get("securityContext") or {}).get("reference"), "Communication") is not None
        )
    return False


def references(refs: Any, rtype: str) -> bool:
    """True when one of the Reference elements ``refs`` points at a ``rtype``."""
    return any(id_of((ref or {}).get("reference"), rtype) for ref in refs or ())


def id_of(reference: str | None, rtype: str) -> str | None:
    """The id in a ``Type/id`` (or absolute / versioned) reference of type ``rtype``."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].split("/")
    if len(parts) >= 2 and parts[-2] == rtype:
        return parts[-1]
    return None


def has_code(concept: Any, code: str, system: str) -> bool:
    """True when the CodeableConcept ``concept`` has the coding ``system|code``."""
    return any(
        (c or {}).get("code") == code and (c or {}).get("system") == system
        for c in (concept or {}).get("coding") or ()
    )
