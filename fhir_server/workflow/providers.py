"""Ranking providers for a case (``$suggest-providers``).

Candidates are the active PractitionerRoles whose ``specialty`` matches the case's requested
specialty (``ServiceRequest.code``), who are not on leave now (``notAvailable.during``) and
whose ``period`` has not ended. They are ranked by open workload — how many cases they hold in
Assigned, Accepted, In progress or Returned, counted in SQL from ``case_access`` — then those
inside their ``availableTime`` now first, then by id. The provider who just rejected the case
is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from fhir_server.codes import TASK_STATUS_OF_CASE_STATUS, CaseStatus
from fhir_server.storage.access_schema import case_access

if TYPE_CHECKING:
    from fhir_server.storage.repository import StoredResource, Tx

OPEN_WORK_TASK_STATUSES = tuple(
    TASK_STATUS_OF_CASE_STATUS[s]
    for s in (CaseStatus.ASSIGNED, CaseStatus.ACCEPTED, CaseStatus.IN_PROGRESS, CaseStatus.RETURNED)
)
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ranked provider."""

    role: StoredResource
    workload: int
    available_now: bool


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _covers(period: dict[str, Any] | None, now: datetime) -> bool:
    start, end = _instant((period or {}).get("start")), _instant((period or {}).get("end"))
    return (start is None or start <= now) and (end is None or now <= end)


def on_leave(role: dict[str, Any], now: datetime) -> bool:
    """True when a ``notAvailable.during`` period covers ``now``."""
    return any(
        (na or {}).get("during") and _covers(na["during"], now)
        for na in role.get("notAvailable") or ()
    )


def available_now(role: dict[str, Any], now: datetime) -> bool:
    """True when ``availableTime`` covers ``now`` (or states no hours at all)."""
    times = role.get("availableTime") or ()
    if not times:
        return True
    day, clock = _DAYS[now.weekday()], now.strftime("%H:%M:%S")
    for slot in times:
        days = (slot or {}).get("daysOfWeek")
        if days and day not in days:
            continue
        if slot.get("allDay"):
            return True
        start, end = slot.get("availableStartTime") or "00:00:00", slot.get("availableEndTime")
        if start <= clock and (end is None or clock <= end):
            return True
    return False


def workloads(tx: Tx, role_ids: list[str]) -> dict[str, int]:
    """Open cases per PractitionerRole id, counted in one grouped SQL query."""
    if not role_ids:
        return {}
    ca = case_access.c
    rows = tx.conn.execute(
        select(ca.provider_role, func.count())
        .where(ca.provider_role.in_(role_ids), ca.status.in_(OPEN_WORK_TASK_STATUSES))
        .group_by(ca.provider_role)
    )
    return {row[0]: int(row[1]) for row in rows}


def rank(
    tx: Tx, request: dict[str, Any], *, exclude: set[str], now: datetime | None = None
) -> list[Candidate]:
    """The ranked candidates for the case ``request``."""
    now = now or datetime.now(UTC)
    codings = [
        f"{c['system']}|{c['code']}"
        for c in (request.get("code") or {}).get("coding") or ()
        if (c or {}).get("system") and (c or {}).get("code")
    ]
    if not codings:
        return []
    with tx.internal():
        roles = tx.find("PractitionerRole", [("specialty", ",".join(codings)), ("active", "true")])
    roles = [
        r
        for r in roles
        if r.res_id not in exclude
        and _covers(r.resource.get("period"), now)
        and not on_leave(r.resource, now)
    ]
    load = workloads(tx, [r.res_id for r in roles])
    ranked = [Candidate(r, load.get(r.res_id, 0), available_now(r.resource, now)) for r in roles]
    ranked.sort(key=lambda c: (c.workload, not c.available_now, c.role.res_id))
    return ranked


def as_parameters(candidates: list[Candidate]) -> dict[str, Any]:
    """The ranking as a Parameters resource: one ``provider`` parameter per candidate."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "provider",
                "part": [
                    {"name": "rank", "valueInteger": index},
                    {"name": "role", "valueReference": {"reference": c.role.reference}},
                    {"name": "workload", "valueInteger": c.workload},
                    {"name": "availableNow", "valueBoolean": c.available_now},
                ],
            }
            for index, c in enumerate(candidates, start=1)
        ],
    }
