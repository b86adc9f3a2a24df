"""A small MSO world for the workflow tests: one requesting organization, two providers of one
specialty, a patient, real tokens per role, and helpers to submit and move cases over HTTP."""

from __future__ import annotations

import base64
import io
import uuid
import zipfile
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient

from fhir_server.codes import (
    CASE_CATEGORY_SECOND_OPINION,
    CASE_CATEGORY_SYSTEM,
    CASE_NUMBER_SYSTEM,
    DOCUMENT_CATEGORY_SYSTEM,
    INTAKE_QUESTIONNAIRE,
    REPORT_TYPE_RECOMMENDATION,
    REPORT_TYPE_SYSTEM,
    SPECIALTY_SYSTEM,
)
from tests.auth_helpers import token_for

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


# -- minimal real files ------------------------------------------------------------------------


def pdf_bytes() -> bytes:
    """A tiny valid one-page PDF, written by hand."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode())
    out.write(f"startxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def docx_bytes() -> bytes:
    """A minimal DOCX: a ZIP with [Content_Types].xml and word/document.xml."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
            'content-types"><Override PartName="/word/document.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
        )
        archive.writestr(
            "word/document.xml",
            '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
            "<w:body><w:p><w:r><w:t>Letter</w:t></w:r></w:p></w:body></w:document>",
        )
    return buffer.getvalue()


def plain_zip_bytes() -> bytes:
    """A ZIP that is not a DOCX."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return buffer.getvalue()


def png_bytes() -> bytes:
    """A 1x1 PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


def tiff_bytes() -> bytes:
    """A little-endian TIFF header with an empty IFD."""
    return b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def dicom_bytes() -> bytes:
    """A DICOM Part 10 file start: 128-byte preamble, DICM, a group length element."""
    return b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"


def exe_bytes() -> bytes:
    """The start of a Windows executable."""
    return b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 64 + b"This program cannot be run in DOS"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the world -------------------------------------------------------------------------------


@dataclass
class World:
    """Ids and per-role headers."""

    client: TestClient
    app: Any
    u: str
    org: str
    req_role: str
    prov1: str
    prov2: str
    patient: str
    headers: dict[str, dict[str, str]]

    def as_(self, who: str) -> dict[str, str]:
        return self.headers[who]

    # -- HTTP helpers ------------------------------------------------------------------------

    def get(self, who: str, path: str, **kw: Any) -> Any:
        return self.client.get(f"/fhir/{path}", headers=self.as_(who), **kw)

    def post(self, who: str, path: str, body: Any, **kw: Any) -> Any:
        return self.client.post(f"/fhir/{path}", headers=self.as_(who), json=body, **kw)

    def put(self, who: str, path: str, body: Any) -> Any:
        return self.client.put(f"/fhir/{path}", headers=self.as_(who), json=body)

    def patch(self, who: str, path: str, ops: list[dict[str, Any]]) -> Any:
        headers = {**self.as_(who), "Content-Type": "application/json-patch+json"}
        return self.client.patch(f"/fhir/{path}", headers=headers, json=ops)

    def op(self, who: str, task_id: str, name: str, **params: Any) -> Any:
        parameters = []
        for key, value in params.items():
            if key in ("provider", "report"):
                parameters.append({"name": key, "valueReference": {"reference": value}})
            else:
                parameters.append({"name": key, "valueString": value})
        body = {"resourceType": "Parameters", "parameter": parameters}
        return self.post(who, f"Task/{task_id}/${name}", body)

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.get("admin", f"Task/{task_id}")
        assert response.status_code == 200, response.text
        return response.json()

    # -- case submission ---------------------------------------------------------------------

    def submission(
        self,
        *,
        documents: list[tuple[str, bytes, str]] | None = None,
        priority: str = "routine",
        patient_ref: str | None = None,
    ) -> dict[str, Any]:
        """A transaction Bundle submitting a case with ``documents`` (title, bytes, type)."""
        entries: list[dict[str, Any]] = []
        patient_url = patient_ref or f"Patient/{self.patient}"
        sr_url = f"urn:uuid:{uuid.uuid4()}"
        entries.append(
            {
                "fullUrl": sr_url,
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "active",
                    "intent": "order",
                    "priority": priority,
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": CASE_CATEGORY_SYSTEM,
                                    "code": CASE_CATEGORY_SECOND_OPINION,
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]},
                    "subject": {"reference": patient_url},
                    "requester": {"reference": f"PractitionerRole/{self.req_role}"},
                    "note": [{"text": "Is surgery needed?"}],
                },
                "request": {"method": "POST", "url": "ServiceRequest"},
            }
        )
        for title, data, content_type in documents or []:
            bin_url, doc_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
            entries.append(
                {
                    "fullUrl": bin_url,
                    "resource": {
                        "resourceType": "Binary",
                        "contentType": content_type,
                        "securityContext": {"reference": doc_url},
                        "data": b64(data),
                    },
                    "request": {"method": "POST", "url": "Binary"},
                }
            )
            entries.append(
                {
                    "fullUrl": doc_url,
                    "resource": document(sr_url, patient_url, title, content_type, bin_url, data),
                    "request": {"method": "POST", "url": "DocumentReference"},
                }
            )
        entries.append(
            {
                "resource": {
                    "resourceType": "QuestionnaireResponse",
                    "status": "completed",
                    "questionnaire": INTAKE_QUESTIONNAIRE,
                    "subject": {"reference": patient_url},
                    "basedOn": [{"reference": sr_url}],
                    "item": [{"linkId": "disease-type", "answer": [{"valueString": "tumour"}]}],
                },
                "request": {"method": "POST", "url": "QuestionnaireResponse"},
            }
        )
        entries.append(
            {
                "resource": {
                    "resourceType": "Consent",
                    "status": "active",
                    "scope": {"coding": [{"code": "patient-privacy"}]},
                    "category": [{"coding": [{"code": "INFAO"}]}],
                    "patient": {"reference": patient_url},
                },
                "request": {"method": "POST", "url": "Consent"},
            }
        )
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def submit(self, **kw: Any) -> tuple[str, str]:
        """Submit a case as requester A; (ServiceRequest id, case Task id)."""
        response = self.post("reqA", "", self.submission(**kw))
        assert response.status_code == 200, response.text
        sr_id = next(
            e["response"]["location"].split("ServiceRequest/")[1].split("/")[0]
            for e in response.json()["entry"]
            if "ServiceRequest/" in e["response"]["location"]
        )
        found = self.get("reqA", "Task", params={"focus": f"ServiceRequest/{sr_id}"})
        assert found.status_code == 200, found.text
        tasks = [e["resource"] for e in found.json().get("entry", [])]
        assert len(tasks) == 1, tasks
        return sr_id, tasks[0]["id"]

    def report(self, sr_id: str, *, status: str = "preliminary") -> str:
        """A recommendation draft written by provider 1."""
        body = {
            "resourceType": "DiagnosticReport",
            "status": status,
            "code": {
                "coding": [{"system": REPORT_TYPE_SYSTEM, "code": REPORT_TYPE_RECOMMENDATION}]
            },
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "subject": {"reference": f"Patient/{self.patient}"},
            "performer": [{"reference": f"PractitionerRole/{self.prov1}"}],
            "conclusion": "No surgery; follow-up imaging in 3 months.",
        }
        response = self.post("prov1", "DiagnosticReport", body)
        assert response.status_code == 201, response.text
        return response.json()["id"]


def document(
    sr_url: str,
    patient_url: str,
    title: str,
    content_type: str,
    url: str,
    data: bytes,
    *,
    category: str = "lab-report",
) -> dict[str, Any]:
    """A case DocumentReference whose content is the Binary at ``url``."""
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "category": [{"coding": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": category}]}],
        "subject": {"reference": patient_url},
        "description": title,
        "content": [
            {
                "attachment": {
                    "contentType": content_type,
                    "url": url,
                    "size": len(data),
                    "title": title,
                }
            }
        ],
        "context": {"related": [{"reference": sr_url}]},
    }


def build_world(app: Any, client: TestClient) -> World:
    """Organizations, roles, a patient (system client) and tokens for every role.

    The ChargeItemDefinitions are stored as ``mso serve`` does at start-up (billing on Done
    prices the case from them).
    """
    from fhir_server.conformance import install, read_resources

    install(app.state.repo, [r for r in read_resources() if r.res_type == "ChargeItemDefinition"])
    u = uuid.uuid4().hex[:10]
    org, req_role, prov1, prov2, patient = (f"{n}-{u}" for n in ("org", "rq", "pv1", "pv2", "pt"))
    specialty = [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]}]
    resources = [
        ("Organization", org, {"resourceType": "Organization", "name": f"Hospital {u}"}),
        (
            "PractitionerRole",
            req_role,
            {
                "resourceType": "PractitionerRole",
                "active": True,
                "organization": {"reference": f"Organization/{org}"},
            },
        ),
        (
            "PractitionerRole",
            prov1,
            {"resourceType": "PractitionerRole", "active": True, "specialty": specialty},
        ),
        (
            "PractitionerRole",
            prov2,
            {"resourceType": "PractitionerRole", "active": True, "specialty": specialty},
        ),
        (
            "Patient",
            patient,
            {
                "resourceType": "Patient",
                "active": True,
                "identifier": [{"system": "urn:mso:test-mrn", "value": u}],
                "name": [{"family": f"Doe{u}"}],
            },
        ),
    ]
    for rtype, rid, body in resources:
        response = client.put(f"/fhir/{rtype}/{rid}", json={**body, "id": rid})
        assert response.status_code in (200, 201), response.text
    tokens = {
        "reqA": token_for(app, role="requester", organization=org, practitioner_role=req_role),
        "admin": token_for(app, role="admin"),
        "prov1": token_for(app, role="provider", practitioner_role=prov1),
        "prov2": token_for(app, role="provider", practitioner_role=prov2),
        "patient": token_for(app, role="patient", patient=patient),
    }
    headers = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
    return World(client, app, u, org, req_role, prov1, prov2, patient, headers)


def case_number(world: World, sr_id: str) -> str:
    body = world.get("admin", f"ServiceRequest/{sr_id}").json()
    return next(i["value"] for i in body["identifier"] if i["system"] == CASE_NUMBER_SYSTEM)


def linked_by_supporting_info(bundle: dict[str, Any]) -> dict[str, Any]:
    """``bundle`` (a :meth:`World.submission`) with its documents linked the way the ``mso-case``
    profile names: listed in the ServiceRequest's ``supportingInfo``, no ``context.related``."""
    request = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    docs = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    for entry in docs:
        entry["resource"].pop("context", None)
    request["resource"]["supportingInfo"] = [{"reference": e["fullUrl"]} for e in docs]
    return bundle
