"""The recommendation PDF: every piece of the case is in the text a PDF parser extracts."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import UTC, datetime
from typing import Any

import pytest
from pypdf import PdfReader

from fhir_server.workflow import report_pdf
from fhir_server.workflow.amendments import with_amendment_reason
from fhir_server.workflow.report_pdf import attach_pdf, render_recommendation

SIGNED_AT = "2024-03-05T14:30:00Z"


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"given": ["Zoë", "Åsa"], "family": "Łukasiewicz-Müller"}],
        "birthDate": "1971-02-03",
        "gender": "female",
        "identifier": [
            {"type": {"text": "National ID"}, "value": "NID-77881"},
            {"system": "urn:mso:mrn:hospital-7", "value": "MRN-0042"},
        ],
    }


def _service_request() -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"code": "cardiology", "display": "Cardiology"}]},
        "note": [{"text": "Is surgery indicated for the mitral valve prolapse?"}],
    }


def _report(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "recommendation"},
        "result": [{"reference": "Observation/1", "display": "Moderate mitral regurgitation"}],
        "conclusion": "Watchful waiting; echocardiography in 6 months & <no> surgery now.",
        "conclusionCode": [{"text": "Conservative management"}],
        **extra,
    }


def _provider() -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "specialty": [{"coding": [{"code": "cardiology", "display": "Cardiology"}]}],
    }


def _practitioner() -> dict[str, Any]:
    return {"resourceType": "Practitioner", "name": [{"prefix": ["Dr."], "given": ["Søren"],
                                                       "family": "Ødegård"}]}  # fmt: skip


def _render(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "case_number": "CASE-7KQ2ZX",
        "patient": _patient(),
        "service_request": _service_request(),
        "report": _report(),
        "provider": _provider(),
        "practitioner": _practitioner(),
        "signed_at": SIGNED_AT,
    }
    args.update(overrides)
    return render_recommendation(**args)


def _text(pdf: bytes) -> str:
    reader = PdfReader(io.BytesIO(pdf))
    return " ".join((page.extract_text() or "") for page in reader.pages)


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_every_piece_of_the_case_is_in_the_pdf() -> None:
    pdf = _render()
    assert pdf.startswith(b"%PDF-")
    text = _squash(_text(pdf))
    expected = [
        "CASE-7KQ2ZX",
        "Zoë Åsa Łukasiewicz-Müller",
        "1971-02-03",
        "National ID: NID-77881",
        "urn:mso:mrn:hospital-7: MRN-0042",
        "Is surgery indicated for the mitral valve prolapse?",
        "Cardiology",
        "Moderate mitral regurgitation",
        "Conservative management",
        "Watchful waiting; echocardiography in 6 months & <no> surgery now.",
        "Dr. Søren Ødegård",
        "Electronically signed on 2024-03-05 14:30 UTC",
    ]
    for piece in expected:
        assert piece in text, piece


def test_a4_and_metadata_from_signed_at() -> None:
    reader = PdfReader(io.BytesIO(_render()))
    box = reader.pages[0].mediabox
    assert (round(float(box.width)), round(float(box.height))) == (595, 842)
    meta = reader.metadata
    assert meta is not None
    assert meta.title == "Recommendation CASE-7KQ2ZX"
    assert meta.author == "Dr. Søren Ødegård"
    assert meta.creation_date == datetime(2024, 3, 5, 14, 30, tzinfo=UTC)


def test_deterministic() -> None:
    assert _render() == _render()
    assert _render() != _render(signed_at="2024-03-06T09:00:00Z")


def test_amended_report_shows_the_reason() -> None:
    report = with_amendment_reason(_report(status="amended"), "Corrected the valve named")
    text = _squash(_text(_render(report=report)))
    assert "Amended report. Reason: Corrected the valve named" in text


def test_missing_parts_render_placeholders() -> None:
    text = _squash(
        _text(
            _render(
                patient={"resourceType": "Patient"},
                service_request={"resourceType": "ServiceRequest"},
                report={"resourceType": "DiagnosticReport", "status": "final",
                        "performer": [{"display": "Dr. Who"}]},
                provider=None,
                practitioner=None,
            )
        )
    )  # fmt: skip
    assert "(no question recorded)" in text
    assert "No separate findings recorded." in text
    assert "(no recommendation recorded)" in text
    assert "Dr. Who" in text


def test_long_text_flows_onto_more_pages() -> None:
    long = "\n".join(f"Paragraph {i}: " + "lorem ipsum " * 30 for i in range(60))
    pdf = _render(report=_report(conclusion=long))
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) > 1
    assert "Paragraph 59:" in _text(pdf)


def test_without_unicode_fonts_it_still_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_pdf, "_FONT_CANDIDATES", ())
    report_pdf.fonts.cache_clear()
    try:
        assert report_pdf.fonts().unicode is False
        text = _squash(_text(_render()))
        assert "Zoë Åsa" in text  # Latin-1 survives
        assert "Electronically signed" in text
    finally:
        report_pdf.fonts.cache_clear()


def test_attach_pdf_sets_presented_form() -> None:
    pdf = _render()
    report = _report()
    out = attach_pdf(report, pdf, "Recommendation CASE-7KQ2ZX", creation=SIGNED_AT)
    assert "presentedForm" not in report
    (form,) = out["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert base64.b64decode(form["data"]) == pdf
    assert form["size"] == len(pdf)
    assert base64.b64decode(form["hash"]) == hashlib.sha1(pdf).digest()
    assert form["title"] == "Recommendation CASE-7KQ2ZX"
    assert form["creation"] == SIGNED_AT
    from fhir_server.fhir.validation import validate_resource

    validate_resource(out)
