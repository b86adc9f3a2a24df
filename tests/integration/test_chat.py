"""Case chat (issue 15, Chat): requester and provider exchange immutable messages with checked
attachments; admins reach chat content by no path; a provider who rejects loses the thread;
per-user read state with ``$mark-read`` / ``$unread`` — on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from fhir_server.codes import (
    COMMUNICATION_CATEGORY_SYSTEM,
    MAX_DOCUMENT_BYTES,
    PROFILE_CHAT_MESSAGE,
)
from fhir_server.messaging.presence import flush_presence, forget_touches, touch_presence
from fhir_server.storage.auth_schema import auth_user
from fhir_server.storage.messaging_schema import mail_outbox, user_presence
from fhir_server.workflow import documents
from tests.integration.workflow_world import (
    PDF,
    World,
    b64,
    build_world,
    case_number,
    exe_bytes,
    pdf_bytes,
    png_bytes,
)

FHIR_JSON = "application/fhir+json"


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


# -- helpers ------------------------------------------------------------------------------------


def code_of(response: Any) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["details"]["coding"][0]["code"]


def refused(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert code_of(response) == code, response.text


def case(world: World, *, accept: bool = True) -> tuple[str, str]:
    """A case of requester A assigned to provider 1 (accepted by default)."""
    sr_id, task_id = world.submit()
    assigned = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert assigned.status_code == 200, assigned.text
    if accept:
        accepted = world.op("prov1", task_id, "accept")
        assert accepted.status_code == 200, accepted.text
    return sr_id, task_id


def text(value: str) -> dict[str, Any]:
    return {"contentString": value}


def inline(data: bytes, content_type: str, **extra: Any) -> dict[str, Any]:
    return {"contentAttachment": {"contentType": content_type, "data": b64(data), **extra}}


def linked(binary_id: str, content_type: str) -> dict[str, Any]:
    return {"contentAttachment": {"contentType": content_type, "url": f"Binary/{binary_id}"}}


def message(sr_id: str, *payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": "completed",
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "payload": list(payload) or [text("Hello")],
        **extra,
    }


def send(world: World, who: str, body: dict[str, Any]) -> dict[str, Any]:
    response = world.post(who, "Communication", body)
    assert response.status_code == 201, response.text
    return response.json()


def upload(world: World, who: str, data: bytes, content_type: str) -> str:
    """A raw Binary upload (``POST [base]/Binary`` with the bytes); its id."""
    response = world.client.post(
        "/fhir/Binary", content=data, headers={**world.as_(who), "content-type": content_type}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def thread(world: World, who: str, sr_id: str) -> list[str]:
    found = world.get(
        who, "Communication", params={"based-on": f"ServiceRequest/{sr_id}", "_sort": "sent"}
    )
    assert found.status_code == 200, found.text
    return [e["resource"]["id"] for e in found.json().get("entry", ())]


def ids_in(bundle: dict[str, Any]) -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", ())
        if "resource" in e
    }


def unread(world: World, who: str) -> tuple[int, dict[str, int]]:
    response = world.get(who, "Communication/$unread")
    assert response.status_code == 200, response.text
    params = response.json()["parameter"]
    total = next(p["valueInteger"] for p in params if p["name"] == "total")
    cases = {}
    for p in params:
        if p["name"] == "case":
            parts = {part["name"]: part for part in p["part"]}
            ref = parts["case"]["valueReference"]["reference"]
            cases[ref.split("/")[1]] = parts["count"]["valueInteger"]
    assert total == sum(cases.values())
    return total, cases


def mark_read(world: World, who: str, sr_id: str, **extra: dict[str, Any]) -> Any:
    parameters = [{"name": "case", "valueReference": {"reference": f"ServiceRequest/{sr_id}"}}]
    parameters += [{"name": name, **value} for name, value in extra.items()]
    body = {"resourceType": "Parameters", "parameter": parameters}
    return world.post(who, "Communication/$mark-read", body)


def left_after_mark(world: World, who: str, sr_id: str, **extra: dict[str, Any]) -> int:
    response = mark_read(world, who, sr_id, **extra)
    assert response.status_code == 200, response.text
    params = {p["name"]: p for p in response.json()["parameter"]}
    assert params["case"]["valueReference"]["reference"] == f"ServiceRequest/{sr_id}"
    return params["count"]["valueInteger"]


# -- the happy path -----------------------------------------------------------------------------


def test_requester_and_provider_exchange_messages_with_attachments(world: World) -> None:
    sr_id, _ = case(world)
    practitioner = f"pr-{world.u}"
    named = world.client.put(
        f"/fhir/Practitioner/{practitioner}",
        json={
            "resourceType": "Practitioner",
            "id": practitioner,
            "name": [{"prefix": ["Dr"], "given": ["Ada"], "family": "Lovelace"}],
        },
    )
    assert named.status_code in (200, 201), named.text
    role = world.client.get(f"/fhir/PractitionerRole/{world.prov1}").json()
    role["practitioner"] = {"reference": f"Practitioner/{practitioner}"}
    assert world.client.put(f"/fhir/PractitionerRole/{world.prov1}", json=role).status_code == 200

    before = datetime.now(UTC) - timedelta(seconds=5)
    first = send(
        world,
        "reqA",
        message(
            sr_id,
            text("Please see the attached letter"),
            inline(pdf_bytes(), PDF, title="letter.pdf"),
            sent="2001-01-01T00:00:00Z",  # clients cannot backdate
        ),
    )
    sent = datetime.fromisoformat(first["sent"].replace("Z", "+00:00"))
    assert before <= sent <= datetime.now(UTC) + timedelta(seconds=5)
    assert first["sender"]["reference"] == f"PractitionerRole/{world.req_role}"
    assert first["sender"]["display"].endswith("(Requester)")
    assert first["recipient"] == [{"reference": f"PractitionerRole/{world.prov1}"}]
    assert first["category"][0]["coding"][0]["system"] == COMMUNICATION_CATEGORY_SYSTEM
    assert first["category"][0]["coding"][0]["code"] == "chat"
    assert first["subject"] == {"reference": f"Patient/{world.patient}"}
    assert PROFILE_CHAT_MESSAGE in first["meta"]["profile"]

    # the provider answers with a raw-uploaded image (in the blob store: above the inline size)
    image = png_bytes() + b"\x00" * 100_000
    binary_id = upload(world, "prov1", image, "image/png")
    second = send(
        world, "prov1", message(sr_id, text("Here is the scan"), linked(binary_id, "image/png"))
    )
    assert second["sender"] == {
        "reference": f"PractitionerRole/{world.prov1}",
        "display": "Dr Ada Lovelace (Provider)",
    }
    assert second["recipient"] == [{"reference": f"PractitionerRole/{world.req_role}"}]
    # the attachment became readable by the requester: its context is the message
    got = world.client.get(
        f"/fhir/Binary/{binary_id}", headers={**world.as_("reqA"), "accept": "image/png"}
    )
    assert got.status_code == 200 and got.content == image
    as_json = world.client.get(
        f"/fhir/Binary/{binary_id}", headers={**world.as_("reqA"), "accept": FHIR_JSON}
    ).json()
    assert as_json["securityContext"] == {"reference": f"Communication/{second['id']}"}

    for who in ("reqA", "prov1"):
        assert world.get(who, f"Communication/{first['id']}").status_code == 200
        assert thread(world, who, sr_id) == [first["id"], second["id"]]


def test_messages_sent_in_a_burst_keep_their_order(world: World) -> None:
    sr_id, _ = case(world)
    sent = [
        send(world, "reqA" if n % 2 else "prov1", message(sr_id, text(f"m{n}"))) for n in range(8)
    ]
    assert thread(world, "reqA", sr_id) == [m["id"] for m in sent]
    stamps = [m["sent"] for m in sent]
    assert stamps == sorted(stamps)


def test_concurrent_posts_only_ever_append_to_the_thread(world: World) -> None:
    """Two parties post at once while a reader polls: every thread a reader saw is a prefix
    of the final thread (no message committed later sorts before one seen earlier)."""
    sr_id, _ = case(world)
    observed: list[list[str]] = []
    failures: list[str] = []
    done = threading.Event()

    def post_many(who: str) -> None:
        for n in range(8):
            response = world.post(who, "Communication", message(sr_id, text(f"{who} {n}")))
            if response.status_code != 201:
                failures.append(response.text)

    def read_until_done() -> None:
        while not done.is_set():
            observed.append(thread(world, "reqA", sr_id))

    with ThreadPoolExecutor(max_workers=3) as pool:
        reader = pool.submit(read_until_done)
        senders = [pool.submit(post_many, who) for who in ("reqA", "prov1")]
        for sender in senders:
            sender.result(timeout=120)
        done.set()
        reader.result(timeout=60)
    assert failures == []
    final = thread(world, "prov1", sr_id)
    assert len(final) == 16
    assert all(final[: len(seen)] == seen for seen in observed)
    stamps = [
        world.get("reqA", f"Communication/{message_id}").json()["sent"] for message_id in final
    ]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # no ties


# -- who may ------------------------------------------------------------------------------------


def test_admins_reach_chat_content_by_no_path(world: World, app: Any) -> None:
    start = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    sr_id, _ = case(world)
    secret = f"secret-{uuid.uuid4().hex}"
    first = send(world, "reqA", message(sr_id, text(f"chat {secret}"), inline(pdf_bytes(), PDF)))
    binary_id = upload(world, "prov1", png_bytes(), "image/png")
    second = send(world, "prov1", message(sr_id, text(secret), linked(binary_id, "image/png")))
    chat = {f"Communication/{first['id']}", f"Communication/{second['id']}", f"Binary/{binary_id}"}
    responses: list[Any] = []

    def get(who: str, path: str, **kw: Any) -> Any:
        headers = world.as_("admin") if who == "admin" else {}  # else: the system client
        response = world.client.get(f"/fhir/{path}", headers=headers, **kw)
        if secret not in str(kw):  # a search for the text echoes it in its self link
            responses.append(response)
        return response

    searches = [
        ("Communication", {"based-on": f"ServiceRequest/{sr_id}"}),
        ("Communication", {"_id": f"{first['id']},{second['id']}"}),
        ("Communication", {"_content": secret}),
        ("Binary", {"_id": binary_id}),
        ("ServiceRequest", {"_id": sr_id, "_revinclude": "Communication:based-on"}),
        ("ServiceRequest", {"_id": sr_id, "_revinclude": "*"}),
        ("Patient", {"_id": world.patient, "_revinclude": "*", "_revinclude:iterate": "*"}),
        ("Communication/_history", {"_since": start}),
        ("Binary/_history", {"_since": start}),
        ("_history", {"_since": start, "_count": "1000"}),
        (f"Patient/{world.patient}/$everything", {}),
    ]
    for who in ("admin", "system"):
        for ref in chat:
            for path in (ref, f"{ref}/_history/1", f"{ref}/_history"):
                assert get(who, path).status_code == 404, (who, path)
        for path, params in searches:
            response = get(who, path, params=params)
            assert response.status_code == 200, (who, path, response.text)
            assert not ids_in(response.json()) & chat, (who, path)
        for kind in ("batch", "transaction"):
            bundle = {
                "resourceType": "Bundle",
                "type": kind,
                "entry": [{"request": {"method": "GET", "url": ref}} for ref in sorted(chat)],
            }
            headers = world.as_("admin") if who == "admin" else {}
            posted = world.client.post("/fhir", json=bundle, headers=headers)
            responses.append(posted)
            if kind == "batch":
                statuses = [e["response"]["status"] for e in posted.json()["entry"]]
                assert all(s.startswith("404") for s in statuses), statuses
            else:
                assert posted.status_code == 404

    # nor may an admin write in a chat, mark it read, or get a badge
    refused(world.post("admin", "Communication", message(sr_id)), 403, "MSO-CHAT-403")
    refused(world.client.post("/fhir/Communication", json=message(sr_id)), 403, "MSO-CHAT-403")
    refused(mark_read(world, "admin", sr_id), 403, "MSO-CHAT-403")
    assert unread(world, "admin") == (0, {})
    # the audit trail names requests, never chat content
    app.state.audit.flush()
    trail = world.get("admin", "AuditEvent", params={"date": f"ge{start}", "_count": "1000"})
    assert trail.status_code == 200
    responses.append(trail)
    for response in responses:
        assert secret not in response.text


def test_only_the_parties_and_a_provider_who_rejects_loses_the_thread(world: World) -> None:
    sr_id, task_id = case(world, accept=False)  # Assigned: chat is open to clarify the case
    asked = send(world, "prov1", message(sr_id, text("Is there an MRI?")))
    answered = send(world, "reqA", message(sr_id, text("Yes, attached soon")))
    ref = f"Communication/{asked['id']}"
    for outsider in ("prov2", "patient"):  # another provider; the patient did not request it
        assert world.get(outsider, ref).status_code == 404
        assert thread(world, outsider, sr_id) == []
        refused(world.post(outsider, "Communication", message(sr_id)), 403, "MSO-CHAT-403")
        assert unread(world, outsider)[1].get(sr_id) is None

    rejected = world.op("prov1", task_id, "reject", reason="Outside my field")
    assert rejected.status_code == 200, rejected.text
    assert world.get("prov1", ref).status_code == 404
    assert world.get("prov1", f"{ref}/_history").status_code == 404
    assert thread(world, "prov1", sr_id) == []
    refused(world.post("prov1", "Communication", message(sr_id)), 403, "MSO-CHAT-403")
    assert unread(world, "prov1")[1].get(sr_id) is None
    refused(mark_read(world, "prov1", sr_id), 404, "MSO-CHAT-404")
    # the requester keeps the thread but has nobody to write to until a provider is assigned
    assert thread(world, "reqA", sr_id) == [asked["id"], answered["id"]]
    refused(world.post("reqA", "Communication", message(sr_id)), 409, "MSO-CHAT-409")

    reassigned = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov2}")
    assert reassigned.status_code == 200, reassigned.text
    assert thread(world, "prov2", sr_id) == [asked["id"], answered["id"]]
    again = send(world, "reqA", message(sr_id, text("Over to you")))
    assert again["recipient"] == [{"reference": f"PractitionerRole/{world.prov2}"}]
    assert thread(world, "prov1", sr_id) == []


# -- immutable ----------------------------------------------------------------------------------


def test_messages_and_their_attachments_are_immutable(world: World) -> None:
    sr_id, _ = case(world)
    mine = send(world, "reqA", message(sr_id, text("Original words")))
    binary_id = upload(world, "prov1", pdf_bytes(), PDF)
    theirs = send(world, "prov1", message(sr_id, linked(binary_id, PDF)))
    path = f"Communication/{mine['id']}"
    retracted = {**mine, "status": "entered-in-error"}
    edited = {**mine, "payload": [text("Other words")]}
    for who in ("reqA", "prov1"):
        refused(world.put(who, path, edited), 405, "MSO-CHAT-405")
        refused(world.put(who, path, retracted), 405, "MSO-CHAT-405")
        refused(
            world.patch(
                who, path, [{"op": "replace", "path": "/status", "value": "entered-in-error"}]
            ),
            405,
            "MSO-CHAT-405",
        )
        refused(world.client.delete(f"/fhir/{path}", headers=world.as_(who)), 405, "MSO-CHAT-405")
    fhirpath_patch = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Communication.status"},
                    {"name": "value", "valueCode": "entered-in-error"},
                ],
            }
        ],
    }
    response = world.client.patch(
        f"/fhir/{path}",
        json=fhirpath_patch,
        headers={**world.as_("reqA"), "content-type": FHIR_JSON},
    )
    refused(response, 405, "MSO-CHAT-405")
    # conditional update, patch and delete
    conditional = f"Communication?_id={mine['id']}"
    refused(world.put("reqA", conditional, retracted), 405, "MSO-CHAT-405")
    refused(
        world.patch(
            "reqA", conditional, [{"op": "replace", "path": "/status", "value": "stopped"}]
        ),
        405,
        "MSO-CHAT-405",
    )
    refused(
        world.client.delete(f"/fhir/{conditional}", headers=world.as_("reqA")), 405, "MSO-CHAT-405"
    )
    # a transaction holding one such entry fails as a whole; a batch refuses that entry
    marker = f"urn:mso:test|{uuid.uuid4().hex}"
    system, value = marker.split("|")
    patient_entry = {
        "resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": value}]},
        "request": {"method": "POST", "url": "Patient"},
    }
    for entry in (
        {"resource": retracted, "request": {"method": "PUT", "url": path}},
        {"request": {"method": "DELETE", "url": path}},
    ):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [patient_entry, entry]}
        refused(world.post("reqA", "", bundle), 405, "MSO-CHAT-405")
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
        outcome = world.post("reqA", "", batch).json()["entry"][0]["response"]
        assert outcome["status"].startswith("405")
    created = world.get("reqA", "Patient", params={"identifier": marker}).json()
    assert not created.get("entry")
    # the attachment's Binary is as immutable as its message
    for who in ("prov1", "reqA"):
        replaced = world.client.put(
            f"/fhir/Binary/{binary_id}",
            content=pdf_bytes(),
            headers={**world.as_(who), "content-type": PDF},
        )
        refused(replaced, 405, "MSO-CHAT-405")
        refused(
            world.client.delete(f"/fhir/Binary/{binary_id}", headers=world.as_(who)),
            405,
            "MSO-CHAT-405",
        )
    # one version each, unchanged
    for message_id in (mine["id"], theirs["id"]):
        history = world.get("reqA", f"Communication/{message_id}/_history").json()
        assert len(history["entry"]) == 1
        current = world.get("prov1", f"Communication/{message_id}").json()
        assert current["meta"]["versionId"] == "1" and current["status"] == "completed"
    assert world.get("reqA", path).json()["payload"] == [text("Original words")]


# -- read state ---------------------------------------------------------------------------------


def test_unread_counts_and_mark_read(world: World) -> None:
    case_a, _ = case(world)
    case_b, _ = case(world)
    a1 = send(world, "reqA", message(case_a, text("a1")))
    a2 = send(world, "reqA", message(case_a, text("a2")))
    for n in range(3):
        send(world, "prov1", message(case_a, text(f"p{n}")))
    send(world, "reqA", message(case_b, text("b1")))
    # what the other party sent, across cases; one's own messages never count
    assert unread(world, "prov1") == (3, {case_a: 2, case_b: 1})
    assert unread(world, "reqA") == (3, {case_a: 3})

    assert (
        left_after_mark(
            world,
            "prov1",
            case_a,
            message={"valueReference": {"reference": f"Communication/{a1['id']}"}},
        )
        == 1
    )
    assert unread(world, "prov1") == (2, {case_a: 1, case_b: 1})
    assert left_after_mark(world, "prov1", case_a, until={"valueInstant": a2["sent"]}) == 0
    # a position only moves forward
    assert (
        left_after_mark(
            world,
            "prov1",
            case_a,
            message={"valueReference": {"reference": f"Communication/{a1['id']}"}},
        )
        == 0
    )
    assert unread(world, "prov1") == (1, {case_b: 1})
    # without until or message: all of the case
    assert left_after_mark(world, "reqA", case_a) == 0
    assert left_after_mark(world, "prov1", case_b) == 0
    assert unread(world, "reqA") == (0, {}) and unread(world, "prov1") == (0, {})
    # an instant in the future reads what exists now, not what is sent later
    assert (
        left_after_mark(world, "reqA", case_a, until={"valueInstant": "2999-01-01T00:00:00Z"}) == 0
    )
    later = send(world, "prov1", message(case_a, text("later")))
    assert unread(world, "reqA") == (1, {case_a: 1})
    assert (
        left_after_mark(
            world,
            "reqA",
            case_a,
            message={"valueReference": {"reference": f"Communication/{later['id']}"}},
        )
        == 0
    )
    # read state is per user: another user of the requesting organization has read nothing
    from tests.auth_helpers import token_for

    colleague = token_for(
        world.app,
        role="requester",
        organization=world.org,
        practitioner_role=world.req_role,
        fhir_user=f"PractitionerRole/{world.req_role}",
        username=f"colleague-{world.u}",
    )
    world.headers["colleague"] = {"Authorization": f"Bearer {colleague}"}
    assert unread(world, "colleague") == (4, {case_a: 4})


# -- bad input ----------------------------------------------------------------------------------


def test_mark_read_refuses_bad_parameters(world: World) -> None:
    case_a, _ = case(world)
    case_b, _ = case(world)
    in_b = send(world, "prov1", message(case_b, text("b")))
    ref_b = {"valueReference": {"reference": f"Communication/{in_b['id']}"}}
    bad_bodies: list[Any] = [
        {"resourceType": "Patient"},
        {"resourceType": "Parameters"},
        {"resourceType": "Parameters", "parameter": [{"name": "case", "valueString": case_a}]},
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "case", "valueReference": {"reference": f"Patient/{case_a}"}}],
        },
    ]
    for body in bad_bodies:
        refused(world.post("reqA", "Communication/$mark-read", body), 400, "MSO-CHAT-400")
    for extra in (
        {"until": {"valueInstant": "2026-01-01T00:00:00Z"}, "message": ref_b},
        {"until": {"valueInstant": "yesterday"}},
        {"until": {"valueDate": "2026-01-01"}},
        {"message": {"valueString": in_b["id"]}},
        {"whatever": {"valueString": "x"}},
    ):
        refused(mark_read(world, "reqA", case_a, **extra), 400, "MSO-CHAT-400")
    refused(world.get("reqA", "Communication/$mark-read"), 405, "MSO-OP-405")
    refused(mark_read(world, "reqA", f"nope-{world.u}"), 404, "MSO-CHAT-404")
    refused(mark_read(world, "reqA", case_a, message=ref_b), 422, "MSO-CHAT-422")
    unknown = {"valueReference": {"reference": f"Communication/nope-{world.u}"}}
    refused(mark_read(world, "reqA", case_a, message=unknown), 422, "MSO-CHAT-422")
    # a ServiceRequest that is no case (no workflow Task)
    plain = world.client.post(
        "/fhir/ServiceRequest",
        json={
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{world.patient}"},
        },
        headers=world.as_("reqA"),
    )
    assert plain.status_code == 201, plain.text
    refused(mark_read(world, "reqA", plain.json()["id"]), 422, "MSO-CHAT-422")
    refused(world.post("reqA", "Communication", message(plain.json()["id"])), 422, "MSO-CHAT-422")


def test_bad_messages_are_refused_and_leave_nothing(world: World, monkeypatch: Any) -> None:
    sr_id, _ = case(world)
    secret = f"words-{uuid.uuid4().hex}"
    bad: list[tuple[dict[str, Any], int, str]] = [
        # the attachment, checked by content and size exactly as a case document
        (message(sr_id, text(secret), inline(exe_bytes(), PDF)), 422, "MSO-DOC-421"),
        (message(sr_id, inline(pdf_bytes(), "image/png")), 422, "MSO-DOC-421"),
        (message(sr_id, inline(b"plain words", "text/plain")), 422, "MSO-DOC-421"),
        (
            message(sr_id, inline(pdf_bytes(), PDF, size=MAX_DOCUMENT_BYTES + 1)),
            422,
            "MSO-DOC-422",
        ),
        (message(sr_id, linked(f"nope-{world.u}", PDF)), 422, "MSO-DOC-424"),
        # what the server sets or checks
        ({k: v for k, v in message(sr_id).items() if k != "payload"}, 422, "MSO-CHAT-422"),
        (message(sr_id, text("  ")), 422, "MSO-CHAT-422"),
        (message(sr_id, {"contentReference": {"reference": "Patient/x"}}), 422, "MSO-CHAT-422"),
        (message(sr_id, status="entered-in-error"), 422, "MSO-CHAT-422"),
        (
            message(sr_id, sender={"reference": f"PractitionerRole/{world.prov1}"}),
            422,
            "MSO-CHAT-422",
        ),
        (
            message(sr_id, recipient=[{"reference": f"PractitionerRole/{world.prov2}"}]),
            422,
            "MSO-CHAT-422",
        ),
        (message(sr_id, subject={"reference": "Patient/someone-else"}), 422, "MSO-CHAT-422"),
        (
            message(
                sr_id,
                category=[
                    {"coding": [{"system": COMMUNICATION_CATEGORY_SYSTEM, "code": "notification"}]}
                ],
            ),
            422,
            "MSO-CHAT-422",
        ),
        (
            message(sr_id, basedOn=[{"reference": f"ServiceRequest/{sr_id}"}] * 2),
            422,
            "MSO-CHAT-422",
        ),
    ]
    for body, status, code in bad:
        response = world.post("reqA", "Communication", body)
        refused(response, status, code)
        assert secret not in response.text
    # a Binary the sender cannot read is no attachment of its (another organization's upload)
    stranger = upload(world, "prov2", pdf_bytes(), PDF)
    refused(
        world.post("reqA", "Communication", message(sr_id, linked(stranger, PDF))),
        422,
        "MSO-DOC-424",
    )
    # the actual size counts too, whatever the declared one says
    monkeypatch.setattr(documents, "MAX_DOCUMENT_BYTES", 100)
    refused(
        world.post("reqA", "Communication", message(sr_id, inline(pdf_bytes(), PDF))),
        422,
        "MSO-DOC-422",
    )
    monkeypatch.undo()
    # in a transaction the bad attachment fails the whole Bundle
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": message(sr_id, text("fine")),
                "request": {"method": "POST", "url": "Communication"},
            },
            {
                "resource": message(sr_id, inline(exe_bytes(), PDF)),
                "request": {"method": "POST", "url": "Communication"},
            },
        ],
    }
    refused(world.post("reqA", "", bundle), 422, "MSO-DOC-421")
    assert thread(world, "reqA", sr_id) == []
    # a message and its Binary in one transaction, the Binary after it: checked at the end
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    bundle["entry"] = [
        {
            "resource": message(
                sr_id, {"contentAttachment": {"contentType": PDF, "url": binary_url}}
            ),
            "request": {"method": "POST", "url": "Communication"},
        },
        {
            "fullUrl": binary_url,
            "resource": {"resourceType": "Binary", "contentType": PDF, "data": b64(pdf_bytes())},
            "request": {"method": "POST", "url": "Binary"},
        },
    ]
    response = world.post("reqA", "", bundle)
    assert response.status_code == 200, response.text
    assert len(thread(world, "prov1", sr_id)) == 1


def test_a_case_without_a_provider_has_no_chat_yet(world: World) -> None:
    sr_id, _ = world.submit()
    refused(world.post("reqA", "Communication", message(sr_id)), 409, "MSO-CHAT-409")
    refused(world.post("prov1", "Communication", message(sr_id)), 403, "MSO-CHAT-403")


# -- notifications ------------------------------------------------------------------------------

CLINICAL_TEXT = "suspected melanoma on the left forearm, biopsy pending"


def username_of(world: World, who: str) -> str:
    token = world.as_(who)["Authorization"].split()[1]
    return world.app.state.tokens.verify(token).principal.subject


def offline_with_email(world: World, *who: str) -> dict[str, str]:
    """Give ``who`` an e-mail address and nobody a recent request (offline: e-mail due)."""
    names = {w: username_of(world, w) for w in who}
    with world.app.state.repo.engine.begin() as conn:
        for name in names.values():
            conn.execute(
                update(auth_user).where(auth_user.c.username == name).values(email=f"{name}@x.test")
            )
    nobody_online(world)
    return names


def nobody_online(world: World) -> None:
    """No user made a request lately: every recipient is offline (e-mail due)."""
    flush_presence()  # a request's presence write still queued would land after the delete
    with world.app.state.repo.engine.begin() as conn:
        conn.execute(delete(user_presence))
    forget_touches()


def mails_of(world: World, sr_id: str) -> list[Any]:
    with world.app.state.repo.engine.connect() as conn:
        rows = conn.execute(
            select(mail_outbox)
            .where(mail_outbox.c.case_id == sr_id, mail_outbox.c.event == "chat-message")
            .order_by(mail_outbox.c.id)
        ).all()
    return list(rows)


def chat_notices(world: World, who: str, sr_id: str) -> list[dict[str, Any]]:
    found = world.get(
        who,
        "Communication",
        params={
            "category": f"{COMMUNICATION_CATEGORY_SYSTEM}|notification",
            "about": f"ServiceRequest/{sr_id}",
            "_count": "100",
        },
    )
    assert found.status_code == 200, found.text
    notices = [e["resource"] for e in found.json().get("entry", ())]
    return [n for n in notices if n.get("topic", {}).get("text") == "chat-message"]


def test_a_message_notifies_the_other_party_in_app_and_by_one_email_a_burst(
    world: World, monkeypatch: Any
) -> None:
    sr_id, _ = case(world)
    number = case_number(world, sr_id)
    names = offline_with_email(world, "reqA", "prov1")
    sent = [
        send(world, "prov1", message(sr_id, text(b)))
        for b in ("alpha note", "bravo note", CLINICAL_TEXT)
    ]
    display = sent[0]["sender"]["display"]

    mails = mails_of(world, sr_id)  # read from the database: the requester stays offline
    assert [m.username for m in mails] == [names["reqA"]]  # one burst, one e-mail
    mail = mails[0]
    assert mail.to_addr == f"{names['reqA']}@x.test"
    assert number in mail.subject and "New message" in mail.subject
    assert f"New message from {display} on case {number}" in mail.body
    assert f"/viewer/cases/{sr_id}" in mail.body or "Sign in to MSO" in mail.body
    for body in ("alpha note", "bravo note", CLINICAL_TEXT):
        assert body not in mail.body and body not in mail.subject  # no message text

    # in-app: one notification a message, for the requester side only, never the text
    notices = chat_notices(world, "reqA", sr_id)
    assert len(notices) == 3
    for notice in notices:
        assert notice["recipient"] == [{"reference": f"PractitionerRole/{world.req_role}"}]
        words = notice["payload"][0]["contentString"]
        assert words == f"New message from {display} on case {number}."
    assert chat_notices(world, "prov1", sr_id) == []  # the sender is not told of its own

    # the requester's answer is a burst of its own for the provider (who went offline)
    nobody_online(world)
    send(world, "reqA", message(sr_id, text("thanks")))
    assert [m.username for m in mails_of(world, sr_id)] == [names["reqA"], names["prov1"]]

    # after a quiet period, the provider's next message starts a new burst
    monkeypatch.setattr(world.app.state.settings, "chat_email_quiet_seconds", 0.0)
    nobody_online(world)
    send(world, "prov1", message(sr_id, text("one more")))
    assert [m.username for m in mails_of(world, sr_id)] == [
        names["reqA"],
        names["prov1"],
        names["reqA"],
    ]


def test_an_online_recipient_gets_no_email_and_a_snippet_is_only_quoted_when_asked(
    world: World, monkeypatch: Any
) -> None:
    sr_id, _ = case(world)
    names = offline_with_email(world, "reqA", "prov1")
    touch_presence(world.app.state.repo.engine, names["reqA"], wait=True)  # online
    send(world, "prov1", message(sr_id, text(CLINICAL_TEXT)))
    assert mails_of(world, sr_id) == []
    assert len(chat_notices(world, "reqA", sr_id)) == 1  # in-app all the same

    monkeypatch.setattr(world.app.state.settings, "chat_email_snippet_chars", 10)
    nobody_online(world)
    send(world, "reqA", message(sr_id, text(CLINICAL_TEXT)))  # the provider is offline
    (mail,) = mails_of(world, sr_id)
    assert mail.username == names["prov1"]
    assert f'"{CLINICAL_TEXT[:10]}…"' in mail.body
    assert CLINICAL_TEXT[10:] not in mail.body


def test_a_recipient_with_an_open_websocket_is_online_and_gets_no_email(
    world: World, monkeypatch: Any
) -> None:
    monkeypatch.setattr(world.app.state.settings, "chat_email_quiet_seconds", 0)  # no bursts
    sr_id, _ = case(world)
    names = offline_with_email(world, "reqA", "prov1")
    socket = world.client.websocket_connect("/fhir/websocket", headers=world.as_("reqA"))
    with socket as ws:
        ws.send_text("nothing")  # answered (an error frame): the connection is up
        assert ws.receive_json()["resourceType"] == "OperationOutcome"
        flush_presence()
        send(world, "prov1", message(sr_id, text("hello")))
        assert mails_of(world, sr_id) == []
    nobody_online(world)  # the socket closed: offline again
    send(world, "prov1", message(sr_id, text("still there?")))
    assert [m.username for m in mails_of(world, sr_id)] == [names["reqA"]]


def test_admins_are_never_told_of_chat_messages(world: World) -> None:
    sr_id, _ = case(world)
    offline_with_email(world, "reqA", "prov1", "admin")
    send(world, "reqA", message(sr_id, text(CLINICAL_TEXT)))
    admin = username_of(world, "admin")
    assert [m.username for m in mails_of(world, sr_id)] == [username_of(world, "prov1")]
    assert admin not in {m.username for m in mails_of(world, sr_id)}
    found = world.get(
        "admin",
        "Communication",
        params={"about": f"ServiceRequest/{sr_id}", "_count": "100"},
    )
    assert found.status_code == 200
    for entry in found.json().get("entry", ()):
        recipients = entry["resource"].get("recipient") or []
        assert all(r.get("reference") != f"user:{admin}" for r in recipients)
        assert CLINICAL_TEXT not in str(entry["resource"])
