"""Final recommendations are amended, never rewritten (fhir_server.workflow.amendments)."""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import pytest

from fhir_server.codes import EXT_EVENT_STATUS_REASON
from fhir_server.fhir.outcome import FhirError
from fhir_server.hooks import HookEvent, HookPoint, Hooks
from fhir_server.workflow.amendments import (
    amendment_reason,
    check_report_change,
    check_report_delete,
    with_amendment_reason,
)
from fhir_server.workflow.guards import Guards, guard_table


def _report(status: str, conclusion: str = "No surgery.", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "meta": {"versionId": "3"},
        "status": status,
        "code": {"text": "recommendation"},
        "conclusion": conclusion,
        **extra,
    }


def _amended(conclusion: str = "Surgery after all.", reason: str = "New echo") -> dict[str, Any]:
    return with_amendment_reason(_report("amended", conclusion), reason)


def _code(exc: pytest.ExceptionInfo[FhirError]) -> tuple[int, str | None]:
    return exc.value.status, exc.value.code


@pytest.mark.parametrize("before", [None, "registered", "partial", "preliminary"])
@pytest.mark.parametrize("after", ["registered", "preliminary", "final", "cancelled"])
def test_drafts_change_freely(before: str | None, after: str) -> None:
    previous = None if before is None else _report(before, "draft")
    check_report_change(previous, _report(after, "changed"))


@pytest.mark.parametrize("before", ["final", "amended", "corrected", "appended"])
def test_released_report_is_not_edited(before: str) -> None:
    previous = with_amendment_reason(_report(before), "earlier reason")
    changed = with_amendment_reason(_report("final", "Rewritten."), "earlier reason")
    with pytest.raises(FhirError) as exc:
        check_report_change(previous, changed)
    assert _code(exc) == (409, "MSO-REPORT-001")


def test_unchanged_final_report_may_be_written_again() -> None:
    check_report_change(_report("final"), {**_report("final"), "meta": {"versionId": "9"}})


@pytest.mark.parametrize("after", ["registered", "partial", "preliminary", "cancelled", "unknown"])
def test_released_report_never_goes_back(after: str) -> None:
    with pytest.raises(FhirError) as exc:
        check_report_change(_report("final"), _report(after))
    assert _code(exc) == (409, "MSO-REPORT-002")


@pytest.mark.parametrize("after", ["amended", "corrected", "appended"])
def test_amendment_with_a_reason_is_accepted(after: str) -> None:
    new = with_amendment_reason(_report(after, "Surgery after all."), "New echocardiography")
    check_report_change(_report("final"), new)
    check_report_change(_amended(), with_amendment_reason(new, "second thoughts"))


def test_amendment_needs_a_reason() -> None:
    for new in (
        _report("amended", "Surgery after all."),
        _report("amended", extension=[{"url": EXT_EVENT_STATUS_REASON,
                                       "valueCodeableConcept": {"text": "  "}}]),
        _report("entered-in-error"),
    ):  # fmt: skip
        with pytest.raises(FhirError) as exc:
            check_report_change(_report("final"), new)
        assert _code(exc) == (422, "MSO-REPORT-003")


def test_reason_may_be_a_coding() -> None:
    new = _report(
        "amended",
        extension=[
            {
                "url": EXT_EVENT_STATUS_REASON,
                "valueCodeableConcept": {"coding": [{"code": "late-result", "display": "Late"}]},
            }
        ],
    )
    assert amendment_reason(new) == "Late"
    check_report_change(_report("final"), new)


def test_a_draft_cannot_be_amended() -> None:
    with pytest.raises(FhirError) as exc:
        check_report_change(_report("preliminary"), _amended())
    assert _code(exc) == (409, "MSO-REPORT-004")


def test_retraction_then_nothing() -> None:
    retracted = with_amendment_reason(_report("entered-in-error"), "wrong patient")
    check_report_change(_report("final"), retracted)
    check_report_change(retracted, {**retracted, "meta": {}})
    for new in (_amended(), _report("final")):
        with pytest.raises(FhirError) as exc:
            check_report_change(retracted, new)
        assert _code(exc) == (409, "MSO-REPORT-002")


def test_cancelled_is_terminal() -> None:
    with pytest.raises(FhirError) as exc:
        check_report_change(_report("cancelled"), _report("preliminary"))
    assert _code(exc) == (409, "MSO-REPORT-002")


def test_released_report_is_not_deleted() -> None:
    check_report_delete(_report("preliminary"))
    check_report_delete(None)
    with pytest.raises(FhirError) as exc:
        check_report_delete(_report("final"))
    assert _code(exc) == (409, "MSO-REPORT-005")


def test_with_amendment_reason_replaces_the_previous_reason() -> None:
    other = {"url": "http://example.org/x", "valueString": "keep"}
    report = with_amendment_reason(_report("amended", extension=[other]), "first")
    report = with_amendment_reason(report, "second")
    assert report["extension"][0] == other
    assert amendment_reason(report) == "second"
    assert len(report["extension"]) == 2


def test_registered_hooks_only_look_at_diagnostic_reports() -> None:
    hooks = Hooks()
    # the workflow's guard table, its other services stubbed (their rows do not match here)
    Guards(guard_table(Mock(), Mock(), Mock())).install(hooks)
    hooks.fire(
        HookEvent(HookPoint.BEFORE_UPDATE, "Observation", "o", {"status": "x"}, {"status": "final"})
    )
    with pytest.raises(FhirError):
        hooks.fire(
            HookEvent(
                HookPoint.BEFORE_UPDATE, "DiagnosticReport", "r1", _report("preliminary"),
                _report("final"),
            )
        )  # fmt: skip
    with pytest.raises(FhirError):
        hooks.fire(HookEvent(HookPoint.BEFORE_DELETE, "DiagnosticReport", "r1", None,
                             _report("final")))  # fmt: skip
