"""Case appointments over HTTP with real tokens (issue 5, step 9), on SQLite and PostgreSQL:
proposals and answers from both sides, who sees them, the provider's booked time (409 on
overlap, also for concurrent bookings of one slot), wrong roles (403), invalid times (422/400),
case statuses, plain writes and transaction Bundles held to the same rules."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server.codes import COMMUNICATION_CATEGORY_SYSTEM
from tests.integration.workflow_world import World, build_world, case_number


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


# -- helpers ------------------------------------------------------------------------------------


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def at(days: int, hour: int, minutes: int = 0) -> str:
    """An instant ``days`` from today at ``hour:minutes`` UTC."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    moment = day + timedelta(days=days, hours=hour, minutes=minutes)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def accepted_case(world: World, provider: str = "prov1") -> tuple[str, str]:
    """A case assigned to ``provider`` and accepted by it; (ServiceRequest id, Task id)."""
    sr_id, task_id = world.submit()
    role = world.prov1 if provider == "prov1" else world.prov2
    response = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{role}")
    assert response.status_code == 200, response.text
    response = world.op(provider, task_id, "accept")
    assert response.status_code == 200, response.text
    return sr_id, task_id


def appointment(
    world: World, sr_id: str, start: str, end: str | None, *, provider: str | None = None
) -> dict[str, Any]:
    """A proposed Appointment for the case between requester A and ``provider`` (prov1)."""
    body: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "proposed",
        "description": "Discuss the second opinion",
        "start": start,
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "participant": [
            {"actor": {"reference": f"PractitionerRole/{world.req_role}"}, "status": "accepted"},
            {
                "actor": {"reference": f"PractitionerRole/{provider or world.prov1}"},
                "status": "accepted",
            },
        ],
    }
    if end is not None:
        body["end"] = end
    return body


def propose(world: World, who: str, sr_id: str, start: str, end: str) -> Any:
    return world.post(who, "Appointment", appointment(world, sr_id, start, end))


def answer(world: World, who: str, appointment_id: str, status: str, **extra: Any) -> Any:
    body = {
        "resourceType": "AppointmentResponse",
        "appointment": {"reference": f"Appointment/{appointment_id}"},
        "participantStatus": status,
        **extra,
    }
    return world.post(who, "AppointmentResponse", body)


def part_status(body: dict[str, Any]) -> dict[str, str]:
    return {p["actor"]["reference"]: p["status"] for p in body["participant"]}


def booked(world: World, appointment_id: str) -> str:
    return world.get("admin", f"Appointment/{appointment_id}").json()["status"]


def notifications(world: World, who: str) -> list[str]:
    """The notification texts ``who`` sees (their own)."""
    params = {"category": f"{COMMUNICATION_CATEGORY_SYSTEM}|notification", "_count": "200"}
    found = world.get(who, "Communication", params=params).json()
    return [str(e["resource"]) for e in found.get("entry", [])]


# -- proposing and answering --------------------------------------------------------------------


def test_requester_proposes_provider_accepts(world: World) -> None:
    sr_id, _ = accepted_case(world)
    response = propose(world, "reqA", sr_id, at(3, 9), at(3, 10))
    assert response.status_code == 201, response.text
    proposed = response.json()
    assert proposed["status"] == "proposed"
    assert part_status(proposed) == {
        f"PractitionerRole/{world.req_role}": "accepted",
        f"PractitionerRole/{world.prov1}": "needs-action",
    }
    appointment_id = proposed["id"]
    # both parties see it, the second provider does not (not even by search)
    assert world.get("prov1", f"Appointment/{appointment_id}").status_code == 200
    assert world.get("reqA", f"Appointment/{appointment_id}").status_code == 200
    assert world.get("prov2", f"Appointment/{appointment_id}").status_code == 404
    by_case = {"based-on": f"ServiceRequest/{sr_id}"}
    assert len(world.get("prov1", "Appointment", params=by_case).json()["entry"]) == 1
    assert world.get("prov2", "Appointment", params=by_case).json().get("entry", []) == []
    # the provider was told
    number = case_number(world, sr_id)
    assert any(
        f"An appointment was proposed for case {number}." in n
        for n in notifications(world, "prov1")
    )

    response = answer(world, "prov1", appointment_id, "accepted")
    assert response.status_code == 201, response.text
    assert response.json()["actor"] == {"reference": f"PractitionerRole/{world.prov1}"}
    # the answer belongs to the case: the requester reads it, the second provider does not
    response_id = response.json()["id"]
    assert world.get("reqA", f"AppointmentResponse/{response_id}").status_code == 200
    assert world.get("prov2", f"AppointmentResponse/{response_id}").status_code == 404
    answers = world.get("reqA", "AppointmentResponse", params={"case": f"ServiceRequest/{sr_id}"})
    assert [e["resource"]["id"] for e in answers.json()["entry"]] == [response_id]
    result = world.get("reqA", f"Appointment/{appointment_id}").json()
    assert result["status"] == "booked"
    assert set(part_status(result).values()) == {"accepted"}
    assert any(
        f"The appointment proposal for case {number} was answered." in n
        for n in notifications(world, "reqA")
    )
    # the update is server work, visible in the history
    history = world.get("prov1", f"Appointment/{appointment_id}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["booked", "proposed"]
    # a booked appointment takes no second acceptance
    response = answer(world, "reqA", appointment_id, "accepted")
    assert response.status_code == 409 and error_code(response) == "MSO-APPT-409"


def test_provider_proposes_requester_declines(world: World) -> None:
    sr_id, task_id = accepted_case(world)
    assert world.op("prov1", task_id, "start").status_code == 200  # in progress
    response = propose(world, "prov1", sr_id, at(4, 14), at(4, 15))
    assert response.status_code == 201, response.text
    proposed = response.json()
    assert part_status(proposed) == {
        f"PractitionerRole/{world.req_role}": "needs-action",
        f"PractitionerRole/{world.prov1}": "accepted",
    }
    response = answer(world, "reqA", proposed["id"], "declined")
    assert response.status_code == 201, response.text
    result = world.get("prov1", f"Appointment/{proposed['id']}").json()
    assert result["status"] == "cancelled"
    assert part_status(result)[f"PractitionerRole/{world.req_role}"] == "declined"
    # nothing more to answer
    response = answer(world, "prov1", proposed["id"], "accepted")
    assert response.status_code == 409, response.text


def test_requester_accepts_provider_proposal_and_either_cancels_later(world: World) -> None:
    sr_id, _ = accepted_case(world)
    proposed = propose(world, "prov1", sr_id, at(5, 8), at(5, 9)).json()
    assert answer(world, "reqA", proposed["id"], "accepted").status_code == 201
    assert booked(world, proposed["id"]) == "booked"
    # a party declining a booked appointment cancels it, freeing the slot
    assert answer(world, "prov1", proposed["id"], "declined").status_code == 201
    assert booked(world, proposed["id"]) == "cancelled"
    again = propose(world, "reqA", sr_id, at(5, 8), at(5, 9))
    assert again.status_code == 201, again.text


# -- conflicts ---------------------------------------------------------------------------------


def test_overlap_with_a_booked_appointment_of_the_provider_is_refused(world: World) -> None:
    sr_id, _ = accepted_case(world)
    first = propose(world, "reqA", sr_id, at(6, 10), at(6, 11)).json()
    assert answer(world, "prov1", first["id"], "accepted").status_code == 201
    # another case of the same provider, overlapping: refused at propose time
    other_sr, _ = accepted_case(world)
    response = propose(world, "reqA", other_sr, at(6, 10, 30), at(6, 11, 30))
    assert response.status_code == 409, response.text
    assert error_code(response) == "MSO-APPT-410"
    # the other appointment is named by id; its time (another case's content) is not given
    assert f"Appointment/{first['id']}" in response.text and at(6, 10) not in response.text
    # touching end to start is no overlap; the second provider's calendar is its own
    assert propose(world, "reqA", other_sr, at(6, 11), at(6, 12)).status_code == 201
    sr_prov2, _ = accepted_case(world, "prov2")
    body = appointment(world, sr_prov2, at(6, 10), at(6, 11), provider=world.prov2)
    assert world.post("reqA", "Appointment", body).status_code == 201


def test_pending_proposals_compete_and_the_second_acceptance_is_refused(world: World) -> None:
    sr_id, _ = accepted_case(world)
    one = propose(world, "reqA", sr_id, at(7, 9), at(7, 10)).json()
    two = propose(world, "reqA", sr_id, at(7, 9, 30), at(7, 10, 30)).json()  # both pending
    assert answer(world, "prov1", one["id"], "accepted").status_code == 201
    response = answer(world, "prov1", two["id"], "accepted")
    assert response.status_code == 409 and error_code(response) == "MSO-APPT-410"
    assert f"Appointment/{one['id']}" in response.text and at(7, 9) not in response.text
    # refused atomically: no answer stored, the proposal unchanged
    assert booked(world, two["id"]) == "proposed"
    responses = world.get("admin", "AppointmentResponse", params={"appointment": two["id"]})
    assert responses.json().get("entry", []) == []


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_bookings_of_one_slot_exactly_one_wins(world: World, attempt: int) -> None:
    ids = []
    for _ in range(3):
        sr_id, _ = accepted_case(world)
        created = propose(world, "reqA", sr_id, at(8 + attempt, 13), at(8 + attempt, 14))
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    barrier = threading.Barrier(len(ids))
    results: list[int] = [0] * len(ids)

    def accept(index: int, appointment_id: str) -> None:
        http = TestClient(world.app, base_url="http://testserver")
        body = {
            "resourceType": "AppointmentResponse",
            "appointment": {"reference": f"Appointment/{appointment_id}"},
            "participantStatus": "accepted",
        }
        barrier.wait()
        response = http.post("/fhir/AppointmentResponse", json=body, headers=world.as_("prov1"))
        results[index] = response.status_code

    threads = [threading.Thread(target=accept, args=pair) for pair in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [201, 409, 409], results
    assert sorted(booked(world, i) for i in ids) == ["booked", "proposed", "proposed"]


# -- who may, when ----------------------------------------------------------------------------


def test_only_case_parties_propose_and_answer(world: World) -> None:
    sr_id, _ = accepted_case(world)
    for who in ("prov2", "admin", "patient"):
        response = propose(world, who, sr_id, at(9, 9), at(9, 10))
        assert response.status_code == 403, (who, response.text)
        assert error_code(response) == "MSO-APPT-403"
    proposed = propose(world, "reqA", sr_id, at(9, 9), at(9, 10)).json()
    response = answer(world, "admin", proposed["id"], "accepted")
    assert response.status_code == 403 and error_code(response) == "MSO-APPT-403"
    # the second provider does not even see it
    assert answer(world, "prov2", proposed["id"], "accepted").status_code == 404
    # nobody answers for the other party
    response = answer(
        world,
        "reqA",
        proposed["id"],
        "accepted",
        actor={"reference": f"PractitionerRole/{world.prov1}"},
    )
    assert response.status_code == 403, response.text
    assert booked(world, proposed["id"]) == "proposed"
    # tentative is no answer here
    response = answer(world, "prov1", proposed["id"], "tentative")
    assert response.status_code == 422 and error_code(response) == "MSO-APPT-422"


def test_no_appointments_before_the_provider_accepted(world: World) -> None:
    sr_id, task_id = world.submit()
    response = propose(world, "reqA", sr_id, at(10, 9), at(10, 10))
    assert response.status_code == 409 and error_code(response) == "MSO-APPT-409"
    assert world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    response = propose(world, "prov1", sr_id, at(10, 9), at(10, 10))
    assert response.status_code == 409 and error_code(response) == "MSO-APPT-409"
    assert "assigned" in response.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("start", "end", "status", "expression"),
    [
        (at(11, 10), at(11, 9), 422, "Appointment.end"),  # ends before it starts
        (at(11, 10), at(11, 10), 422, "Appointment.end"),  # zero length
        (at(-1, 10), at(-1, 11), 422, "Appointment.start"),  # in the past
        (at(11, 10), None, 422, "Appointment.end"),  # no end
        ("2031-02-30T10:00:00Z", at(11, 11), 400, None),  # not an instant
    ],
)
def test_invalid_times(
    world: World, start: str, end: str | None, status: int, expression: str | None
) -> None:
    sr_id, _ = accepted_case(world)
    response = world.post("reqA", "Appointment", appointment(world, sr_id, start, end))
    assert response.status_code == status, response.text
    if expression:
        assert response.json()["issue"][0]["expression"] == [expression]
    found = world.get("admin", "Appointment", params={"based-on": f"ServiceRequest/{sr_id}"})
    assert found.json().get("entry", []) == []


def test_proposal_shape(world: World) -> None:
    sr_id, _ = accepted_case(world)
    body = appointment(world, sr_id, at(12, 9), at(12, 10))
    body["status"] = "booked"  # booking is the other party's answer
    response = world.post("reqA", "Appointment", body)
    assert response.status_code == 422 and error_code(response) == "MSO-APPT-422"
    body = appointment(world, sr_id, at(12, 9), at(12, 10), provider=world.prov2)
    response = world.post("reqA", "Appointment", body)
    assert response.status_code == 422, response.text
    assert response.json()["issue"][0]["expression"] == ["Appointment.participant"]
    # an Appointment for a ServiceRequest that is no case of the requester's is outside its reach
    body = appointment(world, "not-a-case", at(12, 9), at(12, 10))
    response = world.post("reqA", "Appointment", body)
    assert response.status_code == 403 and error_code(response) == "MSO-AUTH-404", response.text


# -- plain writes and transactions --------------------------------------------------------------


def test_plain_writes_cancel_but_do_not_book_or_move(world: World) -> None:
    sr_id, _ = accepted_case(world)
    proposed = propose(world, "reqA", sr_id, at(13, 9), at(13, 10)).json()
    path = f"Appointment/{proposed['id']}"
    response = world.put("reqA", path, {**proposed, "status": "booked"})
    assert response.status_code == 409 and error_code(response) == "MSO-APPT-411"
    moved = {**proposed, "start": at(13, 11), "end": at(13, 12)}
    assert world.put("prov1", path, moved).status_code == 409
    participants = [{**p, "status": "accepted"} for p in proposed["participant"]]
    response = world.put("prov1", path, {**proposed, "participant": participants})
    assert response.status_code == 409, response.text
    assert world.put("prov2", path, proposed).status_code == 403  # cannot see it
    response = world.put("prov1", path, {**proposed, "comment": "Video call link follows"})
    assert response.status_code == 200, response.text
    assert world.client.delete(f"/fhir/{path}", headers=world.as_("reqA")).status_code == 409
    current = world.get("reqA", path).json()
    response = world.put("reqA", path, {**current, "status": "cancelled"})
    assert response.status_code == 200, response.text
    assert booked(world, proposed["id"]) == "cancelled"


def test_transaction_bundle_obeys_the_same_rules(world: World) -> None:
    sr_id, _ = accepted_case(world)
    booked_one = propose(world, "reqA", sr_id, at(14, 9), at(14, 10)).json()
    assert answer(world, "prov1", booked_one["id"], "accepted").status_code == 201
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": appointment(world, sr_id, at(14, 15), at(14, 16)),
                "request": {"method": "POST", "url": "Appointment"},
            },
            {
                "resource": appointment(world, sr_id, at(14, 9, 15), at(14, 9, 45)),
                "request": {"method": "POST", "url": "Appointment"},
            },
        ],
    }
    response = world.post("reqA", "", bundle)
    assert response.status_code == 409, response.text
    found = world.get("admin", "Appointment", params={"based-on": f"ServiceRequest/{sr_id}"})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [booked_one["id"]]
    bundle["entry"] = bundle["entry"][:1]
    response = world.post("prov1", "", bundle)
    assert response.status_code == 200, response.text
    location = response.json()["entry"][0]["response"]["location"]
    created_id = location.split("Appointment/")[1].split("/")[0]
    created = world.get("reqA", f"Appointment/{created_id}").json()
    assert part_status(created)[f"PractitionerRole/{world.prov1}"] == "accepted"
