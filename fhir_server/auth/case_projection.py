"""The case projection: one ``case_access`` row per case, kept current from the case's
ServiceRequest (patient, requester and its organization, performer) and its workflow Task
(assignment and status), so that "the cases this caller may see" is one indexed lookup for the
rules of :mod:`.policy` (DESIGN.md, Access). Written in the transaction of the write it follows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.resource_kinds import has_code, id_of
from fhir_server.codes import TASK_CODE_CASE, TASK_CODE_SYSTEM
from fhir_server.storage.access import AccessUnit
from fhir_server.storage.access_schema import case_access
from fhir_server.storage.records import StoredResource


def project_case(unit: AccessUnit, stored: StoredResource) -> None:
    """Keep ``case_access`` current from a case (ServiceRequest) or its workflow Task; other
    resources change nothing."""
    if stored.res_type == "ServiceRequest":
        _project_request(unit, stored)
    elif stored.res_type == "Task":
        _project_task(unit, stored.resource)


def _project_request(unit: AccessUnit, stored: StoredResource) -> None:
    body = stored.resource
    requester = (body.get("requester") or {}).get("reference")
    caller = unit.caller
    org = _organization_of(unit, requester)
    if org is None and isinstance(caller, Principal) and caller.role is Role.REQUESTER:
        org = caller.organization
    performer = next(
        (
            ref.split("/")[-1]
            for p in body.get("performer") or ()
            if (ref := (p or {}).get("reference") or "").startswith("PractitionerRole/")
        ),
        None,
    )
    values: dict[str, Any] = {
        "patient_id": id_of((body.get("subject") or {}).get("reference"), "Patient"),
        "requester_ref": requester,
    }
    if org is not None:
        values["requester_org"] = org
    if performer is not None:
        values["provider_role"] = performer
    _upsert_case(unit.conn, stored.res_id, values)


def _project_task(unit: AccessUnit, body: dict[str, Any]) -> None:
    """A case's workflow Task (code ``case``) carries its assignment (owner) and status."""
    if not has_code(body.get("code"), TASK_CODE_CASE, TASK_CODE_SYSTEM) or body.get("partOf"):
        return
    case_id = id_of((body.get("focus") or {}).get("reference"), "ServiceRequest")
    if case_id is None:
        case_id = next(
            (
                cid
                for b in body.get("basedOn") or ()
                if (cid := id_of((b or {}).get("reference"), "ServiceRequest"))
            ),
            None,
        )
    if case_id is None:
        return
    owner = id_of((body.get("owner") or {}).get("reference"), "PractitionerRole")
    _upsert_case(unit.conn, case_id, {"provider_role": owner, "status": body.get("status")})


def _organization_of(unit: AccessUnit, reference: str | None) -> str | None:
    if not reference or "/" not in reference:
        return None
    rtype, rid = reference.split("/")[-2:]
    if rtype == "Organization":
        return rid
    if rtype == "PractitionerRole":
        role = unit.current("PractitionerRole", rid)
        if role is not None and not role.deleted:
            org = (role.resource.get("organization") or {}).get("reference")
            return id_of(org, "Organization")
    return None


def _upsert_case(conn: Connection, case_id: str, values: dict[str, Any]) -> None:
    """Insert or update the ``case_access`` row of ``case_id`` (only the given columns)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(case_access).values(case_id=case_id, **values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[case_access.c.case_id],
        set_={k: stmt.excluded[k] for k in values},
    )
    conn.execute(stmt)
