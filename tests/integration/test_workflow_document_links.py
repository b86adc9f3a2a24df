"""Case documents linked the documented way (issue 14): a ServiceRequest listing its
DocumentReferences in ``supportingInfo`` gets every document rule — type by content, 50 MB,
10 files, case status — on every path: submission Bundles in any entry order, a raw Binary
referenced by ``attachment.url``, a later PUT/PATCH of the ServiceRequest adding a document,
a PUT of the DocumentReference. The legal path still works, and the link is recorded in the
document's ``context.related`` so the case's parties find it."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.codes import MAX_DOCUMENT_BYTES
from tests.integration.workflow_world import (
    PDF,
    World,
    b64,
    build_world,
    document,
    exe_bytes,
    linked_by_supporting_info,
    pdf_bytes,
    png_bytes,
)

HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
SHELL = b"#!/bin/sh\nrm -rf / --no-preserve-root\n"


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def _cases_of_patient(world: World) -> int:
    found = world.get("admin", "ServiceRequest", params={"subject": f"Patient/{world.patient}"})
    return len(found.json().get("entry", []))


def _sr_id(response: Any) -> str:
    return next(
        e["response"]["location"].split("ServiceRequest/")[1].split("/")[0]
        for e in response.json()["entry"]
        if "ServiceRequest/" in e["response"]["location"]
    )


def _documents_of(world: World, who: str, sr_id: str) -> list[dict[str, Any]]:
    found = world.get(who, "DocumentReference", params={"related": f"ServiceRequest/{sr_id}"})
    assert found.status_code == 200, found.text
    return [e["resource"] for e in found.json().get("entry", [])]


def _raw_binary(world: World, data: bytes, content_type: str = PDF) -> str:
    headers = {**world.as_("reqA"), "Content-Type": content_type}
    response = world.client.post("/fhir/Binary", content=data, headers=headers)
    assert response.status_code == 201, response.text
    return f"Binary/{response.json()['id']}"


def _unlinked_document(world: World, title: str, content_type: str, url: str, data: bytes) -> str:
    """A DocumentReference naming no case (not a case document yet): accepted as it is."""
    body = document("", f"Patient/{world.patient}", title, content_type, url, data)
    body.pop("context")
    response = world.post("reqA", "DocumentReference", body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _submission_with_raw(world: World, binary_url: str, size: int | None) -> dict[str, Any]:
    """A submission whose one document's content is a raw-uploaded Binary (``attachment.url``)."""
    bundle = world.submission(documents=[("scan.pdf", pdf_bytes(), PDF)])
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Binary"]
    doc = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference")
    attachment = doc["resource"]["content"][0]["attachment"]
    attachment["url"] = binary_url
    if size is None:
        attachment.pop("size")
    else:
        attachment["size"] = size
    return linked_by_supporting_info(bundle)


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        pytest.param(exe_bytes(), PDF, id="executable-as-pdf"),
        pytest.param(HTML, "image/png", id="html-as-png"),
        pytest.param(SHELL, "image/tiff", id="shell-script-as-tiff"),
    ],
)
@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_disguised_file_linked_by_supporting_info_is_refused(
    world: World, data: bytes, declared: str, reverse: bool
) -> None:
    bundle = linked_by_supporting_info(
        world.submission(documents=[("fine.pdf", pdf_bytes(), PDF), ("x", data, declared)])
    )
    if reverse:
        bundle["entry"].reverse()
    response = world.post("reqA", "", bundle)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-421"
    assert _cases_of_patient(world) == 0


def test_eleven_files_linked_by_supporting_info_are_refused(world: World) -> None:
    files = [(f"page{i}.pdf", pdf_bytes(), PDF) for i in range(11)]
    response = world.post("reqA", "", linked_by_supporting_info(world.submission(documents=files)))
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-423"
    assert _cases_of_patient(world) == 0


def test_51_mb_raw_binary_by_attachment_url_is_refused(world: World) -> None:
    data = pdf_bytes() + b"\0" * (MAX_DOCUMENT_BYTES + 1024 * 1024)
    binary = _raw_binary(world, data)
    # the declared size is left out: the stored bytes decide
    response = world.post("reqA", "", _submission_with_raw(world, binary, size=None))
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-422"
    assert _cases_of_patient(world) == 0


def test_legal_documents_linked_by_supporting_info(world: World) -> None:
    bundle = linked_by_supporting_info(
        world.submission(
            documents=[("a.pdf", pdf_bytes(), PDF), ("b.png", png_bytes(), "image/png")]
        )
    )
    bundle["entry"].reverse()
    response = world.post("reqA", "", bundle)
    assert response.status_code == 200, response.text
    sr_id = _sr_id(response)
    # the link is recorded both ways: the case's documents are found (and counted) by it
    docs = _documents_of(world, "reqA", sr_id)
    assert len(docs) == 2
    request = world.get("reqA", f"ServiceRequest/{sr_id}").json()
    assert {i["reference"] for i in request["supportingInfo"]} == {
        f"DocumentReference/{d['id']}" for d in docs
    }


def test_legal_raw_binary_by_attachment_url(world: World) -> None:
    data = pdf_bytes()
    binary = _raw_binary(world, data)
    response = world.post("reqA", "", _submission_with_raw(world, binary, size=len(data)))
    assert response.status_code == 200, response.text
    assert len(_documents_of(world, "reqA", _sr_id(response))) == 1


def _add_by_put(world: World, sr_id: str, doc_id: str) -> Any:
    request = world.get("reqA", f"ServiceRequest/{sr_id}").json()
    request.pop("meta", None)
    infos = request.get("supportingInfo") or []
    request["supportingInfo"] = [*infos, {"reference": f"DocumentReference/{doc_id}"}]
    return world.put("reqA", f"ServiceRequest/{sr_id}", request)


def _add_by_patch(world: World, sr_id: str, doc_id: str) -> Any:
    ops = [
        {
            "op": "add",
            "path": "/supportingInfo",
            "value": [{"reference": f"DocumentReference/{doc_id}"}],
        }
    ]
    return world.patch("reqA", f"ServiceRequest/{sr_id}", ops)


@pytest.mark.parametrize("add", [_add_by_put, _add_by_patch], ids=["put", "patch"])
def test_a_later_write_of_the_case_adding_a_document_applies_the_rules(
    world: World, add: Any
) -> None:
    sr_id, task_id = world.submit()
    binary = _raw_binary(world, exe_bytes())
    bad = _unlinked_document(world, "setup.pdf", PDF, binary, exe_bytes())
    response = add(world, sr_id, bad)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-421"
    assert _documents_of(world, "admin", sr_id) == []

    good = _unlinked_document(world, "a.pdf", PDF, _raw_binary(world, pdf_bytes()), pdf_bytes())
    response = add(world, sr_id, good)
    assert response.status_code == 200, response.text
    (linked,) = _documents_of(world, "admin", sr_id)
    assert linked["id"] == good

    # no documents once the provider has accepted the case, however they are linked
    assign = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert assign.is_success, assign.text
    assert world.op("prov1", task_id, "accept").is_success
    late = _unlinked_document(world, "b.pdf", PDF, _raw_binary(world, pdf_bytes()), pdf_bytes())
    response = add(world, sr_id, late) if add is _add_by_put else _add_by_put(world, sr_id, late)
    assert response.status_code == 409, response.text
    assert error_code(response) == "MSO-DOC-409"


def test_an_eleventh_document_added_by_put_is_refused(world: World) -> None:
    files = [(f"page{i}.pdf", pdf_bytes(), PDF) for i in range(10)]
    response = world.post("reqA", "", linked_by_supporting_info(world.submission(documents=files)))
    assert response.status_code == 200, response.text
    sr_id = _sr_id(response)
    extra = _unlinked_document(world, "p.pdf", PDF, _raw_binary(world, pdf_bytes()), pdf_bytes())
    response = _add_by_put(world, sr_id, extra)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-423"


def test_a_put_of_a_supporting_info_document_applies_the_rules(world: World) -> None:
    bundle = linked_by_supporting_info(world.submission(documents=[("a.pdf", pdf_bytes(), PDF)]))
    response = world.post("reqA", "", bundle)
    assert response.status_code == 200, response.text
    (doc,) = _documents_of(world, "reqA", _sr_id(response))
    doc.pop("meta", None)
    attachment = doc["content"][0]["attachment"]
    attachment.pop("url")
    attachment.pop("size")
    attachment["data"] = b64(HTML)
    attachment["contentType"] = "image/png"
    response = world.put("reqA", f"DocumentReference/{doc['id']}", doc)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-421"


def test_supporting_info_naming_an_unknown_document_is_refused(world: World) -> None:
    sr_id, _ = world.submit()
    response = _add_by_put(world, sr_id, "no-such-document")
    assert response.status_code in (400, 404, 422), response.text
    if response.status_code == 422:
        assert error_code(response) == "MSO-DOC-424"


def test_the_assigned_provider_reads_a_raw_uploaded_case_file(world: World) -> None:
    """The large-file path (raw ``POST Binary`` + ``attachment.url``) shares the file with the
    case's provider through the document (``Binary.securityContext``), and with nobody else;
    the raw bytes stay what was uploaded."""
    data = pdf_bytes()
    binary = _raw_binary(world, data)
    response = world.post("reqA", "", _submission_with_raw(world, binary, size=len(data)))
    assert response.status_code == 200, response.text
    sr_id = _sr_id(response)
    (doc,) = _documents_of(world, "reqA", sr_id)
    task_id = world.get("admin", "Task", params={"focus": f"ServiceRequest/{sr_id}"}).json()
    task_id = task_id["entry"][0]["resource"]["id"]
    assert world.get("prov1", binary).status_code == 404  # not assigned yet
    assign = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert assign.is_success, assign.text
    raw = world.client.get(f"/fhir/{binary}", headers={**world.as_("prov1"), "Accept": PDF})
    assert raw.status_code == 200, raw.text
    assert raw.content == data
    secured = world.get("prov1", binary).json()
    assert secured["securityContext"] == {"reference": f"DocumentReference/{doc['id']}"}
    assert world.get("prov2", binary).status_code == 404


def test_a_document_cannot_carry_another_users_binary(world: World) -> None:
    """Naming a Binary one cannot read would share it with one's own case: refused as unknown."""
    headers = {**world.as_("prov2"), "Content-Type": PDF}
    other = world.client.post("/fhir/Binary", content=pdf_bytes(), headers=headers)
    assert other.status_code == 201, other.text
    binary = f"Binary/{other.json()['id']}"
    response = world.post("reqA", "", _submission_with_raw(world, binary, size=None))
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-424"
    assert world.get("reqA", binary).status_code == 404


def test_a_case_document_cannot_be_unlinked_from_its_case(world: World) -> None:
    """Dropping the case from ``context.related`` would take the document out of the case's
    rules and count: refused, and the document stays the case's."""
    response = world.post("reqA", "", world.submission(documents=[("a.pdf", pdf_bytes(), PDF)]))
    assert response.status_code == 200, response.text
    sr_id = _sr_id(response)
    (doc,) = _documents_of(world, "reqA", sr_id)
    doc.pop("meta", None)
    doc.pop("context")
    response = world.put("reqA", f"DocumentReference/{doc['id']}", doc)
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-DOC-425"
    assert [d["id"] for d in _documents_of(world, "reqA", sr_id)] == [doc["id"]]
