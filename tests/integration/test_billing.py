"""Billing on Done, $record-payment, the access to invoices, and amendments over REST.

Runs on SQLite and PostgreSQL (the ``app`` and ``client`` fixtures). A case is built as server
work (Organization, Practitioner, PractitionerRole with a specialty, Patient, ServiceRequest),
and its DONE event is emitted on the application's case-event bus inside ``repo.write``, as the
workflow's ``$complete`` does.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server import codes
from fhir_server.conformance import install, read_resources
from fhir_server.workflow.amendments import with_amendment_reason
from fhir_server.workflow.billing import Billing
from fhir_server.workflow.events import CaseEvent, CaseEventKind, CaseEvents
from tests.auth_helpers import token_for


@dataclass
class Case:
    """One case and the ids around it."""

    case_id: str
    case_number: str
    patient: str
    requester_org: str
    provider_role: str
    provider_org: str

    @property
    def ref(self) -> str:
        return f"ServiceRequest/{self.case_id}"


@pytest.fixture(scope="module")
def billing_app(app: Any, client: TestClient) -> Any:
    """The app with the ChargeItemDefinitions stored, and a recorder of billing events."""
    install(app.state.repo, [r for r in read_resources() if r.res_type == "ChargeItemDefinition"])
    events: CaseEvents = app.state.services.events
    recorded: list[CaseEvent] = []
    events.subscribe(lambda _tx, e: recorded.append(e), CaseEventKind.INVOICE_ISSUED)
    events.subscribe(lambda _tx, e: recorded.append(e), CaseEventKind.INVOICE_PAID)
    app.state.billing_events = recorded
    return app


def _case_number() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "CASE-" + "".join(secrets.choice(alphabet) for _ in range(6))


def _make_case(
    app: Any,
    *,
    specialty: str = "cardiology",
    priority: str | None = "urgent",
    self_request: bool = False,
) -> Case:
    u = secrets.token_hex(6)
    case = Case(f"case-{u}", _case_number(), f"pat-{u}", f"reqorg-{u}", f"role-{u}", f"prov-{u}")
    requester = f"Patient/{case.patient}" if self_request else f"Organization/{case.requester_org}"
    service_request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": codes.CASE_NUMBER_SYSTEM, "value": case.case_number}],
        "status": "active",
        "intent": "order",
        "category": [codes.concept(codes.CASE_CATEGORY_SYSTEM, "second-opinion")],
        "code": codes.concept(codes.SPECIALTY_SYSTEM, specialty),
        "subject": {"reference": f"Patient/{case.patient}"},
        "requester": {"reference": requester},
        "performer": [{"reference": f"PractitionerRole/{case.provider_role}"}],
        "note": [{"text": "Is surgery indicated?"}],
    }
    if priority:
        service_request["priority"] = priority
    resources = [
        {"resourceType": "Organization", "id": case.requester_org, "name": f"Hospital {u}"},
        {"resourceType": "Organization", "id": case.provider_org, "name": f"Clinic {u}"},
        {"resourceType": "Practitioner", "id": f"dr-{u}", "name": [{"family": "Ødegård"}]},
        {
            "resourceType": "PractitionerRole",
            "id": case.provider_role,
            "practitioner": {"reference": f"Practitioner/dr-{u}"},
            "organization": {"reference": f"Organization/{case.provider_org}"},
            "specialty": [codes.concept(codes.SPECIALTY_SYSTEM, specialty)],
        },
        {
            "resourceType": "Patient",
            "id": case.patient,
            "identifier": [{"system": "urn:test:nid", "value": u}],
            "name": [{"family": "Zoë"}],
        },
        {**service_request, "id": case.case_id},
    ]

    def work(tx: Any) -> None:
        for body in resources:
            tx.update(body["resourceType"], body["id"], body)

    app.state.repo.write(work)
    app.state.repo.write(lambda tx: _finish_task(tx, case))
    return case


def _finish_task(tx: Any, case: Case) -> None:
    """Bring the case Task the workflow created to Done, owned by the provider (server work)."""
    (task,) = tx.find("Task", [("focus", case.ref)])
    body = {
        **task.resource,
        "status": "completed",
        "businessStatus": codes.concept(codes.CASE_STATUS_SYSTEM, codes.CaseStatus.DONE),
        "owner": {"reference": f"PractitionerRole/{case.provider_role}"},
    }
    tx.update("Task", task.res_id, body)


def _done(app: Any, case: Case, *, report: str | None = None) -> None:
    events: CaseEvents = app.state.services.events
    event = CaseEvent(
        kind=CaseEventKind.DONE,
        case_id=case.case_id,
        case_number=case.case_number,
        provider=f"PractitionerRole/{case.provider_role}",
        subject=report,
    )
    app.state.repo.write(lambda tx: events.emit(tx, event))


def _find(app: Any, res_type: str, case: Case) -> list[dict[str, Any]]:
    def work(tx: Any) -> list[dict[str, Any]]:
        return [s.resource for s in tx.find(res_type, [("case", case.ref)])]

    return app.state.repo.read_only(work)


def _http(app: Any, token: str) -> TestClient:
    return TestClient(
        app, base_url="http://testserver", headers={"Authorization": f"Bearer {token}"}
    )


def _admin(app: Any) -> TestClient:
    return _http(app, token_for(app, role="admin", username="billing-admin"))


def _payment(amount: float, currency: str = "EUR", **extra: Any) -> dict[str, Any]:
    params = [{"name": "amount", "valueMoney": {"value": amount, "currency": currency}}]
    params += [{"name": k, **v} for k, v in extra.items()]
    return {"resourceType": "Parameters", "parameter": params}


def _error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


# -- issuing -----------------------------------------------------------------------------------


def test_done_issues_a_charge_item_and_an_invoice(billing_app: Any) -> None:
    case = _make_case(billing_app, specialty="cardiology", priority="urgent")
    _done(billing_app, case, report="DiagnosticReport/rep-1")
    (charge,) = _find(billing_app, "ChargeItem", case)
    (invoice,) = _find(billing_app, "Invoice", case)
    # cardiology is priced by the internal-medicine definition; urgent costs 560
    assert charge["definitionCanonical"] == [
        f"{codes.CANONICAL_BASE}/ChargeItemDefinition/second-opinion-internal-medicine|0.1.0"
    ]
    assert charge["priceOverride"] == {"value": 560, "currency": "EUR"}
    assert charge["status"] == "billable"
    assert charge["subject"] == {"reference": f"Patient/{case.patient}"}
    assert charge["performer"] == [
        {"actor": {"reference": f"PractitionerRole/{case.provider_role}"}}
    ]
    assert charge["performingOrganization"] == {"reference": f"Organization/{case.provider_org}"}
    assert charge["requestingOrganization"] == {"reference": f"Organization/{case.requester_org}"}
    assert charge["service"] == [{"reference": "DiagnosticReport/rep-1"}]
    assert invoice["status"] == "issued"
    assert invoice["recipient"] == {"reference": f"Organization/{case.requester_org}"}
    assert invoice["subject"] == {"reference": f"Patient/{case.patient}"}
    assert invoice["totalGross"] == {"value": 560, "currency": "EUR"}
    assert invoice["totalNet"] == invoice["totalGross"]
    (line,) = invoice["lineItem"]
    assert line["chargeItemReference"] == {"reference": f"ChargeItem/{charge['id']}"}
    assert line["priceComponent"] == [{"type": "base", "amount": {"value": 560, "currency": "EUR"}}]
    assert invoice["identifier"] == [
        {"system": codes.INVOICE_NUMBER_SYSTEM, "value": "INV-" + case.case_number[5:]}
    ]
    for resource in (charge, invoice):
        assert resource["extension"] == [
            {"url": codes.EXT_CASE_REFERENCE, "valueReference": {"reference": case.ref}}
        ]
    issued = [e for e in billing_app.state.billing_events if e.case_id == case.case_id]
    assert [e.kind for e in issued] == [CaseEventKind.INVOICE_ISSUED]
    assert issued[0].subject == f"Invoice/{invoice['id']}"
    assert issued[0].case_number == case.case_number
    assert issued[0].requester_org == case.requester_org


@pytest.mark.parametrize(
    ("specialty", "priority", "price"),
    [
        ("medical-oncology", "stat", 1100),
        ("oncology", None, 550),
        ("neurosurgery", "asap", 800),
        ("radiology", "routine", 300),
        ("dermatology", "urgent", 490),  # no definition of its own: the default one
    ],
)
def test_price_per_specialty_and_priority(
    billing_app: Any, specialty: str, priority: str | None, price: int
) -> None:
    case = _make_case(billing_app, specialty=specialty, priority=priority)
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    assert invoice["totalGross"] == {"value": price, "currency": "EUR"}


def test_self_request_is_billed_to_the_patient(billing_app: Any) -> None:
    case = _make_case(billing_app, self_request=True, priority="routine")
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    (charge,) = _find(billing_app, "ChargeItem", case)
    assert invoice["recipient"] == {"reference": f"Patient/{case.patient}"}
    assert "requestingOrganization" not in charge


def test_second_done_does_not_bill_twice(billing_app: Any) -> None:
    case = _make_case(billing_app)
    _done(billing_app, case)
    _done(billing_app, case)
    assert len(_find(billing_app, "Invoice", case)) == 1
    assert len(_find(billing_app, "ChargeItem", case)) == 1
    issued = [e for e in billing_app.state.billing_events if e.case_id == case.case_id]
    assert len(issued) == 1


def test_billing_rolls_back_with_the_transaction(billing_app: Any) -> None:
    case = _make_case(billing_app)
    events: CaseEvents = billing_app.state.services.events

    def work(tx: Any) -> None:
        events.emit(tx, CaseEvent(CaseEventKind.DONE, case.case_id, case.case_number))
        raise RuntimeError("the completion failed after the event")

    with pytest.raises(RuntimeError):
        billing_app.state.repo.write(work)
    assert _find(billing_app, "Invoice", case) == []
    assert _find(billing_app, "ChargeItem", case) == []


def test_currency_comes_from_the_setting(billing_app: Any) -> None:
    case = _make_case(billing_app, specialty="surgery", priority="urgent")
    usd = Billing(CaseEvents(), currency="USD")
    billing_app.state.repo.write(
        lambda tx: usd.bill_case(tx, CaseEvent(CaseEventKind.DONE, case.case_id, case.case_number))
    )
    (invoice,) = _find(billing_app, "Invoice", case)
    assert invoice["totalGross"] == {"value": 700, "currency": "USD"}
    assert billing_app.state.settings.currency == "EUR"


# -- who reads what ----------------------------------------------------------------------------


def test_invoice_is_scoped_to_the_case(billing_app: Any) -> None:
    case = _make_case(billing_app)
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    (charge,) = _find(billing_app, "ChargeItem", case)
    requester = _http(
        billing_app, token_for(billing_app, role="requester", organization=case.requester_org)
    )
    other = _http(billing_app, token_for(billing_app, role="requester", organization="elsewhere"))
    provider = _http(
        billing_app, token_for(billing_app, role="provider", practitioner_role=case.provider_role)
    )
    assert requester.get(f"/fhir/Invoice/{invoice['id']}").status_code == 200
    found = requester.get("/fhir/Invoice", params={"case": case.ref}).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [invoice["id"]]
    assert other.get(f"/fhir/Invoice/{invoice['id']}").status_code == 404
    assert other.get(f"/fhir/ChargeItem/{charge['id']}").status_code == 404
    assert provider.get(f"/fhir/ChargeItem/{charge['id']}").status_code == 200
    assert provider.get(f"/fhir/Invoice/{invoice['id']}").status_code == 404
    assert _admin(billing_app).get(f"/fhir/Invoice/{invoice['id']}").status_code == 200


# -- payment -----------------------------------------------------------------------------------


def test_admin_records_the_payment(billing_app: Any) -> None:
    case = _make_case(billing_app, priority="urgent")
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    url = f"/fhir/Invoice/{invoice['id']}/$record-payment"
    admin = _admin(billing_app)

    wrong = admin.post(url, json=_payment(500))
    assert wrong.status_code == 422 and _error_code(wrong) == "MSO-BILL-005"
    wrong = admin.post(url, json=_payment(560, "USD"))
    assert wrong.status_code == 422 and _error_code(wrong) == "MSO-BILL-005"

    body = _payment(560, date={"valueDate": "2024-05-02"}, reference={"valueString": "SEPA-0815"})
    response = admin.post(url, json=body)
    assert response.status_code == 200, response.text
    out = {p["name"]: p["resource"] for p in response.json()["parameter"]}
    notice, paid = out["paymentNotice"], out["invoice"]
    assert paid["status"] == "balanced" and paid["meta"]["versionId"] == "2"
    assert notice["request"] == {"reference": f"Invoice/{invoice['id']}"}
    assert notice["amount"] == {"value": 560, "currency": "EUR"}
    assert notice["paymentDate"] == "2024-05-02"
    assert notice["payment"]["identifier"] == {"value": "SEPA-0815"}
    assert notice["paymentStatus"]["coding"][0]["code"] == "paid"
    (stored_notice,) = _find(billing_app, "PaymentNotice", case)
    assert stored_notice["id"] == notice["id"]
    (stored,) = _find(billing_app, "Invoice", case)
    assert stored["status"] == "balanced"
    paid_events = [
        e
        for e in billing_app.state.billing_events
        if e.case_id == case.case_id and e.kind is CaseEventKind.INVOICE_PAID
    ]
    assert len(paid_events) == 1 and paid_events[0].subject == f"Invoice/{invoice['id']}"

    again = admin.post(url, json=body)
    assert again.status_code == 409 and _error_code(again) == "MSO-BILL-004"
    # Paid stays paid: a second DONE does not issue a new invoice either.
    _done(billing_app, case)
    assert len(_find(billing_app, "Invoice", case)) == 1


def test_only_admins_record_payments(billing_app: Any) -> None:
    case = _make_case(billing_app)
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    url = f"/fhir/Invoice/{invoice['id']}/$record-payment"
    requester = _http(
        billing_app, token_for(billing_app, role="requester", organization=case.requester_org)
    )
    provider = _http(
        billing_app, token_for(billing_app, role="provider", practitioner_role=case.provider_role)
    )
    for http in (requester, provider):
        response = http.post(url, json=_payment(560))
        assert response.status_code == 403 and _error_code(response) == "MSO-BILL-403"
    assert _find(billing_app, "Invoice", case)[0]["status"] == "issued"
    assert _find(billing_app, "PaymentNotice", case) == []


def test_record_payment_input_errors(billing_app: Any) -> None:
    admin = _admin(billing_app)
    case = _make_case(billing_app)
    _done(billing_app, case)
    (invoice,) = _find(billing_app, "Invoice", case)
    url = f"/fhir/Invoice/{invoice['id']}/$record-payment"
    assert admin.post(url, json={"resourceType": "Parameters"}).status_code == 400
    assert admin.get(url).status_code == 405
    assert admin.post("/fhir/Invoice/nope/$record-payment", json=_payment(1)).status_code == 404
    bad_date = _payment(560, date={"valueString": "yesterday"})
    assert admin.post(url, json=bad_date).status_code == 400


# -- amendments over REST ----------------------------------------------------------------------


def test_final_report_is_amended_not_edited(billing_app: Any, client: TestClient) -> None:
    case = _make_case(billing_app)
    rid = f"rep-{case.case_id}"
    report = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "basedOn": [{"reference": case.ref}],
        "status": "final",
        "code": codes.concept(codes.REPORT_TYPE_SYSTEM, codes.REPORT_TYPE_RECOMMENDATION),
        "subject": {"reference": f"Patient/{case.patient}"},
        "conclusion": "No surgery.",
    }
    url = f"/fhir/DiagnosticReport/{rid}"
    assert client.put(url, json=report).status_code == 201
    assert client.put(url, json=report).status_code == 200  # unchanged: accepted

    edited = client.put(url, json={**report, "conclusion": "Surgery."})
    assert edited.status_code == 409 and _error_code(edited) == "MSO-REPORT-001"
    back = client.put(url, json={**report, "status": "preliminary"})
    assert back.status_code == 409 and _error_code(back) == "MSO-REPORT-002"
    no_reason = client.put(url, json={**report, "status": "amended", "conclusion": "Surgery."})
    assert no_reason.status_code == 422 and _error_code(no_reason) == "MSO-REPORT-003"
    patch = client.patch(
        url,
        json=[{"op": "replace", "path": "/conclusion", "value": "Surgery."}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert patch.status_code == 409
    assert client.delete(url).status_code == 409

    amended = with_amendment_reason(
        {**report, "status": "amended", "conclusion": "Surgery."}, "New echocardiography"
    )
    response = client.put(url, json=amended)
    assert response.status_code == 200, response.text
    history = client.get(f"{url}/_history").json()
    statuses = [e["resource"]["status"] for e in history["entry"]]
    assert statuses[0] == "amended" and "final" in statuses[1:]


# -- end to end: $complete bills the case --------------------------------------------------------


def _op(http: TestClient, task_id: str, name: str, **refs: str) -> Any:
    params = [{"name": k, "valueReference": {"reference": v}} for k, v in refs.items()]
    return http.post(
        f"/fhir/Task/{task_id}/${name}", json={"resourceType": "Parameters", "parameter": params}
    )


def test_complete_finalizes_the_report_and_bills_the_case(billing_app: Any) -> None:
    import base64
    import io

    from pypdf import PdfReader

    u = secrets.token_hex(6)
    case = Case(f"case-{u}", "", f"pat-{u}", f"reqorg-{u}", f"role-{u}", f"prov-{u}")
    resources = [
        {"resourceType": "Organization", "id": case.requester_org, "name": f"Hospital {u}"},
        {"resourceType": "Practitioner", "id": f"dr-{u}", "name": [{"family": "Ødegård"}]},
        {
            "resourceType": "PractitionerRole",
            "id": case.provider_role,
            "active": True,
            "practitioner": {"reference": f"Practitioner/dr-{u}"},
            "specialty": [codes.concept(codes.SPECIALTY_SYSTEM, "oncology")],
        },
        {"resourceType": "Patient", "id": case.patient, "name": [{"family": "Zoë"}]},
        {
            "resourceType": "ServiceRequest",
            "id": case.case_id,
            "status": "active",
            "intent": "order",
            "priority": "stat",
            "category": [codes.concept(codes.CASE_CATEGORY_SYSTEM, "second-opinion")],
            "code": codes.concept(codes.SPECIALTY_SYSTEM, "oncology"),
            "subject": {"reference": f"Patient/{case.patient}"},
            "requester": {"reference": f"Organization/{case.requester_org}"},
            "note": [{"text": "Adjuvant therapy?"}],
        },
    ]

    def work(tx: Any) -> str:
        for body in resources:
            tx.update(body["resourceType"], body["id"], body)
        (task,) = tx.find("Task", [("focus", case.ref)])
        return task.res_id

    task_id = billing_app.state.repo.write(work)
    admin = _admin(billing_app)
    provider = _http(
        billing_app, token_for(billing_app, role="provider", practitioner_role=case.provider_role)
    )
    response = _op(admin, task_id, "assign", provider=f"PractitionerRole/{case.provider_role}")
    assert response.status_code == 200, response.text
    for name in ("accept", "start"):
        assert _op(provider, task_id, name).status_code == 200
    draft = provider.post(
        "/fhir/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "basedOn": [{"reference": case.ref}],
            "status": "preliminary",
            "code": codes.concept(codes.REPORT_TYPE_SYSTEM, codes.REPORT_TYPE_RECOMMENDATION),
            "subject": {"reference": f"Patient/{case.patient}"},
            "conclusion": "Adjuvant chemotherapy is recommended.",
        },
    )
    assert draft.status_code == 201, draft.text
    report_id = draft.json()["id"]
    done = _op(provider, task_id, "complete", report=f"DiagnosticReport/{report_id}")
    assert done.status_code == 200, done.text

    (charge,) = _find(billing_app, "ChargeItem", case)
    (invoice,) = _find(billing_app, "Invoice", case)
    assert invoice["totalGross"] == {"value": 1100, "currency": "EUR"}  # oncology, stat
    assert charge["service"] == [{"reference": f"DiagnosticReport/{report_id}"}]
    final = provider.get(f"/fhir/DiagnosticReport/{report_id}").json()
    assert final["status"] == "final"
    (form,) = final["presentedForm"]
    text = PdfReader(io.BytesIO(base64.b64decode(form["data"]))).pages[0].extract_text()
    case_number = _find_case_number(billing_app, case)
    assert case_number in text and "Adjuvant chemotherapy is recommended." in text

    # The provider amends the final report; editing it is refused.
    url = f"/fhir/DiagnosticReport/{report_id}"
    edited = provider.put(url, json={**final, "conclusion": "No chemotherapy."})
    assert edited.status_code == 409 and _error_code(edited) == "MSO-REPORT-001"
    amended = with_amendment_reason(
        {**final, "status": "amended", "conclusion": "No chemotherapy."}, "Late pathology result"
    )
    assert provider.put(url, json=amended).status_code == 200
    # The requester organization reads and the admin settles the invoice.
    requester = _http(
        billing_app, token_for(billing_app, role="requester", organization=case.requester_org)
    )
    assert requester.get(f"/fhir/Invoice/{invoice['id']}").status_code == 200
    paid = admin.post(f"/fhir/Invoice/{invoice['id']}/$record-payment", json=_payment(1100))
    assert paid.status_code == 200, paid.text
    assert requester.get(f"/fhir/Invoice/{invoice['id']}").json()["status"] == "balanced"


def _find_case_number(app: Any, case: Case) -> str:
    def work(tx: Any) -> str:
        body = tx.read("ServiceRequest", case.case_id).resource
        return next(
            i["value"] for i in body["identifier"] if i["system"] == codes.CASE_NUMBER_SYSTEM
        )

    return app.state.repo.read_only(work)
