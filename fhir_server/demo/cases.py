"""Demo cases, one in every MSO status, made through the real workflow.

Each case is submitted by its requester as a transaction Bundle (ServiceRequest, a referral
letter as Binary + DocumentReference, the intake QuestionnaireResponse and a Consent) and then
moved by the principals the status table names (admin ``$assign``, provider ``$accept`` …),
through :class:`~fhir_server.workflow.service.Workflow` — the code the operations run — so the
hooks, access policy, events, notifications, the recommendation PDF and the invoice all happen
as they would over HTTP. Nothing writes a Task status directly.

A case is recognised by a demo identifier on its ServiceRequest (the case number is random).
Seeding is resumable: a case that exists is moved on from the status it has along its path
(statuses along one path are distinct), so a second run does nothing and an interrupted one
finishes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fhir_server.auth.principal import Principal
from fhir_server.codes import (
    CANONICAL_BASE,
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    DOCUMENT_CATEGORY_SYSTEM,
    INTAKE_QUESTIONNAIRE,
    REPORT_TYPE_RECOMMENDATION,
    REPORT_TYPE_SYSTEM,
    SPECIALTY_SYSTEM,
    CaseStatus,
    DocumentCategory,
    IntakeItem,
    concept,
)
from fhir_server.interactions.base import FhirRequest, InteractionContext
from fhir_server.interactions.create import create_in
from fhir_server.interactions.table import ROUTER
from fhir_server.interactions.transaction import transaction_or_batch
from fhir_server.workflow.cases import case_task_of
from fhir_server.workflow.status import TRANSITIONS, Action, Move, status_of

if TYPE_CHECKING:
    from fhir_server.config import Settings
    from fhir_server.storage.repository import Repository
    from fhir_server.workflow.services import Services

DEMO_CASE_SYSTEM = f"{CANONICAL_BASE}/sid/demo-case"
"""``ServiceRequest.identifier`` system naming a demo case (value: the case's key)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One move: ``actor`` (a demo user name) runs ``action``; ``argument`` is the provider's
    practitioner-role identifier for ``$assign``, the reason for ``$reject`` / ``$return``."""

    action: Action
    actor: str
    argument: str | None = None


@dataclass(frozen=True, slots=True)
class DemoCase:
    """A demo case and the path that brings it to its status."""

    key: str
    requester: str
    patient: str  # MRN
    specialty: str
    priority: str
    question: str
    path: tuple[Step, ...] = ()

    def statuses(self) -> list[CaseStatus]:
        """The status before the first step and after each one."""
        return [CaseStatus.NEW, *(TRANSITIONS[step.action].target for step in self.path)]


A, RIV, NOR = "admin", "requester.riverside", "requester.northwind"
CARDIO, ONCO = "provider.cardiology", "provider.oncology"
_ASSIGN_CARDIO = Step(Action.ASSIGN, A, "PRR-10")
_ASSIGN_ONCO = Step(Action.ASSIGN, A, "PRR-11")

DEMO_CASES: tuple[DemoCase, ...] = (
    DemoCase("new", RIV, "MRN-0021", "oncology", "routine", "Is adjuvant chemotherapy indicated?"),
    DemoCase(
        "assigned",
        NOR,
        "MRN-0022",
        "cardiology",
        "urgent",
        "Does the echocardiogram support valve replacement now?",
        (_ASSIGN_CARDIO,),
    ),
    DemoCase(
        "accepted",
        RIV,
        "MRN-0020",
        "oncology",
        "routine",
        "Second opinion on the staging of a lung nodule.",
        (_ASSIGN_ONCO, Step(Action.ACCEPT, ONCO)),
    ),
    DemoCase(
        "rejected",
        NOR,
        "MRN-0021",
        "oncology",
        "routine",
        "Is proton therapy preferable to conventional radiotherapy?",
        (_ASSIGN_ONCO, Step(Action.REJECT, ONCO, "Outside my sub-specialty: radiation oncology")),
    ),
    DemoCase(
        "in-progress",
        RIV,
        "MRN-0020",
        "cardiology",
        "routine",
        "Is the current anticoagulation adequate after the ablation?",
        (_ASSIGN_CARDIO, Step(Action.ACCEPT, CARDIO), Step(Action.START, CARDIO)),
    ),
    DemoCase(
        "returned",
        NOR,
        "MRN-0022",
        "oncology",
        "routine",
        "Is watchful waiting reasonable for this lymphoma?",
        (
            _ASSIGN_ONCO,
            Step(Action.ACCEPT, ONCO),
            Step(Action.START, ONCO),
            Step(Action.RETURN, ONCO, "Please add the latest PET-CT report."),
        ),
    ),
    DemoCase(
        "done",
        RIV,
        "MRN-0020",
        "cardiology",
        "routine",
        "Is an ICD indicated given the ejection fraction of 33%?",
        (
            _ASSIGN_CARDIO,
            Step(Action.ACCEPT, CARDIO),
            Step(Action.START, CARDIO),
            Step(Action.COMPLETE, CARDIO),
        ),
    ),
    DemoCase(
        "cancelled",
        NOR,
        "MRN-0021",
        "cardiology",
        "routine",
        "Review of the stress test before surgery.",
        (Step(Action.CANCEL, NOR),),
    ),
)
"""One case in every status (the key is the status the case ends in)."""

RECOMMENDATION = (
    "Primary-prevention ICD is indicated (LVEF 33% on optimal therapy for more than three months)."
    " Re-evaluate after six months of cardiac rehabilitation."
)


@dataclass
class CaseSeeder:
    """Runs the demo cases against one repository and its workflow."""

    repo: Repository
    settings: Settings
    services: Services
    principal: Callable[[str], Principal]
    """The principal of a demo user, by user name."""
    find_id: Callable[[str, str, str], str]
    """The id of a demo resource by (type, identifier system, value)."""

    def run(self, cases: tuple[DemoCase, ...] = DEMO_CASES) -> tuple[int, int]:
        """Bring every case to its status; (cases submitted, moves made) by this run."""
        submitted = moved = 0
        for case in cases:
            sr_id = self._existing(case)
            if sr_id is None:
                sr_id = self._submit(case)
                submitted += 1
            moved += self._advance(case, sr_id)
        return submitted, moved

    # -- submission -------------------------------------------------------------------------

    def _existing(self, case: DemoCase) -> str | None:
        def work(tx):  # type: ignore[no-untyped-def]
            with tx.internal():
                return tx.find(
                    "ServiceRequest", [("identifier", f"{DEMO_CASE_SYSTEM}|{case.key}")], limit=1
                )

        found = self.repo.read_only(work)
        return found[0].res_id if found else None

    def _submit(self, case: DemoCase) -> str:
        requester = self.principal(case.requester)
        patient = f"Patient/{self.find_id('Patient', f'{CANONICAL_BASE}/sid/mrn', case.patient)}"
        ctx = InteractionContext(
            repo=self.repo,
            settings=self.settings,
            base_url=self.settings.base_url or "",
            caller=requester,
            services=self.services,
            router=ROUTER,
        )
        bundle = submission_bundle(case, patient, f"PractitionerRole/{requester.practitioner_role}")
        response = transaction_or_batch(ctx, FhirRequest(method="POST", body=bundle))
        for entry in (response.resource or {}).get("entry", []):
            location = entry["response"].get("location") or ""
            if "ServiceRequest/" in location:
                return location.split("ServiceRequest/")[1].split("/")[0]
        raise RuntimeError(f"demo case {case.key} was not created")

    # -- moves ------------------------------------------------------------------------------

    def _advance(self, case: DemoCase, sr_id: str) -> int:
        """Run the steps of ``case`` after its current status; how many were run."""
        task = self.repo.read_only(lambda tx: case_task_of(tx, sr_id))
        current = status_of(task.resource) if task is not None else None
        statuses = case.statuses()
        if task is None or current not in statuses:
            return 0  # moved off its demo path by someone: leave it alone
        done = len(statuses) - 1 - statuses[::-1].index(current)
        for step in case.path[done:]:
            self._move(case, sr_id, task.res_id, step)
        return len(case.path) - done

    def _move(self, case: DemoCase, sr_id: str, task_id: str, step: Step) -> None:
        workflow = self.services.workflow
        if workflow is None:
            raise RuntimeError("the demo cases need the case workflow")
        actor = self.principal(step.actor)
        move = Move()
        if step.action is Action.ASSIGN:
            role = self.find_id(
                "PractitionerRole", f"{CANONICAL_BASE}/sid/practitioner-role", step.argument or ""
            )
            move = Move(provider=role)
        elif step.argument:
            move = Move(reason=step.argument)
        if step.action is Action.COMPLETE:
            self._draft_report(case, sr_id, actor)
        self.repo.write(
            lambda tx: workflow.transition(tx, task_id, step.action, move, caller=actor),
            caller=actor,
        )

    def _draft_report(self, case: DemoCase, sr_id: str, provider: Principal) -> None:
        """The provider's preliminary recommendation ($complete makes it final, with its PDF)."""
        patient = self.find_id("Patient", f"{CANONICAL_BASE}/sid/mrn", case.patient)
        body = {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": concept(REPORT_TYPE_SYSTEM, REPORT_TYPE_RECOMMENDATION),
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "subject": {"reference": f"Patient/{patient}"},
            "performer": [{"reference": f"PractitionerRole/{provider.practitioner_role}"}],
            "conclusion": RECOMMENDATION,
        }
        self.repo.write(lambda tx: create_in(tx, "DiagnosticReport", body, None), caller=provider)


def submission_bundle(case: DemoCase, patient: str, requester: str) -> dict[str, Any]:
    """The transaction Bundle a requester's app would send for ``case``."""
    request_url, letter_url, binary_url = (
        f"urn:uuid:00000000-0000-4000-9000-{n:012d}" for n in (1, 2, 3)
    )
    letter = referral_letter_pdf(case)
    request = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": DEMO_CASE_SYSTEM, "value": case.key}],
        "status": "active",
        "intent": "order",
        "priority": case.priority,
        "category": [concept(CASE_CATEGORY_SYSTEM, CASE_CATEGORY_SECOND_OPINION)],
        "code": concept(SPECIALTY_SYSTEM, case.specialty),
        "subject": {"reference": patient},
        "requester": {"reference": requester},
        "note": [{"text": case.question}],
    }
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "category": [concept(DOCUMENT_CATEGORY_SYSTEM, DocumentCategory.DOCTORS_LETTER.value)],
        "subject": {"reference": patient},
        "description": "Referral letter",
        "content": [
            {
                "attachment": {
                    "contentType": "application/pdf",
                    "url": binary_url,
                    "size": len(letter),
                    "title": "referral-letter.pdf",
                }
            }
        ],
        "context": {"related": [{"reference": request_url}]},
    }
    binary = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "securityContext": {"reference": letter_url},
        "data": base64.b64encode(letter).decode(),
    }
    intake = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "questionnaire": INTAKE_QUESTIONNAIRE,
        "subject": {"reference": patient},
        "basedOn": [{"reference": request_url}],
        "item": [
            {"linkId": IntakeItem.DISEASE_TYPE.value, "answer": [{"valueString": case.specialty}]}
        ],
    }
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"code": "INFAO"}]}],
        "patient": {"reference": patient},
    }
    entries = [
        (request_url, request),
        (binary_url, binary),
        (letter_url, document),
        (None, intake),
        (None, consent),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                **({"fullUrl": url} if url else {}),
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
            for url, resource in entries
        ],
    }


def referral_letter_pdf(case: DemoCase) -> bytes:
    """A one-page referral letter (a real PDF: documents are checked by content)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=1)
    canvas.setTitle("Referral letter")
    text = canvas.beginText(72, 770)
    text.setFont("Helvetica", 11)
    for line in (
        "Referral for a medical second opinion",
        "",
        f"Requested specialty: {case.specialty}",
        f"Priority: {case.priority}",
        "",
        f"Question: {case.question}",
        "",
        "(Demo data of the MSO FHIR server.)",
    ):
        text.textLine(line)
    canvas.drawText(text)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()
