"""Case documents (issue 5): accepted types checked by content with real PDF, DOCX, PNG, TIFF
and DICOM bytes, disguised files rejected naming the file, size and count limits, and no
documents after Done — through transaction Bundles and plain REST, raw Binary uploads too."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.codes import MAX_DOCUMENT_BYTES
from tests.integration.workflow_world import (
    DOCX,
    PDF,
    World,
    build_world,
    dicom_bytes,
    document,
    docx_bytes,
    exe_bytes,
    pdf_bytes,
    plain_zip_bytes,
    png_bytes,
    tiff_bytes,
)


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def test_every_accepted_type_by_content(world: World) -> None:
    files = [
        ("letter.pdf", pdf_bytes(), PDF),
        ("letter.docx", docx_bytes(), DOCX),
        ("scan.png", png_bytes(), "image/png"),
        ("scan.tiff", tiff_bytes(), "image/tiff"),
        ("slice.dcm", dicom_bytes(), "application/dicom"),
        ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20, "image/jpeg"),
    ]
    sr_id, _ = world.submit(documents=files)
    found = world.get("prov1", "DocumentReference", params={"related": f"ServiceRequest/{sr_id}"})
    assert found.status_code == 200
    docs = world.get("reqA", "DocumentReference", params={"related": f"ServiceRequest/{sr_id}"})
    assert len(docs.json()["entry"]) == len(files)


@pytest.mark.parametrize(
    ("title", "data", "declared"),
    [
        # ids are the file names: the zip bytes carry a timestamp, and xdist workers must agree
        pytest.param(title, data, declared, id=title)
        for title, data, declared in (
            ("setup.pdf", exe_bytes(), PDF),
            ("archive.pdf", plain_zip_bytes(), PDF),
            ("notes.pdf", b"just some text, not a PDF at all", PDF),
            ("archive.docx", plain_zip_bytes(), DOCX),
            ("letter.png", pdf_bytes(), "image/png"),  # a real PDF declared as PNG
            ("program.exe", exe_bytes(), "application/x-msdownload"),
        )
    ],
)
def test_disguised_files_are_rejected_naming_the_file(
    world: World, title: str, data: bytes, declared: str
) -> None:
    bundle = world.submission(documents=[("fine.pdf", pdf_bytes(), PDF), (title, data, declared)])
    response = world.post("reqA", "", bundle)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-421"
    text = response.json()["issue"][0]["diagnostics"]
    # the entry and the content are named, never the file's title (resource content)
    index = _entry_of(bundle, title)
    assert text.startswith(f"Bundle.entry[{index}] (POST DocumentReference)"), text
    assert "content[0]" in text and title not in text
    # nothing of the submission was stored
    mine = world.get("admin", "ServiceRequest", params={"subject": f"Patient/{world.patient}"})
    assert mine.json().get("total", len(mine.json().get("entry", []))) == 0


def test_submission_entries_may_come_in_any_order(world: World) -> None:
    """FHIR leaves the order of a transaction's POSTs open: documents before their Binary and
    case, the case before its Patient, all is checked once every entry is written."""
    bundle = world.submission(
        documents=[("a.pdf", pdf_bytes(), PDF), ("b.png", png_bytes(), "image/png")]
    )
    bundle["entry"].reverse()
    response = world.post("reqA", "", bundle)
    assert response.status_code == 200, response.text
    (sr_id,) = [
        e["response"]["location"].split("ServiceRequest/")[1].split("/")[0]
        for e in response.json()["entry"]
        if "ServiceRequest/" in e["response"]["location"]
    ]
    docs = world.get("reqA", "DocumentReference", params={"related": f"ServiceRequest/{sr_id}"})
    assert len(docs.json()["entry"]) == 2

    # a rule broken by a later-checked entry still names that entry and its file
    bundle = world.submission(
        documents=[("fine.pdf", pdf_bytes(), PDF), ("setup.pdf", exe_bytes(), PDF)]
    )
    bundle["entry"].reverse()
    response = world.post("reqA", "", bundle)
    assert response.status_code == 422 and error_code(response) == "MSO-DOC-421"
    text = response.json()["issue"][0]["diagnostics"]
    index = next(
        i for i, e in enumerate(bundle["entry"]) if e["resource"].get("description") == "setup.pdf"
    )
    assert (
        text.startswith(f"Bundle.entry[{index}] (POST DocumentReference)")
        and "setup.pdf" not in text
    )


def test_more_than_ten_files_rejected(world: World) -> None:
    files = [(f"page{i}.pdf", pdf_bytes(), PDF) for i in range(11)]
    response = world.post("reqA", "", world.submission(documents=files))
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-423"
    text = response.json()["issue"][0]["diagnostics"]
    bundle = world.submission(documents=files)
    assert text.startswith(f"Bundle.entry[{_entry_of(bundle, 'page10.pdf')}] "), text
    files = files[:10]
    sr_id, task_id = world.submit(documents=files)
    # an eleventh one later is refused too
    response = _add_document(world, sr_id, "late.pdf", pdf_bytes(), PDF)
    assert response.status_code == 422 and error_code(response) == "MSO-DOC-423"
    assert task_id


def test_size_limit(world: World) -> None:
    data = pdf_bytes()
    bundle = world.submission(documents=[("huge.pdf", data, PDF)])
    doc = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference")
    doc["resource"]["content"][0]["attachment"]["size"] = MAX_DOCUMENT_BYTES + 1
    response = world.post("reqA", "", bundle)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-422" and "huge.pdf" not in response.text


def test_raw_binary_upload_checked_by_content(world: World) -> None:
    sr_id, _ = world.submit()
    headers = {**world.as_("reqA"), "Content-Type": "application/pdf"}
    exe = world.client.post("/fhir/Binary", content=exe_bytes(), headers=headers)
    assert exe.status_code == 201, exe.text
    response = _add_document(world, sr_id, "scan.pdf", exe_bytes(), PDF, url=_id_url(exe))
    assert response.status_code == 422 and error_code(response) == "MSO-DOC-421"
    assert "scan.pdf" not in response.text
    good = world.client.post("/fhir/Binary", content=pdf_bytes(), headers=headers)
    response = _add_document(world, sr_id, "report.pdf", pdf_bytes(), PDF, url=_id_url(good))
    assert response.status_code == 201, response.text
    # the content of a case document's Binary cannot be swapped afterwards
    replaced = world.client.put(f"/fhir/{_id_url(good)}", content=exe_bytes(), headers=headers)
    assert replaced.status_code == 409, replaced.text


def test_no_documents_after_done(world: World) -> None:
    sr_id, task_id = world.submit()
    assert world.op(
        "admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}"
    ).is_success
    assert _add_document(world, sr_id, "a.pdf", pdf_bytes(), PDF).status_code == 201
    assert world.op("prov1", task_id, "accept").is_success
    response = _add_document(world, sr_id, "b.pdf", pdf_bytes(), PDF)
    assert response.status_code == 409 and error_code(response) == "MSO-DOC-409"
    assert world.op("prov1", task_id, "start").is_success
    world.report(sr_id)
    assert world.op("prov1", task_id, "complete").is_success
    response = _add_document(world, sr_id, "after.pdf", pdf_bytes(), PDF)
    assert response.status_code == 409, response.text
    assert error_code(response) == "MSO-DOC-409"


def _entry_of(bundle: dict[str, Any], title: str) -> int:
    """The index of the DocumentReference entry of the file ``title``."""
    return next(
        i for i, e in enumerate(bundle["entry"]) if e["resource"].get("description") == title
    )


def _id_url(response: Any) -> str:
    return f"Binary/{response.json()['id']}"


def _add_document(
    world: World, sr_id: str, title: str, data: bytes, content_type: str, *, url: str = ""
) -> Any:
    """Add one document to a case through a transaction (Binary inline) or with a Binary url."""
    if url:
        body = document(
            f"ServiceRequest/{sr_id}", f"Patient/{world.patient}", title, content_type, url, data
        )
        return world.post("reqA", "DocumentReference", body)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b7b5e4e-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": content_type,
                    "data": __import__("base64").b64encode(data).decode(),
                },
                "request": {"method": "POST", "url": "Binary"},
            },
            {
                "resource": document(
                    f"ServiceRequest/{sr_id}",
                    f"Patient/{world.patient}",
                    title,
                    content_type,
                    "urn:uuid:0b7b5e4e-0000-4000-8000-000000000001",
                    data,
                ),
                "request": {"method": "POST", "url": "DocumentReference"},
            },
        ],
    }
    response = world.post("reqA", "", bundle)
    if response.status_code == 200:
        response.status_code = 201
    return response
