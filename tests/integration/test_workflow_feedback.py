"""The requester's feedback on a completed case over HTTP with real tokens (issue 5, step 7),
on SQLite and PostgreSQL: a QuestionnaireResponse to the MSO feedback Questionnaire, once the
case is Done, once per case, by the requester only, answers checked against the
Questionnaire; the FEEDBACK event; feedback is final."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server.codes import FEEDBACK_QUESTIONNAIRE, FeedbackItem
from fhir_server.workflow.events import CaseEvent, CaseEventKind
from tests.integration.workflow_world import World, build_world


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


@pytest.fixture
def feedback_events(app: Any) -> Any:
    """FEEDBACK events emitted while the test runs (subscribed to the app's bus, then removed)."""
    seen: list[CaseEvent] = []
    bus = app.state.services.events
    entry = (CaseEventKind.FEEDBACK, lambda _tx, event: seen.append(event))
    bus._subscribers.append(entry)
    yield seen
    bus._subscribers.remove(entry)


def error_code(response: Any) -> str:
    return response.json()["issue"][0]["details"]["coding"][0]["code"]


def case_in(world: World, status: str) -> str:
    """A case of requester A brought to ``status`` (accepted, in-progress or done); its id."""
    sr_id, task_id = world.submit()
    steps = [("admin", "assign"), ("prov1", "accept"), ("prov1", "start"), ("prov1", "complete")]
    stop = {"new": 0, "accepted": 2, "in-progress": 3, "done": 4}[status]
    for who, name in steps[:stop]:
        if name == "assign":
            response = world.op(who, task_id, name, provider=f"PractitionerRole/{world.prov1}")
        else:
            if name == "complete":
                world.report(sr_id)
            response = world.op(who, task_id, name)
        assert response.status_code == 200, response.text
    return sr_id


def feedback(sr_id: str, *items: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A feedback QuestionnaireResponse for the case with ``items`` (default: 5, a comment)."""
    if not items:
        items = (
            {"linkId": FeedbackItem.RATING, "answer": [{"valueInteger": 5}]},
            {"linkId": FeedbackItem.COMMENTS, "answer": [{"valueString": "Clear and quick."}]},
        )
    return {
        "resourceType": "QuestionnaireResponse",
        "status": status,
        "questionnaire": FEEDBACK_QUESTIONNAIRE,
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "item": list(items),
    }


def rating(value: Any, key: str = "valueInteger") -> dict[str, Any]:
    return {"linkId": FeedbackItem.RATING, "answer": [{key: value}]}


def stored_feedback(world: World, sr_id: str) -> list[dict[str, Any]]:
    found = world.get(
        "admin", "QuestionnaireResponse", params={"based-on": f"ServiceRequest/{sr_id}"}
    )
    return [
        e["resource"]
        for e in found.json().get("entry", [])
        if e["resource"].get("questionnaire") == FEEDBACK_QUESTIONNAIRE
    ]


def test_requester_gives_feedback_once_the_case_is_done(world: World, feedback_events) -> None:
    sr_id = case_in(world, "done")
    response = world.post("reqA", "QuestionnaireResponse", feedback(sr_id))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["subject"] == {"reference": f"ServiceRequest/{sr_id}"}
    assert body["author"] == {"reference": f"PractitionerRole/{world.req_role}"}
    assert body["authored"]
    # the case's provider reads it (it belongs to the case); the second provider does not
    assert world.get("prov1", f"QuestionnaireResponse/{body['id']}").status_code == 200
    assert world.get("prov2", f"QuestionnaireResponse/{body['id']}").status_code == 404
    [event] = [e for e in feedback_events if e.case_id == sr_id]
    assert event.subject == f"QuestionnaireResponse/{body['id']}"
    assert event.detail == {"rating": 5}
    assert event.provider == f"PractitionerRole/{world.prov1}"
    # comments are optional; the questionnaire may be named with its version
    other = case_in(world, "done")
    only_rating = feedback(other, rating(1))
    only_rating["questionnaire"] = f"{FEEDBACK_QUESTIONNAIRE}|0.1.0"
    response = world.post("reqA", "QuestionnaireResponse", only_rating)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("status", ["new", "accepted", "in-progress"])
def test_no_feedback_before_done(world: World, status: str) -> None:
    sr_id = case_in(world, status)
    response = world.post("reqA", "QuestionnaireResponse", feedback(sr_id))
    assert response.status_code == 409, response.text
    assert error_code(response) == "MSO-FEEDBACK-409"
    assert stored_feedback(world, sr_id) == []


def test_one_feedback_per_case(world: World) -> None:
    sr_id = case_in(world, "done")
    assert world.post("reqA", "QuestionnaireResponse", feedback(sr_id)).status_code == 201
    response = world.post("reqA", "QuestionnaireResponse", feedback(sr_id, rating(2)))
    assert response.status_code == 409 and error_code(response) == "MSO-FEEDBACK-410"
    assert len(stored_feedback(world, sr_id)) == 1


def test_concurrent_feedback_only_one_is_stored(world: World) -> None:
    sr_id = case_in(world, "done")
    barrier = threading.Barrier(2)
    results: list[int] = [0, 0]

    def send(index: int) -> None:
        http = TestClient(world.app, base_url="http://testserver")
        barrier.wait()
        response = http.post(
            "/fhir/QuestionnaireResponse", json=feedback(sr_id), headers=world.as_("reqA")
        )
        results[index] = response.status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [201, 409], results
    assert len(stored_feedback(world, sr_id)) == 1


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        ((rating(7),), "not one of the allowed answers"),
        ((rating(0),), "not one of the allowed answers"),
        ((rating("5", "valueString"),), "takes valueInteger"),
        ((rating(4.5, "valueDecimal"),), "takes valueInteger"),
        (
            ({"linkId": FeedbackItem.COMMENTS, "answer": [{"valueString": "No rating"}]},),
            "item 'rating' is required",
        ),
        (({"linkId": FeedbackItem.RATING},), "item 'rating' is required"),
        (
            (
                {
                    "linkId": FeedbackItem.RATING,
                    "answer": [{"valueInteger": 4}, {"valueInteger": 5}],
                },
            ),
            "takes one answer",
        ),
        ((rating(4), {"linkId": "mood", "answer": [{"valueString": "x"}]}), "no item 'mood'"),
        ((rating(4), rating(5)), "appears more than once"),
    ],
)
def test_answers_are_checked_against_the_questionnaire(
    world: World, items: tuple[dict[str, Any], ...], fragment: str
) -> None:
    sr_id = case_in(world, "done")
    response = world.post("reqA", "QuestionnaireResponse", feedback(sr_id, *items))
    assert response.status_code == 422, response.text
    assert error_code(response) == "MSO-FEEDBACK-422"
    assert any(fragment in i["diagnostics"] for i in response.json()["issue"]), response.text
    assert stored_feedback(world, sr_id) == []


def test_feedback_is_completed_and_based_on_a_case(world: World) -> None:
    sr_id = case_in(world, "done")
    response = world.post("reqA", "QuestionnaireResponse", feedback(sr_id, status="in-progress"))
    assert response.status_code == 422 and error_code(response) == "MSO-FEEDBACK-422"
    unbased = feedback(sr_id)
    del unbased["basedOn"]
    response = world.post("reqA", "QuestionnaireResponse", unbased)
    assert response.status_code == 422 and error_code(response) == "MSO-FEEDBACK-422"


def test_only_the_requester_gives_feedback(world: World) -> None:
    sr_id = case_in(world, "done")
    for who in ("prov1", "admin"):
        response = world.post(who, "QuestionnaireResponse", feedback(sr_id))
        assert response.status_code == 403, (who, response.text)
        assert error_code(response) == "MSO-FEEDBACK-403"
    # the second provider does not see the case at all
    assert world.post("prov2", "QuestionnaireResponse", feedback(sr_id)).status_code == 404
    assert stored_feedback(world, sr_id) == []


def test_feedback_is_final(world: World) -> None:
    sr_id = case_in(world, "done")
    created = world.post("reqA", "QuestionnaireResponse", feedback(sr_id)).json()
    path = f"QuestionnaireResponse/{created['id']}"
    response = world.put("reqA", path, {**created, "item": [rating(1)]})
    assert response.status_code == 409 and error_code(response) == "MSO-FEEDBACK-411"
    response = world.client.delete(f"/fhir/{path}", headers=world.as_("reqA"))
    assert response.status_code == 409 and error_code(response) == "MSO-FEEDBACK-411"
    assert world.get("reqA", path).json()["item"] == created["item"]


def test_transaction_bundle_obeys_the_same_rules(world: World) -> None:
    sr_id = case_in(world, "done")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": feedback(sr_id, rating(9)),
                "request": {"method": "POST", "url": "QuestionnaireResponse"},
            }
        ],
    }
    response = world.post("reqA", "", bundle)
    assert response.status_code == 422, response.text
    bundle["entry"][0]["resource"] = feedback(sr_id)
    response = world.post("reqA", "", bundle)
    assert response.status_code == 200, response.text
    assert len(stored_feedback(world, sr_id)) == 1
