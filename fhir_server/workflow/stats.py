"""Case analytics for ``GET [base]/$mso-stats`` (issue 5, Analytics), computed in SQL.

Every figure is a grouped query over tables the server already keeps current; no case is
loaded into Python:

* the **cases** are the case Tasks (``idx_token`` on Task ``code`` = ``task-code|case``) whose
  ``focus`` (``idx_reference``) is a case ServiceRequest in ``case_access``; ``case_access``
  gives the Task status, the assigned PractitionerRole and the requesting organization;
* **times** come from ``idx_date`` rows of the case Task, in epoch milliseconds: submission =
  ``authored-on`` (``Task.authoredOn``, stamped at submission), SLA due = the MSO ``due``
  parameter (``Task.restriction.period.end``), Done = ``modified`` (``Task.lastModified``,
  stamped by every transition; a Done case no longer changes);
* **specialty** is the case ServiceRequest's ``code`` (``idx_token``);
* **acceptance** counts transitions in ``resource_history``: a case Task version whose
  ``status`` is ``accepted`` (or ``rejected``) while the version before it had another status,
  attributed to that version's ``owner`` (``$reject`` keeps the owner). This is the only place
  that reads JSON, because index rows exist for current versions only.

``start`` / ``end`` select cases by submission instant (inclusive; each may be absent) and every
figure is over the cases so selected: counts by status, specialty and requesting organization;
turnaround (submission -> Done, hours) over those of them that are Done, median and 90th
percentile with linear interpolation (``percentile_cont`` on PostgreSQL; on SQLite the two
neighbouring values are fetched with ``ORDER BY … LIMIT 2 OFFSET …`` and interpolated with the
same formula, so both databases give the same numbers); SLA breaches (Done after the due
instant, or neither Done nor Cancelled and past it at ``now``); per provider its open cases
(Assigned, Accepted, In progress, Returned) and accepted / rejected counts with
``acceptanceRate`` = accepted / (accepted + rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Select,
    Text,
    and_,
    cast,
    func,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB

from fhir_server.codes import (
    CASE_STATUS_SYSTEM,
    TASK_CODE_CASE,
    TASK_CODE_SYSTEM,
    TASK_STATUS_OF_CASE_STATUS,
    CaseStatus,
)
from fhir_server.search.registry import SearchRegistry
from fhir_server.search.types.token import h_sys_value
from fhir_server.storage.access_schema import case_access
from fhir_server.storage.index_schema import idx_date, idx_reference, idx_token
from fhir_server.storage.schema import resource, resource_history

MS_PER_HOUR = 3_600_000
HOURS_DECIMALS = 3
"""Turnaround hours are rounded to this many decimals (3.6 s), the same on every database."""
OPEN_WORK = (CaseStatus.ASSIGNED, CaseStatus.ACCEPTED, CaseStatus.IN_PROGRESS, CaseStatus.RETURNED)
"""Statuses in which a case is work of its assigned provider."""
CLOSED = (CaseStatus.DONE, CaseStatus.CANCELLED)
_TASK = {status: TASK_STATUS_OF_CASE_STATUS[status] for status in CaseStatus}
_CASE_OF_TASK = {task: case for case, task in _TASK.items()}


@dataclass(frozen=True, slots=True)
class ProviderFigures:
    """One PractitionerRole's open cases and accept/reject decisions."""

    role: str
    open_cases: int = 0
    accepted: int = 0
    rejected: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / (accepted + rejected); ``None`` before any decision."""
        decided = self.accepted + self.rejected
        return self.accepted / decided if decided else None


@dataclass(slots=True)
class CaseStats:
    """The figures of :func:`case_stats` (see the module docstring)."""

    total: int = 0
    by_status: dict[CaseStatus, int] = field(default_factory=dict)
    by_specialty: dict[tuple[str, str], int] = field(default_factory=dict)
    by_requester: dict[str | None, int] = field(default_factory=dict)
    done: int = 0
    median_hours: float | None = None
    p90_hours: float | None = None
    breaches_done: int = 0
    breaches_open: int = 0
    providers: list[ProviderFigures] = field(default_factory=list)


def case_stats(
    conn: Connection,
    registry: SearchRegistry,
    *,
    start_ms: int | None,
    end_ms: int | None,
    now_ms: int,
) -> CaseStats:
    """The case figures over cases submitted in ``[start_ms, end_ms]`` (epoch ms, inclusive)."""
    cases = _cases(registry, start_ms, end_ms).cte("mso_cases")
    c = cases.c
    out = CaseStats()

    rows = conn.execute(select(c.status, func.count()).group_by(c.status)).all()
    for task_status, count in rows:
        status = _CASE_OF_TASK.get(task_status)
        if status is not None:
            out.by_status[status] = out.by_status.get(status, 0) + int(count)
        out.total += int(count)

    specialty = _identity(registry, "ServiceRequest", "code")
    spec = idx_token.alias("spec")
    request = resource.alias("case_request")
    rows = conn.execute(
        select(spec.c.system, spec.c.code, func.count(func.distinct(c.case_id)))
        .select_from(
            cases.join(
                request,
                and_(request.c.res_type == "ServiceRequest", request.c.res_id == c.case_id),
            ).join(spec, and_(spec.c.pid == request.c.pid, spec.c.hash_identity == specialty))
        )
        .where(spec.c.code.is_not(None))
        .group_by(spec.c.system, spec.c.code)
    ).all()
    out.by_specialty = {(system or "", code): int(n) for system, code, n in rows}

    rows = conn.execute(select(c.requester_org, func.count()).group_by(c.requester_org)).all()
    out.by_requester = {org: int(n) for org, n in rows}

    done = _TASK[CaseStatus.DONE]
    closed = [_TASK[s] for s in CLOSED]
    breaches = conn.execute(
        select(
            func.count().filter(and_(c.status == done, c.done_at > c.due)),
            func.count().filter(and_(c.status.not_in(closed), c.due < now_ms)),
        )
    ).one()
    out.breaches_done, out.breaches_open = int(breaches[0]), int(breaches[1])

    turnaround = (
        select((c.done_at - c.submitted).label("ms"))
        .where(c.status == done, c.done_at.is_not(None))
        .subquery("turnaround")
    )
    out.done = int(conn.execute(select(func.count()).select_from(turnaround)).scalar_one())
    if out.done:
        median, p90 = _percentiles(conn, turnaround.c.ms, out.done, (0.5, 0.9))
        out.median_hours = round(median / MS_PER_HOUR, HOURS_DECIMALS)
        out.p90_hours = round(p90 / MS_PER_HOUR, HOURS_DECIMALS)

    out.providers = _providers(conn, cases)
    return out


def _identity(registry: SearchRegistry, rtype: str, code: str) -> int:
    param = registry.get(rtype, code)
    if param is None:  # the registry ships every one of these; a missing one is a bug
        raise LookupError(f"search parameter {rtype}:{code} is not registered")
    return param.identity(rtype)


def _cases(registry: SearchRegistry, start_ms: int | None, end_ms: int | None) -> Select:
    """One row per case: ids, status, provider, organization, submitted / due / done (ms)."""
    code_identity = _identity(registry, "Task", "code")
    kind = idx_token.alias("task_code")
    focus = idx_reference.alias("task_focus")
    submitted = idx_date.alias("submitted")
    due = idx_date.alias("due")
    modified = idx_date.alias("modified")
    ca = case_access.c

    def on(alias: Any, code: str) -> ColumnElement[bool]:
        return and_(
            alias.c.pid == kind.c.pid, alias.c.hash_identity == _identity(registry, "Task", code)
        )

    query = (
        select(
            ca.case_id,
            kind.c.pid.label("task_pid"),
            ca.status,
            ca.provider_role,
            ca.requester_org,
            submitted.c.low.label("submitted"),
            due.c.low.label("due"),
            modified.c.low.label("done_at"),
        )
        .select_from(
            kind.join(focus, and_(on(focus, "focus"), focus.c.target_type == "ServiceRequest"))
            .join(case_access, ca.case_id == focus.c.target_id)
            .join(submitted, on(submitted, "authored-on"))
            .outerjoin(due, on(due, "due"))
            .outerjoin(modified, on(modified, "modified"))
        )
        .where(
            kind.c.hash_sys_value == h_sys_value(code_identity, TASK_CODE_SYSTEM, TASK_CODE_CASE)
        )
    )
    if start_ms is not None:
        query = query.where(submitted.c.low >= start_ms)
    if end_ms is not None:
        query = query.where(submitted.c.low <= end_ms)
    return query


def _percentiles(
    conn: Connection, value: Any, count: int, fractions: tuple[float, ...]
) -> list[float]:
    """Continuous percentiles (linear interpolation between the closest ranks) of ``value``."""
    if conn.dialect.name == "postgresql":
        row = conn.execute(
            select(*(func.percentile_cont(f).within_group(cast(value, Float)) for f in fractions))
        ).one()
        return [float(v) for v in row]
    out = []
    for fraction in fractions:
        rank = fraction * (count - 1)
        low = math.floor(rank)
        pair = conn.execute(select(value).order_by(value).limit(2).offset(low)).scalars().all()
        first = float(pair[0])
        second = float(pair[1]) if len(pair) > 1 else first
        out.append(first + (second - first) * (rank - low))
    return out


def _json_text(conn: Connection, content: Any, *path: str) -> ColumnElement[Any]:
    """SQL: the text at ``path`` in a stored resource's JSON content."""
    if conn.dialect.name == "postgresql":
        document = cast(func.convert_from(content, literal("UTF8")), JSONB)
        return document[path].astext if len(path) > 1 else document[path[0]].astext
    return func.json_extract(cast(content, Text), "$." + ".".join(path))


def _providers(conn: Connection, cases: Any) -> list[ProviderFigures]:
    """Open cases per provider (``case_access``) and decisions per provider (Task history)."""
    c = cases.c
    figures: dict[str, dict[str, int]] = {}
    rows = conn.execute(
        select(c.provider_role, func.count())
        .where(c.provider_role.is_not(None), c.status.in_([_TASK[s] for s in OPEN_WORK]))
        .group_by(c.provider_role)
    ).all()
    for role, n in rows:
        figures.setdefault(role, {})["open"] = int(n)

    h = resource_history.c
    task_status = _json_text(conn, h.content, "status")
    versions = (
        select(
            _json_text(conn, h.content, "owner", "reference").label("owner"),
            task_status.label("status"),
            func.lag(task_status).over(partition_by=h.pid, order_by=h.version).label("previous"),
        )
        .select_from(resource_history.join(cases, h.pid == c.task_pid))
        .where(h.res_type == "Task", h.deleted.is_(False))
        .subquery("versions")
    )
    v = versions.c
    decisions = (_TASK[CaseStatus.ACCEPTED], _TASK[CaseStatus.REJECTED])
    rows = conn.execute(
        select(v.owner, v.status, func.count())
        .where(
            v.status.in_(decisions),
            v.owner.is_not(None),
            (v.previous.is_(None)) | (v.previous != v.status),
        )
        .group_by(v.owner, v.status)
    ).all()
    for owner, status, n in rows:
        role = str(owner).removeprefix("PractitionerRole/")
        figures.setdefault(role, {})[status] = int(n)
    return [
        ProviderFigures(
            role=role,
            open_cases=values.get("open", 0),
            accepted=values.get(decisions[0], 0),
            rejected=values.get(decisions[1], 0),
        )
        for role, values in sorted(figures.items())
    ]


def as_parameters(
    stats: CaseStats, *, start: str | None = None, end: str | None = None
) -> dict[str, Any]:
    """The figures as a FHIR ``Parameters`` resource (the answer of ``$mso-stats``)."""
    params: list[dict[str, Any]] = []
    if start:
        params.append({"name": "start", "valueString": start})
    if end:
        params.append({"name": "end", "valueString": end})
    params.append({"name": "total", "valueInteger": stats.total})
    for status in CaseStatus:
        params.append(
            {
                "name": "status",
                "part": [
                    {"name": "code", "valueCoding": {"system": CASE_STATUS_SYSTEM, "code": status}},
                    {"name": "count", "valueInteger": stats.by_status.get(status, 0)},
                ],
            }
        )
    for (system, code), count in sorted(stats.by_specialty.items()):
        coding = {"system": system, "code": code} if system else {"code": code}
        params.append(
            {
                "name": "specialty",
                "part": [
                    {"name": "code", "valueCoding": coding},
                    {"name": "count", "valueInteger": count},
                ],
            }
        )
    for org, count in sorted(stats.by_requester.items(), key=lambda kv: (kv[0] is None, kv[0])):
        parts: list[dict[str, Any]] = []
        if org is not None:
            parts.append(
                {"name": "organization", "valueReference": {"reference": f"Organization/{org}"}}
            )
        parts.append({"name": "count", "valueInteger": count})
        params.append({"name": "requester", "part": parts})
    turnaround: list[dict[str, Any]] = [{"name": "count", "valueInteger": stats.done}]
    if stats.median_hours is not None and stats.p90_hours is not None:
        turnaround.append({"name": "medianHours", "valueDecimal": stats.median_hours})
        turnaround.append({"name": "p90Hours", "valueDecimal": stats.p90_hours})
    params.append({"name": "turnaround", "part": turnaround})
    params.append(
        {
            "name": "slaBreaches",
            "part": [
                {"name": "total", "valueInteger": stats.breaches_done + stats.breaches_open},
                {"name": "done", "valueInteger": stats.breaches_done},
                {"name": "open", "valueInteger": stats.breaches_open},
            ],
        }
    )
    for provider in stats.providers:
        parts = [
            {"name": "role", "valueReference": {"reference": f"PractitionerRole/{provider.role}"}},
            {"name": "openCases", "valueInteger": provider.open_cases},
            {"name": "accepted", "valueInteger": provider.accepted},
            {"name": "rejected", "valueInteger": provider.rejected},
        ]
        rate = provider.acceptance_rate
        if rate is not None:
            parts.append({"name": "acceptanceRate", "valueDecimal": round(rate, 4)})
        params.append({"name": "provider", "part": parts})
    return {"resourceType": "Parameters", "parameter": params}


__all__ = ["CaseStats", "ProviderFigures", "as_parameters", "case_stats"]
