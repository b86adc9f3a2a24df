"""``GET [base]/$mso-stats``: case analytics for administrators (issue 5, Analytics).

A system-level MSO operation (http://hl7.org/fhir/R4/operations.html). Parameters (query or a
Parameters body): ``start`` and ``end``, FHIR dates (``2026``, ``2026-03``, ``2026-03-01`` or a
dateTime) bounding the cases' submission instant, inclusive at the precision given (``end=2026-03``
takes all of March); either may be left out. The answer is a ``Parameters`` resource built by
:func:`fhir_server.workflow.stats.as_parameters`; the figures are computed in SQL by
:func:`fhir_server.workflow.stats.case_stats`.

Only administrators and backend system clients without an organization may call it
(``MSO-STATS-403``); a bad date is ``MSO-STATS-400``.
"""

from __future__ import annotations

from typing import Any

from fhir_server.auth.policy import require_platform
from fhir_server.auth.scopes import Permission
from fhir_server.codes import CANONICAL_BASE
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read
from fhir_server.interactions.operations import Operation, register
from fhir_server.search.types.date import date_range
from fhir_server.storage.repository import utc_now
from fhir_server.workflow import stats

OPERATION_MSO_STATS = f"{CANONICAL_BASE}/OperationDefinition/mso-stats"


def _check_role(caller: Any) -> None:
    require_platform(caller, "read case analytics", "MSO-STATS-403")


def _arguments(req: FhirRequest) -> dict[str, str]:
    """``start`` / ``end`` from the query string, else from a Parameters body."""
    out = {name: value for name, value in req.params if name in ("start", "end")}
    body = req.body
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        for parameter in body.get("parameter") or ():
            name = (parameter or {}).get("name")
            if name in ("start", "end") and name not in out:
                value = parameter.get("valueDate") or parameter.get("valueDateTime")
                if isinstance(value, str):
                    out[name] = value
    return out


def _bound(name: str, value: str | None, *, upper: bool) -> int | None:
    """Epoch milliseconds of a date bound (the last millisecond of ``end``'s period)."""
    if value is None:
        return None
    try:
        low, high = date_range(value)
    except ValueError:
        raise FhirError(
            400, "invalid", f"'{name}' must be a FHIR date, not '{value}'", code="MSO-STATS-400"
        ) from None
    return high if upper else low


def _mso_stats(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/$mso-stats?start=…&end=…"""
    _check_role(ctx.caller)
    policy = ctx.repo.policy
    if policy is not None:
        for rtype in ("Task", "ServiceRequest"):
            policy.require(ctx.caller, rtype, Permission.SEARCH)
    args = _arguments(req)
    start_ms = _bound("start", args.get("start"), upper=False)
    end_ms = _bound("end", args.get("end"), upper=True)
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise FhirError(400, "invalid", "'start' is after 'end'", code="MSO-STATS-400")
    now_ms = int(utc_now().timestamp() * 1000)
    figures = run_read(
        ctx,
        lambda tx: stats.case_stats(
            tx.conn, ctx.repo.registry, start_ms=start_ms, end_ms=end_ms, now_ms=now_ms
        ),
    )
    return FhirResponse(
        resource=stats.as_parameters(figures, start=args.get("start"), end=args.get("end"))
    )


register(
    Operation(
        name="mso-stats",
        levels=frozenset({"system"}),
        handler=_mso_stats,
        definition=OPERATION_MSO_STATS,
        idempotent=True,
        documentation="Admin: case analytics (status, specialty, requester, turnaround, SLA, "
        "provider workload and acceptance) over a submission-date range",
    )
)
