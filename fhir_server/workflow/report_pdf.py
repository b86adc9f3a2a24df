"""The recommendation PDF: the signed document a case's DiagnosticReport carries.

DESIGN.md (FHIR model): a recommendation is a DiagnosticReport whose ``presentedForm`` holds a
PDF rendered by the server (http://hl7.org/fhir/R4/diagnosticreport.html#presentation). This
module renders that PDF with reportlab from the case's resources and attaches it as a FHIR
Attachment (http://hl7.org/fhir/R4/datatypes.html#Attachment).

What goes where:

* header — the case number and the report's status (``amended`` reports say so, with the
  amendment reason, see :mod:`fhir_server.workflow.amendments`);
* patient — ``Patient.name``, ``birthDate``, ``gender`` and every ``identifier``;
* clinical question — ``ServiceRequest.note[].text`` (and the requested specialty,
  ``ServiceRequest.code``);
* findings — the ``DiagnosticReport.result[].display`` texts and ``media[].comment``;
* recommendation — ``DiagnosticReport.conclusionCode`` (display or text) and ``conclusion``;
* provider — the practitioner's name and the PractitionerRole's ``specialty``;
* signature — name, date and "Electronically signed".

The output is deterministic: reportlab's invariant mode fixes the document id, and the
creation date in the PDF metadata is ``signed_at``, so the same inputs give the same bytes.
Text is set in DejaVu Sans when the Debian fonts are installed (any script DejaVu covers),
else in the Vera TrueType fonts shipped with reportlab, else in Helvetica (Latin-1 only;
characters outside it are replaced rather than failing the render).
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import (
    Flowable,
    HRFlowable,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

PDF_CONTENT_TYPE = "application/pdf"
SIGNATURE_TEXT = "Electronically signed"
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
_FONT_CANDIDATES = (
    ("MsoDejaVu", _DEJAVU / "DejaVuSans.ttf", _DEJAVU / "DejaVuSans-Bold.ttf"),
    ("MsoVera", Path("Vera.ttf"), Path("VeraBd.ttf")),  # shipped in reportlab/fonts
)


@dataclass(frozen=True, slots=True)
class Fonts:
    """The regular and bold font names registered with reportlab, and whether they are
    TrueType (Unicode) or the Latin-1 base-14 fallback."""

    regular: str
    bold: str
    unicode: bool


@cache
def fonts() -> Fonts:
    """Register the best available fonts once per process."""
    for name, regular, bold in _FONT_CANDIDATES:
        try:
            pdfmetrics.registerFont(TTFont(name, str(regular)))
            pdfmetrics.registerFont(TTFont(name + "-Bold", str(bold)))
        except Exception:  # reportlab raises TTFError or OSError for a missing/bad file
            continue
        return Fonts(name, name + "-Bold", True)
    return Fonts("Helvetica", "Helvetica-Bold", False)


# -- reading the resources ---------------------------------------------------------------------


def human_name(names: Any) -> str:
    """The first usable ``HumanName`` as display text (``text``, else prefix given family)."""
    for name in names or ():
        if not isinstance(name, dict):
            continue
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("prefix", ()), *name.get("given", ()), name.get("family", "")]
        text = " ".join(str(p) for p in parts if p)
        if text:
            return text
    return ""


def concept_text(concept: Any) -> str:
    """A CodeableConcept as text: ``text``, else the first coding's display, else its code."""
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or ():
        label = (coding or {}).get("display") or (coding or {}).get("code")
        if label:
            return str(label)
    return ""


def identifier_text(identifier: dict[str, Any]) -> str:
    """``label: value`` for an Identifier (label from its type, else its system)."""
    value = str(identifier.get("value") or "")
    label = concept_text(identifier.get("type")) or str(identifier.get("system") or "")
    return f"{label}: {value}" if label else value


def _texts(items: Iterable[str]) -> list[str]:
    return [t for t in (s.strip() for s in items) if t]


def _date_text(value: str) -> str:
    """A FHIR date/dateTime/instant as ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM UTC``."""
    if len(value) <= 10:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _pdf_date(signed_at: str) -> str:
    """``signed_at`` as a PDF date string (``D:YYYYMMDDHHmmSS+00'00'``)."""
    try:
        moment = datetime.fromisoformat(signed_at.replace("Z", "+00:00"))
    except ValueError:
        return "D:20000101000000+00'00'"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("D:%Y%m%d%H%M%S+00'00'")


def amendment_reason(report: dict[str, Any]) -> str | None:
    """The reason an amended report gives (see :mod:`fhir_server.workflow.amendments`)."""
    from fhir_server.workflow.amendments import amendment_reason as reason_of

    return reason_of(report)


# -- layout ------------------------------------------------------------------------------------


class _Styles:
    def __init__(self, f: Fonts) -> None:
        self.title = ParagraphStyle("title", fontName=f.bold, fontSize=16, leading=20)
        self.sub = ParagraphStyle("sub", fontName=f.regular, fontSize=10, leading=13)
        self.heading = ParagraphStyle(
            "heading", fontName=f.bold, fontSize=11.5, leading=15, spaceBefore=9, spaceAfter=3
        )
        self.body = ParagraphStyle("body", fontName=f.regular, fontSize=10, leading=13.5)
        self.label = ParagraphStyle("label", fontName=f.bold, fontSize=10, leading=13.5)
        self.small = ParagraphStyle(
            "small", fontName=f.regular, fontSize=8, leading=10, textColor=colors.grey
        )


def _para(text: str, style: ParagraphStyle, *, unicode: bool) -> Paragraph:
    """A paragraph of plain text (markup escaped, line breaks kept)."""
    if not unicode:
        text = text.encode("latin-1", "replace").decode("latin-1")
    return Paragraph(escape(text).replace("\n", "<br/>"), style)


def _facts(rows: list[tuple[str, str]], s: _Styles, *, unicode: bool) -> Table:
    """A two-column label/value table."""
    data = [
        [_para(label, s.label, unicode=unicode), _para(value, s.body, unicode=unicode)]
        for label, value in rows
    ]
    table = Table(data, colWidths=[42 * mm, None], hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
            ]
        )
    )
    return table


def render_recommendation(
    *,
    case_number: str,
    patient: dict[str, Any],
    service_request: dict[str, Any],
    report: dict[str, Any],
    provider: dict[str, Any] | None,
    practitioner: dict[str, Any] | None,
    signed_at: str,
) -> bytes:
    """Render the recommendation of a case as an A4 PDF.

    ``provider`` is the assigned PractitionerRole (its ``specialty`` is printed) and
    ``practitioner`` its Practitioner (its ``name`` signs); either may be ``None``, in which
    case ``PractitionerRole.practitioner.display`` or ``report.performer[0].display`` names the
    signer. ``signed_at`` (a FHIR instant) is printed and becomes the PDF creation date.
    """
    f = fonts()
    s = _Styles(f)
    u = f.unicode

    def para(text: str, style: ParagraphStyle = s.body) -> Paragraph:
        return _para(text, style, unicode=u)

    signer = human_name((practitioner or {}).get("name")) or _signer_fallback(provider, report)
    specialties = ", ".join(
        _texts(concept_text(c) for c in (provider or {}).get("specialty") or ())
    )
    story: list[Flowable] = [
        para("Medical Second Opinion — Recommendation", s.title),
        para(f"Case {case_number}", s.sub),
    ]
    status = str(report.get("status") or "")
    if status == "amended":
        reason = amendment_reason(report) or ""
        story.append(para(f"Amended report. Reason: {reason}".strip(), s.label))
    story.append(Spacer(1, 3 * mm))
    story.append(HRFlowable(width="100%", thickness=0.6, color=colors.grey))

    story.append(para("Patient", s.heading))
    rows = [("Name", human_name(patient.get("name")) or "(no name recorded)")]
    if patient.get("birthDate"):
        rows.append(("Date of birth", str(patient["birthDate"])))
    if patient.get("gender"):
        rows.append(("Gender", str(patient["gender"])))
    identifiers = _texts(identifier_text(i) for i in patient.get("identifier") or () if i)
    if identifiers:
        rows.append(("Identifiers", "\n".join(identifiers)))
    story.append(_facts(rows, s, unicode=u))

    story.append(para("Clinical question", s.heading))
    specialty_asked = concept_text(service_request.get("code"))
    if specialty_asked:
        story.append(_facts([("Requested specialty", specialty_asked)], s, unicode=u))
    notes = _texts(str((n or {}).get("text") or "") for n in service_request.get("note") or ())
    story.extend(para(n) for n in notes or ["(no question recorded)"])

    story.append(para("Findings", s.heading))
    findings = _texts(str((r or {}).get("display") or "") for r in report.get("result") or ())
    findings += _texts(str((m or {}).get("comment") or "") for m in report.get("media") or ())
    story.extend(para(f"• {t}") for t in findings or ["No separate findings recorded."])

    story.append(para("Recommendation", s.heading))
    codes = _texts(concept_text(c) for c in report.get("conclusionCode") or ())
    story.extend(para(f"• {t}") for t in codes)
    if report.get("conclusion"):
        story.append(para(str(report["conclusion"])))
    elif not codes:
        story.append(para("(no recommendation recorded)"))

    story.append(para("Provider", s.heading))
    rows = [("Name", signer or "(unknown)")]
    if specialties:
        rows.append(("Specialty", specialties))
    story.append(_facts(rows, s, unicode=u))

    story.append(Spacer(1, 8 * mm))
    story.append(HRFlowable(width="60%", thickness=0.6, color=colors.black, hAlign="LEFT"))
    story.append(para(signer or "(unknown)", s.label))
    story.append(para(f"{SIGNATURE_TEXT} on {_date_text(signed_at)}"))
    story.append(Spacer(1, 4 * mm))
    story.append(
        para(
            f"This document was generated by the MSO platform for case {case_number}. "
            "It is valid without a handwritten signature.",
            s.small,
        )
    )

    buffer = io.BytesIO()
    pdf_date = _pdf_date(signed_at)
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=20 * mm,
        rightMargin=20 * mm,
        topMargin=18 * mm,
        bottomMargin=18 * mm,
        title=f"Recommendation {case_number}",
        author=signer or "MSO platform",
        subject=f"Second-opinion recommendation for case {case_number}",
        creator="MSO FHIR server",
        invariant=1,
    )

    def fix_date(canvas: Any, _doc: Any) -> None:
        canvas.setDateFormatter(lambda *_: pdf_date)

    doc.build(story, onFirstPage=fix_date, onLaterPages=fix_date)
    return buffer.getvalue()


def _signer_fallback(provider: dict[str, Any] | None, report: dict[str, Any]) -> str:
    display = ((provider or {}).get("practitioner") or {}).get("display")
    if display:
        return str(display)
    for performer in report.get("resultsInterpreter") or report.get("performer") or ():
        if (performer or {}).get("display"):
            return str(performer["display"])
    return ""


def attach_pdf(
    report: dict[str, Any], pdf: bytes, title: str, *, creation: str | None = None
) -> dict[str, Any]:
    """Return ``report`` with ``presentedForm`` set to ``pdf`` as its only Attachment.

    The Attachment carries ``contentType`` application/pdf, ``data`` (base64), ``title``,
    ``creation`` (``creation``, default now), ``size`` and ``hash`` — the base64 of the
    SHA-1 digest, as R4 defines ``Attachment.hash``. ``report`` itself is not changed.
    """
    stamp = creation or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    attachment = {
        "contentType": PDF_CONTENT_TYPE,
        "data": base64.b64encode(pdf).decode("ascii"),
        "title": title,
        "creation": stamp,
        "size": len(pdf),
        "hash": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),
    }
    return {**report, "presentedForm": [attachment]}
