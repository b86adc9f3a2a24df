"""Canonical URLs, code systems and codes of the MSO conformance resources, as Python constants.

The JSON files under ``terminology/`` and ``profiles/`` are the source of truth (they are what
the server stores and serves, see :mod:`fhir_server.conformance`); this module spells their URLs
and codes once so that code never retypes them. ``tests/unit/test_conformance_files.py`` checks
every constant here against the files.

A leaf module (it imports nothing of the server): the access policy, the workflow, messaging
and the demo data all name the same codes through it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from types import MappingProxyType
from typing import Any

CANONICAL_BASE = "https://mso.example.org/fhir"
"""Base of every MSO canonical URL (not the server's own base URL)."""


def _cs(name: str) -> str:
    return f"{CANONICAL_BASE}/CodeSystem/{name}"


def _vs(name: str) -> str:
    return f"{CANONICAL_BASE}/ValueSet/{name}"


def _sd(name: str) -> str:
    return f"{CANONICAL_BASE}/StructureDefinition/{name}"


# -- identifiers --------------------------------------------------------------------------------

CASE_NUMBER_SYSTEM = f"{CANONICAL_BASE}/sid/case-number"
"""``Identifier.system`` of case numbers (``ServiceRequest.identifier``)."""
USERNAME_SYSTEM = f"{CANONICAL_BASE}/sid/username"
"""``Identifier.system`` naming a user account (a notification's recipient without a FHIR
identity)."""
CASE_NUMBER_PATTERN = re.compile(r"^CASE-[0-9A-Z]{6}$")
"""A case number: ``CASE-`` and six digits or capital letters (invariant ``mso-case-1``)."""

# -- case statuses (Task.businessStatus of the case Task) ---------------------------------------

CASE_STATUS_SYSTEM = _cs("case-status")
CASE_STATUS_VALUESET = _vs("case-status")
CASE_STATUS_ACTIVE_VALUESET = _vs("case-status-active")
"""Every case status except ``done`` and ``cancelled`` (open cases, for work lists)."""


class CaseStatus(StrEnum):
    """MSO case statuses (DESIGN.md, Case statuses)."""

    NEW = "new"
    ASSIGNED = "assigned"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IN_PROGRESS = "in-progress"
    RETURNED = "returned"
    DONE = "done"
    CANCELLED = "cancelled"


TASK_STATUS_OF_CASE_STATUS: MappingProxyType[CaseStatus, str] = MappingProxyType(
    {
        CaseStatus.NEW: "requested",
        CaseStatus.ASSIGNED: "ready",
        CaseStatus.ACCEPTED: "accepted",
        CaseStatus.REJECTED: "rejected",
        CaseStatus.IN_PROGRESS: "in-progress",
        CaseStatus.RETURNED: "on-hold",
        CaseStatus.DONE: "completed",
        CaseStatus.CANCELLED: "cancelled",
    }
)
"""The ``Task.status`` of a case Task in each case status (CodeSystem property ``task-status``)."""
CLOSED_CASE_STATUSES = frozenset({CaseStatus.DONE, CaseStatus.CANCELLED})
"""Case statuses outside :data:`CASE_STATUS_ACTIVE_VALUESET`."""

# -- case issues (Task.businessStatus of a case-issue Task) ------------------------------------

CASE_ISSUE_STATUS_SYSTEM = _cs("case-issue-status")
CASE_ISSUE_STATUS_VALUESET = _vs("case-issue-status")


class CaseIssueStatus(StrEnum):
    """States of an issue raised on a case."""

    OPEN = "open"
    RESOLVED = "resolved"
    DELETED = "deleted"


TASK_STATUS_OF_ISSUE_STATUS: MappingProxyType[CaseIssueStatus, str] = MappingProxyType(
    {
        CaseIssueStatus.OPEN: "requested",
        CaseIssueStatus.RESOLVED: "completed",
        CaseIssueStatus.DELETED: "entered-in-error",
    }
)
"""The ``Task.status`` of a case-issue Task in each issue status."""

# -- meta.security -------------------------------------------------------------------------------

SECURITY_LABEL_SYSTEM = _cs("security-label")
WITHHELD_FROM_PROVIDER = "withheld-from-provider"
"""The label keeping a resource from providers (the original of a de-identified imaging study
shared with the case's external specialist); see :mod:`fhir_server.auth.policy`."""


def is_withheld_from_provider(resource: dict | None) -> bool:
    """``resource`` carries the :data:`WITHHELD_FROM_PROVIDER` security label."""
    labels = ((resource or {}).get("meta") or {}).get("security") or ()
    return any(
        (label or {}).get("system") == SECURITY_LABEL_SYSTEM
        and (label or {}).get("code") == WITHHELD_FROM_PROVIDER
        for label in labels
    )


# -- Task.code ----------------------------------------------------------------------------------

TASK_CODE_SYSTEM = _cs("task-code")
TASK_CODE_VALUESET = _vs("task-code")
TASK_CODE_CASE = "case"
TASK_CODE_CASE_ISSUE = "case-issue"
TASK_CODE_IMPORT_PRIORS = "import-priors"
"""A request to the DICOM gateway to fetch a case patient's prior studies from the hospital
PACS (``ServiceRequest/[id]/$import-priors``); the gateway works and closes the Task."""
TASK_CODE_DEIDENTIFY_IMAGING = "deidentify-imaging"
"""A request to the DICOM gateway for a de-identified copy of a study
(``ImagingStudy/[id]/$deidentify``, DICOM PS3.15 Annex E basic profile); the gateway works and
closes the Task."""

# -- ServiceRequest.category / DiagnosticReport.code ------------------------------------------

CASE_CATEGORY_SYSTEM = _cs("case-category")
CASE_CATEGORY_VALUESET = _vs("case-category")
CASE_CATEGORY_SECOND_OPINION = "second-opinion"
REPORT_TYPE_SYSTEM = _cs("report-type")
REPORT_TYPE_VALUESET = _vs("report-type")
REPORT_TYPE_RECOMMENDATION = "recommendation"

# -- Communication.category ---------------------------------------------------------------------

COMMUNICATION_CATEGORY_SYSTEM = _cs("communication-category")
COMMUNICATION_CATEGORY_VALUESET = _vs("communication-category")
COMMUNICATION_CHAT = "chat"
COMMUNICATION_NOTIFICATION = "notification"

# -- documents ----------------------------------------------------------------------------------

DOCUMENT_CATEGORY_SYSTEM = _cs("document-category")
DOCUMENT_CATEGORY_VALUESET = _vs("document-category")
DOCUMENT_CONTENT_TYPE_VALUESET = _vs("document-content-type")


class DocumentCategory(StrEnum):
    """How an uploaded case document is classified (``DocumentReference.category``)."""

    DOCTORS_LETTER = "doctors-letter"
    IMAGE = "image"
    LAB_REPORT = "lab-report"
    OTHER = "other"


DOCUMENT_CONTENT_TYPES = frozenset(
    {
        "application/pdf",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "image/jpeg",
        "image/png",
        "image/tiff",
        "application/dicom",
    }
)
"""Media types accepted for case documents (:data:`DOCUMENT_CONTENT_TYPE_VALUESET`)."""
MAX_DOCUMENT_BYTES = 50 * 1024 * 1024
"""Largest case document (``maxValueUnsignedInt`` of ``content.attachment.size``)."""
MAX_DOCUMENTS_PER_CASE = 10
"""Most documents one case may hold (a workflow rule; no profile can express it)."""

# -- specialties, intake answers ----------------------------------------------------------------

SPECIALTY_SYSTEM = _cs("specialty")
SPECIALTY_VALUESET = _vs("specialty")
SPECIALTY_SNOMED_CONCEPTMAP = f"{CANONICAL_BASE}/ConceptMap/specialty-to-snomed"
DISEASE_TYPE_SYSTEM = _cs("disease-type")
DISEASE_TYPE_VALUESET = _vs("disease-type")
ETHNICITY_SYSTEM = _cs("ethnicity")
ETHNICITY_VALUESET = _vs("ethnicity")
FAMILY_HISTORY_SYSTEM = _cs("family-history")
FAMILY_HISTORY_VALUESET = _vs("family-history")

# -- FHIR's own terminology the MSO resources use ------------------------------------------------

TASK_STATUS_SYSTEM = "http://hl7.org/fhir/task-status"
REQUEST_PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"
SNOMED_SYSTEM = "http://snomed.info/sct"
EXT_EVENT_STATUS_REASON = "http://hl7.org/fhir/StructureDefinition/event-statusReason"
"""R4 core extension carrying the reason of an amended (or retracted) DiagnosticReport."""

# -- questionnaires -------------------------------------------------------------------------------

INTAKE_QUESTIONNAIRE = f"{CANONICAL_BASE}/Questionnaire/intake"
FEEDBACK_QUESTIONNAIRE = f"{CANONICAL_BASE}/Questionnaire/feedback"


class IntakeItem(StrEnum):
    """``linkId`` s of the intake (medical context) questionnaire."""

    ETHNICITY = "ethnicity"
    GENDER = "gender"
    DISEASE_TYPE = "disease-type"
    FIRST_OCCURRENCE = "first-occurrence"
    FAMILY_HISTORY = "family-history"
    CURRENT_MEDICATIONS = "current-medications"
    TREATMENT_HISTORY = "treatment-history"


class FeedbackItem(StrEnum):
    """``linkId`` s of the feedback questionnaire."""

    RATING = "rating"
    COMMENTS = "comments"


FEEDBACK_RATINGS = range(1, 6)
"""The ratings the feedback questionnaire allows (1 = poor … 5 = excellent)."""

# -- profiles -------------------------------------------------------------------------------------

PROFILE_CASE = _sd("case")
"""ServiceRequest: the second-opinion case."""
PROFILE_CASE_TASK = _sd("case-task")
"""Task: the workflow of one case."""
PROFILE_CASE_ISSUE = _sd("case-issue")
"""Task: an issue raised on a case."""
PROFILE_RECOMMENDATION = _sd("recommendation")
"""DiagnosticReport: the specialist's recommendation."""
PROFILE_CASE_DOCUMENT = _sd("case-document")
"""DocumentReference: a document uploaded to a case."""
PROFILE_CHAT_MESSAGE = _sd("chat-message")
"""Communication: a message in a case's chat."""

# -- billing (ChargeItem, Invoice, PaymentNotice) ------------------------------------------------

EXT_CASE_REFERENCE = _sd("case-reference")
"""Extension on ChargeItem, Invoice, PaymentNotice and AppointmentResponse: the case
ServiceRequest they belong to."""
BILLING_CASE_PARAM = "case"
"""Code of the MSO search parameter indexing :data:`EXT_CASE_REFERENCE` (``Invoice?case=…``)."""
BILLING_CASE_SEARCH_PARAMETER = f"{CANONICAL_BASE}/SearchParameter/billing-case"
INVOICE_NUMBER_SYSTEM = f"{CANONICAL_BASE}/sid/invoice-number"
"""``Identifier.system`` of invoice numbers (``INV-`` and the case number's six characters)."""
CHARGE_DEFINITION_DEFAULT = f"{CANONICAL_BASE}/ChargeItemDefinition/second-opinion"
"""The ChargeItemDefinition pricing cases whose specialty has no definition of its own."""
OPERATION_RECORD_PAYMENT = f"{CANONICAL_BASE}/OperationDefinition/Invoice-record-payment"
"""``Invoice/[id]/$record-payment``: an admin records that an invoice was paid."""
OPERATION_IMPORT_PRIORS = f"{CANONICAL_BASE}/OperationDefinition/ServiceRequest-import-priors"
"""``ServiceRequest/[id]/$import-priors``: ask the DICOM gateway for a case's prior studies."""
OPERATION_DEIDENTIFY_IMAGING = f"{CANONICAL_BASE}/OperationDefinition/ImagingStudy-deidentify"
"""``ImagingStudy/[id]/$deidentify``: an admin asks the gateway for a de-identified copy."""
USAGE_CONTEXT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/usage-context-type"
USAGE_CONTEXT_FOCUS = "focus"
"""``useContext.code`` under which a ChargeItemDefinition lists the specialties it prices."""


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A FHIR Coding as JSON."""
    out: dict[str, Any] = {"system": system, "code": code}
    if display is not None:
        out["display"] = display
    return out


def concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A FHIR CodeableConcept with one coding, as JSON."""
    return {"coding": [coding(system, code, display)]}
