"""Final recommendations are amended, never rewritten.

DESIGN.md (FHIR model, recommendation) and http://hl7.org/fhir/R4/diagnosticreport.html
(``DiagnosticReport.status``, http://hl7.org/fhir/R4/valueset-diagnostic-report-status.html):
once a report is released (``final``, or one of the amendment statuses ``amended``,
``corrected``, ``appended``) every later version is an amendment — status ``amended`` (or its
specialisations ``corrected`` / ``appended``) with a reason — or a retraction
(``entered-in-error``, also with a reason). A released report never goes back to a draft
status, and ``cancelled`` / ``entered-in-error`` reports are not changed at all.

The reason is the R4 core extension ``event-statusReason``
(http://hl7.org/fhir/R4/extension-event-statusreason.html, context DiagnosticReport) with a
``valueCodeableConcept`` whose ``text`` (or a coding) says why::

    "extension": [{
      "url": "http://hl7.org/fhir/StructureDefinition/event-statusReason",
      "valueCodeableConcept": {"text": "Corrected the laterality of the lesion"}
    }]

The previous version stays readable through ``_history`` (each amendment is a new version).
:func:`guard_update` and :func:`guard_delete` are rows of the guard table
(:mod:`fhir_server.workflow.guards`) that run for every writer, so REST PUT and PATCH,
transaction Bundles and the workflow's own writes all obey :func:`check_report_change`.

Errors: ``MSO-REPORT-001`` (409) a released report changed without amending it,
``MSO-REPORT-002`` (409) a status going back or leaving a terminal status,
``MSO-REPORT-003`` (422) an amendment or retraction without a reason,
``MSO-REPORT-004`` (409) a report amended before it was ever final,
``MSO-REPORT-005`` (409) a released report deleted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fhir_server.codes import EXT_EVENT_STATUS_REASON
from fhir_server.fhir.outcome import FhirError

if TYPE_CHECKING:
    from fhir_server.hooks import HookEvent

DRAFT_STATUSES = frozenset({"registered", "partial", "preliminary"})
"""Statuses of a report still being written: free to change."""
AMENDMENT_STATUSES = frozenset({"amended", "corrected", "appended"})
"""``amended`` and its two specialisations in the R4 value set."""
RELEASED_STATUSES = frozenset({"final"}) | AMENDMENT_STATUSES
"""Statuses of a report that has been released to the requester."""
TERMINAL_STATUSES = frozenset({"cancelled", "entered-in-error"})
"""Statuses after which a report does not change any more."""
_NEEDS_REASON = AMENDMENT_STATUSES | {"entered-in-error"}
_IGNORED = ("id", "meta", "text")


def amendment_reason(report: dict[str, Any]) -> str | None:
    """The reason text of the report's ``event-statusReason`` extension (``None`` if absent)."""
    for ext in report.get("extension") or ():
        if not isinstance(ext, dict) or ext.get("url") != EXT_EVENT_STATUS_REASON:
            continue
        concept = ext.get("valueCodeableConcept") or {}
        text = concept.get("text")
        if isinstance(text, str) and text.strip():
            return text.strip()
        for coding in concept.get("coding") or ():
            label = (coding or {}).get("display") or (coding or {}).get("code")
            if label:
                return str(label)
    return None


def with_amendment_reason(report: dict[str, Any], reason: str) -> dict[str, Any]:
    """A copy of ``report`` whose ``event-statusReason`` extension says ``reason``."""
    others = [
        e for e in report.get("extension") or () if (e or {}).get("url") != EXT_EVENT_STATUS_REASON
    ]
    ext = {"url": EXT_EVENT_STATUS_REASON, "valueCodeableConcept": {"text": reason}}
    return {**report, "extension": [*others, ext]}


def _content(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in _IGNORED}


def check_report_change(previous: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse a DiagnosticReport version that rewrites a released report.

    ``previous`` is the current version (``None`` for a create) and ``new`` the incoming one.
    Drafts change freely; a version identical to a released one (apart from ``id``, ``meta``
    and ``text``) is accepted as a no-op; anything else must follow the module's rules.
    """
    before = (previous or {}).get("status")
    after = new.get("status")
    if after in _NEEDS_REASON and amendment_reason(new) is None:
        raise FhirError(
            422,
            "required",
            f"A report with status '{after}' needs a reason: an extension "
            f"{EXT_EVENT_STATUS_REASON} with valueCodeableConcept.text",
            code="MSO-REPORT-003",
            expression=["DiagnosticReport.extension"],
        )
    if previous is None:
        return
    if before in TERMINAL_STATUSES:
        if _content(previous) != _content(new):
            raise FhirError(
                409,
                "conflict",
                f"A report with status '{before}' can no longer be changed",
                code="MSO-REPORT-002",
                expression=["DiagnosticReport.status"],
            )
        return
    if before in RELEASED_STATUSES:
        if after in AMENDMENT_STATUSES or after == "entered-in-error":
            return
        if after not in RELEASED_STATUSES:
            raise FhirError(
                409,
                "conflict",
                f"A released report cannot go back from '{before}' to '{after}'",
                code="MSO-REPORT-002",
                expression=["DiagnosticReport.status"],
            )
        if _content(previous) != _content(new):
            raise FhirError(
                409,
                "conflict",
                f"A '{before}' report is never edited: amend it (status 'amended' with a reason "
                f"in {EXT_EVENT_STATUS_REASON})",
                code="MSO-REPORT-001",
                expression=["DiagnosticReport.status"],
            )
        return
    if after in AMENDMENT_STATUSES:
        raise FhirError(
            409,
            "conflict",
            f"Only a final report can be amended; this one is '{before}'",
            code="MSO-REPORT-004",
            expression=["DiagnosticReport.status"],
        )


def check_report_delete(previous: dict[str, Any] | None) -> None:
    """Refuse deleting a released report (retract it with status ``entered-in-error``)."""
    status = (previous or {}).get("status")
    if status in RELEASED_STATUSES:
        raise FhirError(
            409,
            "conflict",
            f"A '{status}' report is not deleted: set status 'entered-in-error' with a reason",
            code="MSO-REPORT-005",
        )


def guard_update(event: HookEvent) -> None:
    """Guard: a DiagnosticReport's update (every writer, the workflow's own writes too)."""
    if event.resource is not None:
        check_report_change(event.previous, event.resource)


def guard_delete(event: HookEvent) -> None:
    """Guard: a DiagnosticReport's deletion (every writer)."""
    check_report_delete(event.previous)
