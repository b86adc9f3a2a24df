"""One second-opinion case from submission to paid invoice against a live ``mso serve`` (two
workers, its own email outbox worker sending to a real SMTP server), on SQLite and PostgreSQL.

Every role (requester, admin, two providers, patient) logs in through the SMART
authorization-code flow with PKCE (login page, consent) and works with the token it gets.
Along the way the test checks what each party is told (in-app notifications, and emails with a
deep link and nothing clinical), what each may see, the Task's ``_history`` and the audit trail.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from fhir_server.codes import (
    CASE_NUMBER_SYSTEM,
    CASE_STATUS_SYSTEM,
    COMMUNICATION_CATEGORY_SYSTEM,
    FEEDBACK_QUESTIONNAIRE,
    SPECIALTY_SYSTEM,
    FeedbackItem,
)
from tests.auth_helpers import auth_server, token_by_code
from tests.conftest import authorized
from tests.e2e.conftest import start_server
from tests.integration.workflow_world import World, b64, document, pdf_bytes
from tests.smtp_server import SmtpServer, body_of, free_port

PASSWORD = "correct horse battery"
REDIRECT = "http://localhost:9/callback"
PUBLIC_URL = "https://mso.example.test"
QUESTION = "Is surgery needed for the suspected sarcoma?"  # must never reach an email
NOTIFICATION = f"{COMMUNICATION_CATEGORY_SYSTEM}|notification"


@pytest.fixture(scope="module")
def live(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A live server whose outbox worker mails to a real SMTP server; (FHIR base, collector).

    The presence window is 0 s, so nobody counts as online and every notification is mailed.
    """
    port = free_port()
    with SmtpServer(port) as smtp:
        env = {
            "MSO_SMTP_HOST": "127.0.0.1",
            "MSO_SMTP_PORT": str(port),
            "MSO_SMTP_STARTTLS": "false",
            "MSO_MAIL_POLL_INTERVAL": "0.2",
            "MSO_PRESENCE_WINDOW": "0",
            "MSO_PUBLIC_URL": PUBLIC_URL,
        }
        data_dir = Path(tmp_path_factory.mktemp("lifecycle-server"))
        proc, base = start_server(db_url, data_dir, env=env)
        try:
            yield base, smtp
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def login(root: str, client_id: str, username: str, scope: str) -> str:
    """An access token for ``username`` through the authorization-code flow with PKCE."""
    with httpx.Client(base_url=root, follow_redirects=False) as browser:
        response = token_by_code(
            browser,
            client_id=client_id,
            redirect_uri=REDIRECT,
            scope=scope,
            username=username,
            password=PASSWORD,
            aud=f"{root}/fhir",
        )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def build_live_world(db_url: str, base: str, http: httpx.Client) -> tuple[World, dict[str, str]]:
    """Directory resources (system client), one user per role, their tokens; and the users'
    email addresses by role."""
    u = uuid.uuid4().hex[:10]
    org, req_role, prov1, prov2 = (f"{n}-{u}" for n in ("org", "rq", "pv1", "pv2"))
    specialty = [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]}]
    directory = [
        {"resourceType": "Organization", "id": org, "name": f"Hospital {u}"},
        {"resourceType": "Practitioner", "id": f"dr-{u}", "name": [{"family": "Lindqvist"}]},
        {
            "resourceType": "PractitionerRole",
            "id": req_role,
            "active": True,
            "organization": {"reference": f"Organization/{org}"},
        },
        {
            "resourceType": "PractitionerRole",
            "id": prov1,
            "active": True,
            "practitioner": {"reference": f"Practitioner/dr-{u}"},
            "specialty": specialty,
        },
        {"resourceType": "PractitionerRole", "id": prov2, "active": True, "specialty": specialty},
    ]
    system = authorized(db_url, base)
    for body in directory:
        url = f"/fhir/{body['resourceType']}/{body['id']}"
        response = http.put(url, json=body, headers=system)
        assert response.status_code == 201, response.text

    auth = auth_server(_settings(db_url))
    client_id = f"case-app-{u}"  # client_id_of(world)
    auth.clients.create(client_id=client_id, kind="public", redirect_uris=[REDIRECT])
    accounts = {
        "reqA": {"role": "requester", "practitioner_role": req_role, "organization": org},
        "admin": {"role": "admin"},
        "prov1": {"role": "provider", "practitioner_role": prov1},
        "prov2": {"role": "provider", "practitioner_role": prov2},
    }
    emails = {}
    for who, account in accounts.items():
        emails[who] = f"{who.lower()}-{u}@example.test"
        auth.users.create(username=f"{who}-{u}", password=PASSWORD, email=emails[who], **account)
    root = base.removesuffix("/fhir")
    scope = "openid fhirUser user/*.cruds"
    headers = {
        who: {"Authorization": f"Bearer {login(root, client_id, f'{who}-{u}', scope)}"}
        for who in accounts
    }
    world = World(http, None, u, org, req_role, prov1, prov2, "", headers)
    return world, emails


def client_id_of(world: World) -> str:
    """The public client every user of ``world`` logs in with."""
    return f"case-app-{world.u}"


def _settings(db_url: str) -> Any:
    from fhir_server.config import Settings

    return Settings(database_url=db_url)


def case_status(task: dict[str, Any]) -> str:
    return next(
        c["code"] for c in task["businessStatus"]["coding"] if c["system"] == CASE_STATUS_SYSTEM
    )


def submission(world: World, national_id: str) -> dict[str, Any]:
    """The case Bundle: the Patient created on its national ID unless it exists, the request,
    a PDF letter, the intake answers and the consent (``World.submission`` with a Patient)."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = world.submission(patient_ref=patient_url)
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "ServiceRequest":
            entry["resource"]["note"] = [{"text": QUESTION}]
            sr_url = entry["fullUrl"]
    letter = pdf_bytes()
    bin_url, doc_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    patient = {
        "fullUrl": patient_url,
        "resource": {
            "resourceType": "Patient",
            "active": True,
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": national_id}],
            "name": [{"family": f"Halvorsen{world.u}", "given": ["Ingrid"]}],
            "birthDate": "1961-04-09",
        },
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier=urn:oid:2.16.840.1.113883.4.1|{national_id}",
        },
    }
    files = [
        {
            "fullUrl": bin_url,
            "resource": {
                "resourceType": "Binary",
                "contentType": "application/pdf",
                "securityContext": {"reference": doc_url},
                "data": b64(letter),
            },
            "request": {"method": "POST", "url": "Binary"},
        },
        {
            "fullUrl": doc_url,
            "resource": document(
                sr_url,
                patient_url,
                "referral.pdf",
                "application/pdf",
                bin_url,
                letter,
                category="doctors-letter",
            ),
            "request": {"method": "POST", "url": "DocumentReference"},
        },
    ]
    bundle["entry"] = [patient, *files, *bundle["entry"]]
    return bundle


def submit(world: World, national_id: str) -> tuple[str, str, str]:
    """Submit a case as the requester; (Patient id, ServiceRequest id, Task id)."""
    response = world.post("reqA", "", submission(world, national_id))
    assert response.status_code == 200, response.text
    located = {}
    for entry in response.json()["entry"]:
        rtype, rid = entry["response"]["location"].split("/fhir/")[-1].split("/")[:2]
        located.setdefault(rtype, rid)
    sr_id = located["ServiceRequest"]
    found = world.get("reqA", "Task", params={"focus": f"ServiceRequest/{sr_id}"}).json()
    (task,) = [e["resource"] for e in found["entry"]]
    return located["Patient"], sr_id, task["id"]


def case_number_of(request: dict[str, Any]) -> str:
    (number,) = [i["value"] for i in request["identifier"] if i["system"] == CASE_NUMBER_SYSTEM]
    return number


def notifications(world: World, who: str, sr_id: str) -> list[str]:
    """The notification texts ``who`` reads about the case."""
    params = {"category": NOTIFICATION, "about": f"ServiceRequest/{sr_id}", "_count": "100"}
    found = world.get(who, "Communication", params=params).json()
    return [e["resource"]["payload"][0]["contentString"] for e in found.get("entry", [])]


def mails_to(smtp: Any, address: str) -> list[Any]:
    with smtp.lock:
        return [m for _, rcpt, m in smtp.messages if address in rcpt]


def wait_for_mail(smtp: Any, address: str, subject: str, timeout: float = 30.0) -> Any:
    """The email to ``address`` with ``subject``, once the outbox worker has sent it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in mails_to(smtp, address):
            if message["Subject"] == f"[MSO] {subject}":
                return message
        time.sleep(0.1)
    got = [m["Subject"] for m in mails_to(smtp, address)]
    raise AssertionError(f"no email {subject!r} to {address}; got {got}")


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()


def test_a_case_from_submission_to_paid_invoice(live: tuple[str, Any], db_url: str) -> None:
    base, smtp = live
    root = base.removesuffix("/fhir")
    with httpx.Client(base_url=root, timeout=30) as http:
        world, emails = build_live_world(db_url, base, http)
        national_id = f"NID-{world.u}"

        # 1-2. Submission creates the patient once, numbers the case, opens the Task
        patient_id, sr_id, task_id = submit(world, national_id)
        world.patient = patient_id
        request = ok(world.get("reqA", f"ServiceRequest/{sr_id}"))
        number = case_number_of(request)
        task = ok(world.get("reqA", f"Task/{task_id}"))
        assert case_status(task) == "new" and task["for"] == {"reference": f"Patient/{patient_id}"}
        again, second_id, _ = submit(world, national_id)  # a second case for the same person
        assert again == patient_id
        second = case_number_of(ok(world.get("reqA", f"ServiceRequest/{second_id}")))
        mail = wait_for_mail(smtp, emails["admin"], f"New case {number}")
        assert f"{PUBLIC_URL}/viewer/cases/{sr_id}" in body_of(mail)
        assert any(number in text for text in notifications(world, "admin", sr_id))
        assert notifications(world, "prov1", sr_id) == []

        # 3. Suggestions and assignment to the second provider, who declines
        suggested = ok(world.get("admin", f"Task/{task_id}/$suggest-providers"))
        ranked = {
            part["valueReference"]["reference"]
            for entry in suggested["parameter"]
            for part in entry["part"]
            if part["name"] == "role"
        }
        assert {f"PractitionerRole/{world.prov1}", f"PractitionerRole/{world.prov2}"} <= ranked
        ok(world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov2}"))
        wait_for_mail(smtp, emails["prov2"], f"Case {number} assigned to you")
        assert world.get("prov1", f"Task/{task_id}").status_code == 404
        assert world.op("prov2", task_id, "reject").status_code == 422  # a reason is required
        rejected = ok(world.op("prov2", task_id, "reject", reason="Outside my sub-specialty"))
        assert case_status(rejected) == "rejected"
        assert world.get("prov2", f"Task/{task_id}").status_code == 404
        wait_for_mail(smtp, emails["reqA"], f"Case {number} declined by the specialist")

        # 4. Reassignment; the first provider accepts
        ok(world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}"))
        assert case_status(ok(world.op("prov1", task_id, "accept"))) == "accepted"
        wait_for_mail(smtp, emails["reqA"], f"Case {number} accepted")
        # the provider now reads the case documents, the declining one does not
        docs = ok(
            world.get("prov1", "DocumentReference", params={"related": f"ServiceRequest/{sr_id}"})
        )
        (doc,) = [e["resource"] for e in docs["entry"]]
        binary = doc["content"][0]["attachment"]["url"]
        letter = http.get(
            f"/fhir/{binary}", headers={**world.as_("prov1"), "Accept": "application/pdf"}
        )
        assert letter.status_code == 200 and letter.content == pdf_bytes()
        assert world.get("prov2", f"DocumentReference/{doc['id']}").status_code == 404

        # 9. An appointment: the requester proposes, the provider accepts
        start = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0, minute=0)
        proposal = world.post(
            "reqA",
            "Appointment",
            {
                "resourceType": "Appointment",
                "status": "proposed",
                "description": "Discuss the second opinion",
                "start": start.isoformat(),
                "end": (start + timedelta(minutes=30)).isoformat(),
                "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
                "participant": [
                    {
                        "actor": {"reference": f"PractitionerRole/{world.req_role}"},
                        "status": "accepted",
                    },
                    {
                        "actor": {"reference": f"PractitionerRole/{world.prov1}"},
                        "status": "accepted",
                    },
                ],
            },
        )
        appointment_id = ok(proposal, 201)["id"]
        wait_for_mail(smtp, emails["prov1"], f"Appointment proposed for case {number}")
        answer = {
            "resourceType": "AppointmentResponse",
            "appointment": {"reference": f"Appointment/{appointment_id}"},
            "participantStatus": "accepted",
        }
        ok(world.post("prov1", "AppointmentResponse", answer), 201)
        assert ok(world.get("reqA", f"Appointment/{appointment_id}"))["status"] == "booked"

        # 5. Review: start, return with a question, the requester answers, resume
        ok(world.op("prov1", task_id, "start"))
        returned = ok(world.op("prov1", task_id, "return", reason="Please send the biopsy report"))
        assert case_status(returned) == "returned" and returned["status"] == "on-hold"
        wait_for_mail(smtp, emails["reqA"], f"Case {number} returned to you")
        (issue,) = ok(world.get("reqA", "Task", params={"part-of": f"Task/{task_id}"}))["entry"]
        ok(world.op("reqA", issue["resource"]["id"], "answer", answer="Uploaded it today"))
        assert case_status(ok(world.op("prov1", task_id, "start"))) == "in-progress"

        # 6. Recommendation: a draft, then $complete renders the signed PDF
        report_id = world.report(sr_id)
        assert world.get("reqA", f"DiagnosticReport/{report_id}").status_code == 200
        done = ok(world.op("prov1", task_id, "complete"))
        assert case_status(done) == "done" and done["status"] == "completed"
        assert done["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report_id}"}
        wait_for_mail(smtp, emails["reqA"], f"Second opinion ready for case {number}")

        # 7. The requester downloads the report and gives feedback
        report = ok(world.get("reqA", f"DiagnosticReport/{report_id}"))
        assert report["status"] == "final"
        (form,) = report["presentedForm"]
        text = "".join(
            page.extract_text()
            for page in PdfReader(io.BytesIO(base64.b64decode(form["data"]))).pages
        )
        for expected in (number, f"Halvorsen{world.u}", QUESTION, "No surgery", "Lindqvist"):
            assert expected in text.replace("\n", " "), (expected, text)
        feedback = {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "questionnaire": FEEDBACK_QUESTIONNAIRE,
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "item": [
                {"linkId": FeedbackItem.RATING, "answer": [{"valueInteger": 5}]},
                {"linkId": FeedbackItem.COMMENTS, "answer": [{"valueString": "Clear."}]},
            ],
        }
        ok(world.post("reqA", "QuestionnaireResponse", feedback), 201)

        # the patient logs in to the portal: reads the case and its report, moves nothing
        username = f"patient-{world.u}"
        auth_server(_settings(db_url)).users.create(
            username=username, password=PASSWORD, role="patient", patient=patient_id
        )
        scope = "openid fhirUser launch/patient patient/*.rs"
        token = login(root, client_id_of(world), username, scope)
        world.headers["patient"] = {"Authorization": f"Bearer {token}"}
        assert case_status(ok(world.get("patient", f"Task/{task_id}"))) == "done"
        assert ok(world.get("patient", f"DiagnosticReport/{report_id}"))["status"] == "final"
        assert world.op("patient", task_id, "cancel", reason="x").status_code == 403

        # 10. The invoice: the requester reads it, the admin records the payment
        (invoice,) = [
            e["resource"]
            for e in ok(world.get("reqA", "Invoice", params={"case": f"ServiceRequest/{sr_id}"}))[
                "entry"
            ]
        ]
        assert invoice["recipient"] == {"reference": f"Organization/{world.org}"}
        wait_for_mail(smtp, emails["reqA"], f"Invoice for case {number}")
        charges = ok(world.get("prov1", "ChargeItem", params={"case": f"ServiceRequest/{sr_id}"}))
        assert len(charges["entry"]) == 1
        assert world.get("prov1", f"Invoice/{invoice['id']}").status_code == 404
        payment = {
            "resourceType": "Parameters",
            "parameter": [{"name": "amount", "valueMoney": invoice["totalGross"]}],
        }
        ok(world.post("admin", f"Invoice/{invoice['id']}/$record-payment", payment))
        assert ok(world.get("reqA", f"Invoice/{invoice['id']}"))["status"] == "balanced"

        # every transition is in the Task's history and in the audit trail
        history = ok(world.get("admin", f"Task/{task_id}/_history", params={"_count": "50"}))
        seen = [case_status(e["resource"]) for e in reversed(history["entry"])]
        assert seen == [
            "new",
            "assigned",
            "rejected",
            "assigned",
            "accepted",
            "in-progress",
            "returned",
            "in-progress",
            "done",
        ]
        params = {"entity": f"Task/{task_id}", "_count": "200"}
        audited = ok(world.get("admin", "AuditEvent", params=params))
        operations = {
            entity["name"]
            for e in audited["entry"]
            for entity in e["resource"].get("entity", [])
            if entity.get("description") == "operation"
        }
        assert {"$assign", "$reject", "$accept", "$start", "$return", "$complete"} <= operations

        # what the parties were told: in-app for each, and email never carries clinical text
        assert any("is ready" in text for text in notifications(world, "reqA", sr_id))
        # the declining provider was told of the assignment, and of nothing after it
        assert notifications(world, "prov2", sr_id) == [f"Case {number} was assigned to you."]
        told = {
            "admin": {f"New case {number}", f"New case {second}"}
            | {f"Case {number} rejected: reassignment needed"},
            "prov2": {f"Case {number} assigned to you"},
            "prov1": {
                f"Case {number} assigned to you",
                f"Appointment proposed for case {number}",
                f"Question answered on case {number}",
            },
            "reqA": {
                f"Case {number} assigned",
                f"Case {number} declined by the specialist",
                f"Case {number} accepted",
                f"Appointment answered for case {number}",
                f"Case {number} returned to you",
                f"Second opinion ready for case {number}",
                f"Invoice for case {number}",
            },
        }
        for who, address in emails.items():
            messages = mails_to(smtp, address)
            assert {m["Subject"].removeprefix("[MSO] ") for m in messages} == told[who], who
            for message in messages:
                body = body_of(message)
                assert QUESTION not in body and "biopsy" not in body and "Halvorsen" not in body
                assert f"{PUBLIC_URL}/viewer/cases/" in body
            ids = [m["Message-ID"] for m in messages]
            assert len(ids) == len(set(ids)), (who, ids)  # never sent twice
