"""Websocket Subscriptions and the Subscriptions R5 Backport IG (issue 15), on SQLite and
PostgreSQL, in-process: R4 ``bind``/``bound``/``ping``, topic-based Subscriptions with
``bind-with-token`` and notification Bundles, ``$status``, ``$events`` replay of what a
disconnected client missed, error frames that never close the socket, and the access rules on
this path (admins hear nothing of chat, a provider who loses the case hears nothing more)."""

# The fixtures (app, client, world) are those of test_subscriptions, imported by name.
# ruff: noqa: F811

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from fhir_server.messaging.topics import topics
from tests.integration.test_subscriptions import (  # noqa: F401 (fixtures)
    _case,
    app,
    chat_message,
    client,
    deliver,
    deliver_until,
    world,
)
from tests.integration.workflow_world import World

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
CHAT_TOPIC = "https://mso.example.org/fhir/SubscriptionTopic/chat-message"
CASE_TOPIC = "https://mso.example.org/fhir/SubscriptionTopic/case-status"


class Frames:
    """The frames a websocket received, gathered by a thread (the test session only has a
    blocking receive)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                self.queue.put(self.ws.receive_text())
        except Exception:  # closed
            self.queue.put(None)

    def next(self, timeout: float = 10.0) -> str:
        frame = self.queue.get(timeout=timeout)
        assert frame is not None, "the socket was closed"
        return frame

    def next_json(self, timeout: float = 10.0) -> dict[str, Any]:
        return orjson.loads(self.next(timeout))

    def empty(self) -> bool:
        return self.queue.empty()


@contextmanager
def socket(client: TestClient, headers: dict[str, str] | None = None) -> Iterator[Frames]:
    # the test client's own default Authorization header is replaced (empty: none)
    with client.websocket_connect(
        "/fhir/websocket", headers={"Authorization": "", **(headers or {})}
    ) as ws:
        yield Frames(ws)


def r4_subscription(criteria: str) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": criteria,
        "channel": {"type": "websocket"},
    }


def topic_subscription(
    topic: str, filters: list[str], content: str = "id-only", channel: str = "websocket"
) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [f"{BACKPORT}backport-subscription"]},
        "status": "requested",
        "reason": "test",
        "criteria": topic,
        "_criteria": {
            "extension": [{"url": f"{BACKPORT}backport-filter-criteria", "valueString": f}
                          for f in filters]
        },
        "channel": {
            "type": channel,
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [{"url": f"{BACKPORT}backport-payload-content", "valueCode": content}]
            },
        },
    }  # fmt: skip


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The subscription status Parameters of a notification Bundle, as a dict of values."""
    params = bundle["entry"][0]["resource"]["parameter"]
    out: dict[str, Any] = {"events": []}
    for p in params:
        if p["name"] == "notification-event":
            out["events"].append(
                {q["name"]: next(v for k, v in q.items() if k != "name") for q in p["part"]}
            )
        else:
            out[p["name"]] = next(v for k, v in p.items() if k != "name")
    return out  # fmt: skip


def binding_token(world: World, who: str, sub_id: str) -> str:
    response = world.get(who, f"Subscription/{sub_id}/$get-ws-binding-token")
    assert response.status_code == 200, response.text
    values = {p["name"]: next(v for k, v in p.items() if k != "name")
              for p in response.json()["parameter"]}  # fmt: skip
    assert values["websocket-url"].endswith("/fhir/websocket")
    assert values["subscription"] == sub_id
    return values["token"]


# -- what a websocket Subscription may be -----------------------------------------------------


def test_the_capability_statement_publishes_the_websocket_url_and_the_topics(
    client: TestClient,
) -> None:
    statement = client.get("/fhir/metadata").json()
    (ws,) = [
        e for e in statement["rest"][0]["extension"]
        if e["url"] == "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket"
    ]  # fmt: skip
    assert ws["valueUrl"] == "ws://testserver/fhir/websocket"
    (subscription,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    advertised = {e["valueCanonical"] for e in subscription["extension"]}
    assert advertised == set(topics()) and CHAT_TOPIC in advertised
    assert {"status", "events", "get-ws-binding-token"} <= {
        o["name"] for o in subscription["operation"]
    }


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (topic_subscription("https://mso.example.org/fhir/SubscriptionTopic/nope", []), 400),
        (topic_subscription(CHAT_TOPIC, ["Patient?family=x"]), 400),  # not the topic's type
        (topic_subscription(CHAT_TOPIC, ["Communication?no-such=1"]), 400),
        (topic_subscription(CHAT_TOPIC, [], content="everything"), 400),
        ({**r4_subscription("Patient?family=x"), "channel": {"type": "websocket",
                                                           "endpoint": "ws://x"}}, 400),
    ],
)  # fmt: skip
def test_a_topic_or_websocket_subscription_that_cannot_be_served_is_refused(
    client: TestClient, body: dict[str, Any], status: int
) -> None:
    response = client.post("/fhir/Subscription", json=body)
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


# -- R4 websocket ---------------------------------------------------------------------------------


def test_r4_bind_then_a_ping_per_notification(app: Any, world: World) -> None:
    sr_id = _case(world)
    sub = world.post(
        "reqA", "Subscription", r4_subscription(f"Communication?based-on=ServiceRequest/{sr_id}")
    ).json()
    with socket(world.client, world.as_("reqA")) as frames:
        frames.ws.send_text(f"bind {sub['id']}")
        assert frames.next() == f"bound {sub['id']}"
        for _ in range(2):
            assert world.post("prov1", "Communication", chat_message(sr_id)).status_code == 201
        got: list[str] = []
        deliver_until(app, lambda: _drain(frames, got) >= 2)
        assert got == [f"ping {sub['id']}"] * 2


def _drain(frames: Frames, into: list[str]) -> int:
    while not frames.empty():
        into.append(frames.next())
    return len(into)


def test_frames_that_are_not_understood_get_an_error_frame_and_the_socket_stays(
    world: World,
) -> None:
    sr_id = _case(world)
    mine = world.post(
        "reqA", "Subscription", r4_subscription(f"Communication?based-on=ServiceRequest/{sr_id}")
    ).json()
    theirs = world.post(
        "prov1", "Subscription", r4_subscription(f"Communication?based-on=ServiceRequest/{sr_id}")
    ).json()
    with socket(world.client, world.as_("reqA")) as frames:
        for frame in ("hello", "bind", "bind-with-token nonsense", f"bind {theirs['id']}",
                      "bind does-not-exist", "\x00\x01", "ping x " * 1000):  # fmt: skip
            frames.ws.send_text(frame)
            error = frames.next_json()
            assert error["resourceType"] == "OperationOutcome", frame
        frames.ws.send_bytes(b"\x00binary")
        assert frames.next_json()["resourceType"] == "OperationOutcome"
        frames.ws.send_text(f"bind {mine['id']}")  # still open and working
        assert frames.next() == f"bound {mine['id']}"
    with socket(world.client) as frames:  # no Authorization header: bind is refused, not fatal
        frames.ws.send_text(f"bind {mine['id']}")
        assert "bind-with-token" in frames.next_json()["issue"][0]["diagnostics"]
    with socket(world.client, {"Authorization": "Bearer not-a-token"}) as frames:
        assert frames.next_json()["issue"][0]["code"] == "login"
        with pytest.raises(AssertionError):
            frames.next(timeout=5)  # closed


# -- topics, bind-with-token, $status and $events --------------------------------------------------


def test_topic_notifications_over_a_bound_websocket_and_replay_of_what_was_missed(
    app: Any, world: World
) -> None:
    sr_id = _case(world)
    body = topic_subscription(CHAT_TOPIC, [f"Communication?based-on=ServiceRequest/{sr_id}"])
    sub = world.post("reqA", "Subscription", body).json()
    assert sub["status"] == "active"
    token = binding_token(world, "reqA", sub["id"])
    with socket(world.client) as frames:  # no header: the binding token authenticates
        frames.ws.send_text(f"bind-with-token {token}")
        handshake = status_of(frames.next_json())
        assert handshake["type"] == "handshake" and handshake["topic"] == CHAT_TOPIC
        assert handshake["events-since-subscription-start"] == "0"
        first = world.post("prov1", "Communication", chat_message(sr_id)).json()
        got: list[dict[str, Any]] = []

        def arrived() -> bool:
            while not frames.empty():
                got.append(frames.next_json())
            return bool(got)

        deliver_until(app, arrived)
        bundle = got[0]
        assert bundle["type"] == "history"
        status = status_of(bundle)
        assert status["type"] == "event-notification"
        assert status["events"][0]["event-number"] == "1"
        assert status["events"][0]["focus"]["reference"].endswith(f"Communication/{first['id']}")
        assert "resource" not in bundle["entry"][1]  # id-only
    # disconnected: two more messages, and the requester's own (its topic fires on it too)
    later = [world.post("prov1", "Communication", chat_message(sr_id)).json()["id"]
             for _ in range(2)]  # fmt: skip
    deliver_until(app, lambda: _events_total(world, sub["id"]) == 3)
    replay = world.get("reqA", f"Subscription/{sub['id']}/$events?eventsSinceNumber=2")
    assert replay.status_code == 200, replay.text
    status = status_of(replay.json())
    assert status["type"] == "query-event"
    assert [e["event-number"] for e in status["events"]] == ["2", "3"]
    assert [e["focus"]["reference"].rsplit("/", 1)[1] for e in status["events"]] == later
    full = world.get(
        "reqA", f"Subscription/{sub['id']}/$events?eventsSinceNumber=3&content=full-resource"
    ).json()
    assert full["entry"][1]["resource"]["id"] == later[1]
    assert (
        world.get("reqA", f"Subscription/{sub['id']}/$events?eventsSinceNumber=x").status_code
        == 400
    )
    # the token may be used again to re-bind after a reconnect
    with socket(world.client) as frames:
        frames.ws.send_text(f"bind-with-token {token}")
        assert status_of(frames.next_json())["events-since-subscription-start"] == "3"


def test_a_channel_with_a_heartbeat_period_gets_heartbeats(world: World) -> None:
    sr_id = _case(world)
    body = topic_subscription(CHAT_TOPIC, [f"Communication?based-on=ServiceRequest/{sr_id}"])
    body["channel"]["extension"] = [
        {"url": f"{BACKPORT}backport-heartbeat-period", "valueUnsignedInt": 1}
    ]
    sub = world.post("reqA", "Subscription", body).json()
    with socket(world.client) as frames:
        frames.ws.send_text(f"bind-with-token {binding_token(world, 'reqA', sub['id'])}")
        assert status_of(frames.next_json())["type"] == "handshake"
        heartbeat = status_of(frames.next_json(timeout=5))
        assert heartbeat["type"] == "heartbeat" and heartbeat["events"] == []


def _events_total(world: World, sub_id: str) -> int:
    response = world.get("reqA", f"Subscription/{sub_id}/$status")
    assert response.status_code == 200, response.text
    (entry,) = response.json()["entry"]
    return int(status_of({"entry": [entry]})["events-since-subscription-start"])


def test_a_case_status_topic_fires_on_status_changes_only(app: Any, world: World) -> None:
    sr_id, task_id = world.submit()
    body = topic_subscription(CASE_TOPIC, [f"Task?focus=ServiceRequest/{sr_id}"],
                              content="full-resource")  # fmt: skip
    sub = world.post("reqA", "Subscription", body).json()
    assert world.op("admin", task_id, "assign",
                    provider=f"PractitionerRole/{world.prov1}").status_code == 200  # fmt: skip
    task = world.task(task_id)
    noted = world.put("admin", f"Task/{task_id}", {**task, "note": [{"text": "x"}]})
    assert noted.status_code == 200, noted.text  # a change that is not a status change
    deliver_until(app, lambda: _events_total(world, sub["id"]) >= 1)
    deliver(app, rounds=2)
    events = world.get("reqA", f"Subscription/{sub['id']}/$events?content=full-resource").json()
    status = status_of(events)
    assert len(status["events"]) == 1
    assert events["entry"][1]["resource"]["businessStatus"] == task["businessStatus"]


def test_binding_tokens_are_only_for_ones_own_websocket_subscriptions(world: World) -> None:
    sr_id = _case(world)
    criteria = f"Communication?based-on=ServiceRequest/{sr_id}"
    mine = world.post("reqA", "Subscription", r4_subscription(criteria)).json()
    hook = world.post("reqA", "Subscription", topic_subscription(
        CHAT_TOPIC, [criteria], channel="rest-hook") | {"channel": {
            "type": "rest-hook", "endpoint": "https://hooks.example.test/x"}}).json()  # fmt: skip
    assert world.get("prov1", f"Subscription/{mine['id']}/$get-ws-binding-token").status_code in (
        403,
        404,
    )
    assert world.get("reqA", f"Subscription/{hook['id']}/$get-ws-binding-token").status_code == 403
    assert world.get("reqA", "Subscription/$get-ws-binding-token").status_code == 400
    both = world.get("reqA", f"Subscription/$get-ws-binding-token?id={mine['id']}")
    assert both.status_code == 200


# -- access on this path ------------------------------------------------------------------------


def test_admins_hear_nothing_of_chat_and_a_provider_who_rejects_hears_nothing_more(
    app: Any, world: World
) -> None:
    sr_id, task_id = world.submit()
    assert world.op("admin", task_id, "assign",
                    provider=f"PractitionerRole/{world.prov1}").status_code == 200  # fmt: skip
    topic = topic_subscription(CHAT_TOPIC, [f"Communication?based-on=ServiceRequest/{sr_id}"])
    admin = world.post("admin", "Subscription", topic).json()
    prov1 = world.post("prov1", "Subscription", topic).json()
    requester = world.post("reqA", "Subscription", topic).json()
    assert admin["status"] == "active"  # it may subscribe; it is simply never told
    assert world.post("reqA", "Communication", chat_message(sr_id)).status_code == 201
    deliver_until(app, lambda: _total(world, "prov1", prov1["id"]) == 1)
    rejected = world.op("prov1", task_id, "reject", reason="Outside my field")
    assert rejected.status_code == 200, rejected.text
    assert world.op("admin", task_id, "assign",
                    provider=f"PractitionerRole/{world.prov2}").status_code == 200  # fmt: skip
    assert world.post("reqA", "Communication", chat_message(sr_id)).status_code == 201
    deliver_until(app, lambda: _total(world, "reqA", requester["id"]) == 2)
    deliver(app, rounds=2)
    assert _total(world, "admin", admin["id"]) == 0
    assert _total(world, "prov1", prov1["id"]) == 1  # nothing after it rejected
    replay = world.get("prov1", f"Subscription/{prov1['id']}/$events").json()
    assert status_of(replay)["events"] == []  # and not even the old one, now not its to read
    with socket(world.client, world.as_("admin")) as frames:
        frames.ws.send_text(f"bind {requester['id']}")  # not its Subscription
        assert frames.next_json()["resourceType"] == "OperationOutcome"


def _total(world: World, who: str, sub_id: str) -> int:
    response = world.get(who, f"Subscription/{sub_id}/$status")
    assert response.status_code == 200, response.text
    return int(status_of(response.json())["events-since-subscription-start"])
