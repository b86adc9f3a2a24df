"""Case chat against a live ``mso serve --workers 2`` (issue 15, the live part), on SQLite and
PostgreSQL: real websocket clients on different worker processes, a real rest-hook endpoint,
a real SMTP server, and a worker SIGKILLed in the middle of a burst of messages (PostgreSQL).

What it proves, end to end through real processes and sockets:

* the requester and the provider of a case exchange messages with attachments while their
  websocket clients are held by different worker processes, and each hears of every message;
* ``$unread`` / ``$mark-read``, immutability (405) and the admin's blindness to chat hold on
  the live server, websocket Subscriptions included;
* a rest-hook endpoint that fails at first gets every message, in order, and the Subscription
  goes to ``error`` and back to ``active``;
* a subscriber that disconnects replays exactly what it missed with ``$events``;
* a worker killed mid-burst loses no notification and doubles none;
* an offline recipient gets one e-mail per burst, without the message text; admins none;
* a provider who rejects the case hears nothing more, its successor does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from fhir_server.codes import CASE_NUMBER_SYSTEM
from tests.auth_helpers import token_for
from tests.conftest import authorized
from tests.e2e.conftest import start_server, stop_server
from tests.e2e.live_sockets import Socket, worker_holding, workers_of
from tests.hook_receiver import Receiver, receiving
from tests.integration.test_chat import mark_read as post_mark_read
from tests.integration.test_chat import unread
from tests.integration.workflow_world import PDF, World, b64, pdf_bytes, png_bytes
from tests.smtp_server import Collector, SmtpServer, body_of, free_port

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
CHAT_TOPIC = "https://mso.example.org/fhir/SubscriptionTopic/chat-message"
PUBLIC_URL = "https://mso.example.test"
WAIT = 30.0  # seconds any notification may take (PostgreSQL: older transactions cluster-wide)
POSTGRES_ONLY = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


# -- the live server ---------------------------------------------------------------------------


@dataclass
class Live:
    """A running ``mso serve``: its database, FHIR base, supervisor process, mail collector."""

    db_url: str
    base: str
    proc: Any
    smtp: Collector
    data_dir: Path

    @property
    def root(self) -> str:
        return self.base.removesuffix("/fhir")

    @property
    def port(self) -> int:
        return int(self.root.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return "ws" + self.base.removeprefix("http") + "/websocket"

    def log_tail(self, chars: int = 4000) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")[-chars:]


def server_env(smtp_port: int) -> dict[str, str]:
    """Fast rest-hook retries to loopback, mail to the test's SMTP server, nobody online."""
    return {
        "MSO_SUBSCRIPTION_ALLOWED_HOSTS": "127.0.0.1",
        "MSO_SUBSCRIPTION_RETRY_BASE": "0.2",
        "MSO_SUBSCRIPTION_RETRY_MAX": "1",
        "MSO_SMTP_HOST": "127.0.0.1",
        "MSO_SMTP_PORT": str(smtp_port),
        "MSO_SMTP_STARTTLS": "false",
        "MSO_MAIL_POLL_INTERVAL": "0.2",
        "MSO_PRESENCE_WINDOW": "0",
        "MSO_PUBLIC_URL": PUBLIC_URL,
    }


@pytest.fixture(scope="module")
def live(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One live server with two workers for the module's tests, on the session database."""
    port = free_port()
    with SmtpServer(port) as smtp:
        data_dir = Path(tmp_path_factory.mktemp("chat-live"))
        proc, base = start_server(db_url, data_dir, workers=2, env=server_env(port))
        try:
            yield Live(db_url, base, proc, smtp, data_dir)
        finally:
            stop_server(proc)


@pytest.fixture
def world(live: Live) -> Iterator[World]:
    """A new world (organization, providers, patient, per-role tokens) on the live server."""
    _SERVERS.append(live)
    try:
        with httpx.Client(base_url=live.root, timeout=30) as http:
            yield build_live_world(live, http)
    finally:
        _SERVERS.remove(live)


def build_live_world(live: Live, http: httpx.Client) -> World:
    """:func:`tests.integration.workflow_world.build_world` for a live server: resources written
    by a system client, per-role tokens whose audience is the live base URL. Every user has its
    own name (``<who>-<u>``) so that a test may give it an e-mail address."""
    from fhir_server.codes import SPECIALTY_SYSTEM
    from fhir_server.config import Settings

    u = uuid.uuid4().hex[:10]
    org, req_role, prov1, prov2, patient = (f"{n}-{u}" for n in ("org", "rq", "pv1", "pv2", "pt"))
    specialty = [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]}]
    resources = [
        {"resourceType": "Organization", "id": org, "name": f"Hospital {u}"},
        {
            "resourceType": "PractitionerRole",
            "id": req_role,
            "active": True,
            "organization": {"reference": f"Organization/{org}"},
        },
        {"resourceType": "PractitionerRole", "id": prov1, "active": True, "specialty": specialty},
        {"resourceType": "PractitionerRole", "id": prov2, "active": True, "specialty": specialty},
        {
            "resourceType": "Patient",
            "id": patient,
            "active": True,
            "identifier": [{"system": "urn:mso:test-mrn", "value": u}],
            "name": [{"family": f"Doe{u}"}],
        },
    ]
    system = authorized(live.db_url, live.base)
    for body in resources:
        response = http.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=system)
        assert response.status_code in (200, 201), response.text
    settings = Settings(database_url=live.db_url)
    accounts: dict[str, dict[str, str]] = {
        "reqA": {"role": "requester", "organization": org, "practitioner_role": req_role},
        "admin": {"role": "admin"},
        "prov1": {"role": "provider", "practitioner_role": prov1},
        "prov2": {"role": "provider", "practitioner_role": prov2},
    }
    headers = {
        who: {
            "Authorization": "Bearer "
            + token_for(settings, username=f"{who}-{u}", audience=live.base, **account)
        }
        for who, account in accounts.items()
    }
    return World(http, None, u, org, req_role, prov1, prov2, patient, headers)


# -- helpers ----------------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """``check()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; the server said:\n{_said()}"
            )
        time.sleep(0.05)


_SERVERS: list[Live] = []  # the servers of the running test, newest last (for failure reports)


def _said() -> str:
    """The last lines of the newest live server's log that are not access-log lines."""
    if not _SERVERS:
        return ""
    lines = _SERVERS[-1].log_tail(200_000).splitlines()
    access = re.compile(r" (GET|POST|PUT|PATCH|DELETE|HEAD) /")
    return "\n".join([line for line in lines if not access.search(line)][-40:])


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()


def case(world: World, *, accept: bool = True) -> tuple[str, str]:
    """A case of the requester assigned to provider 1 (accepted by default); (SR id, Task id)."""
    sr_id, task_id = world.submit()
    ok(world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}"))
    if accept:
        ok(world.op("prov1", task_id, "accept"))
    return sr_id, task_id


def message(sr_id: str, *payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": "completed",
        "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
        "payload": list(payload) or [{"contentString": "Hello"}],
    }


def text(value: str) -> dict[str, Any]:
    return {"contentString": value}


def send(world: World, who: str, sr_id: str, *payload: dict[str, Any]) -> dict[str, Any]:
    return ok(world.post(who, "Communication", message(sr_id, *payload)), 201)


def upload(world: World, who: str, data: bytes, content_type: str) -> str:
    """A raw Binary upload; its id."""
    response = world.client.post(
        "/fhir/Binary", content=data, headers={**world.as_(who), "content-type": content_type}
    )
    return ok(response, 201)["id"]


def criteria(sr_id: str) -> str:
    return f"Communication?based-on=ServiceRequest/{sr_id}"


def r4_subscription(world: World, who: str, sr_id: str) -> str:
    """An R4 websocket Subscription of ``who`` on the case's chat; its id."""
    body = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "chat",
        "criteria": criteria(sr_id),
        "channel": {"type": "websocket"},
    }
    created = ok(world.post(who, "Subscription", body), 201)
    assert created["status"] == "active"
    return created["id"]


def topic_subscription(world: World, who: str, sr_id: str) -> str:
    """A topic-based (Backport) websocket Subscription, id-only, on the case's chat; its id."""
    body = {
        "resourceType": "Subscription",
        "meta": {"profile": [f"{BACKPORT}backport-subscription"]},
        "status": "requested",
        "reason": "chat",
        "criteria": CHAT_TOPIC,
        "_criteria": {
            "extension": [
                {"url": f"{BACKPORT}backport-filter-criteria", "valueString": criteria(sr_id)}
            ]
        },
        "channel": {
            "type": "websocket",
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [
                    {"url": f"{BACKPORT}backport-payload-content", "valueCode": "id-only"}
                ]
            },
        },
    }
    created = ok(world.post(who, "Subscription", body), 201)
    assert created["status"] == "active"
    return created["id"]


def binding_token(world: World, who: str, sub_id: str) -> str:
    params = ok(world.get(who, f"Subscription/{sub_id}/$get-ws-binding-token"))["parameter"]
    values = {p["name"]: next(v for k, v in p.items() if k != "name") for p in params}
    assert values["subscription"] == sub_id
    return values["token"]


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The subscription status Parameters of a notification Bundle: its values by name, and
    ``events``: (event number, focus id) of each notification event."""
    out: dict[str, Any] = {"events": []}
    for p in bundle["entry"][0]["resource"]["parameter"]:
        if p["name"] == "notification-event":
            parts = {q["name"]: q for q in p["part"]}
            focus = parts.get("focus", {}).get("valueReference", {}).get("reference", "")
            out["events"].append((int(parts["event-number"]["valueString"]), focus))
        else:
            out[p["name"]] = next(v for k, v in p.items() if k != "name")
    return out


def events_total(world: World, who: str, sub_id: str) -> int:
    bundle = ok(world.get(who, f"Subscription/{sub_id}/$status"))
    (entry,) = bundle["entry"]
    status = status_of({"entry": [entry]})
    assert status["type"] == "query-status"
    return int(status["events-since-subscription-start"])


def replay(world: World, who: str, sub_id: str, since: int = 1) -> list[tuple[int, str]]:
    """``$events`` from ``since``: (event number, focus id) each, every page of them."""
    events: list[tuple[int, str]] = []
    while True:
        bundle = ok(
            world.get(who, f"Subscription/{sub_id}/$events", params={"eventsSinceNumber": since})
        )
        status = status_of(bundle)
        assert status["type"] == "query-event"
        page = [(n, ref.rsplit("/", 1)[1]) for n, ref in status["events"]]
        if not page:
            return events
        events += page
        since = page[-1][0] + 1


def bind_r4(live: Live, world: World, who: str, sub_id: str) -> Socket:
    sock = Socket(live.ws_url, world.as_(who))
    sock.send(f"bind {sub_id}")
    assert sock.expect() == f"bound {sub_id}"
    return sock


def thread_ids(world: World, who: str, sr_id: str) -> list[str]:
    """The ids of the case's chat messages ``who`` finds, every page."""
    ids: list[str] = []
    url: str | None = "/fhir/Communication"
    params: dict[str, str] | None = {"based-on": f"ServiceRequest/{sr_id}", "_count": "100"}
    while url:
        bundle = ok(world.client.get(url, params=params, headers=world.as_(who)))
        ids += [e["resource"]["id"] for e in bundle.get("entry", ())]
        url = next(
            (link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None
        )
        params = None
    return ids


def chat_ids(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["id"]
        for e in bundle.get("entry", ())
        if e.get("resource", {}).get("resourceType") == "Communication"
        and e["resource"].get("basedOn")
    }


def case_number(world: World, sr_id: str) -> str:
    body = ok(world.get("admin", f"ServiceRequest/{sr_id}"))
    return next(i["value"] for i in body["identifier"] if i["system"] == CASE_NUMBER_SYSTEM)


class Listener:
    """What one websocket client hears: R4 pings of one Subscription, and the focus ids of the
    event-notification Bundles of a topic-based one (bound on the same connection)."""

    def __init__(self, sock: Socket, r4_sub: str, topic_sub: str) -> None:
        self.sock, self.r4_sub, self.topic_sub = sock, r4_sub, topic_sub
        self.pings = 0
        self.events: list[tuple[int, str]] = []

    def drain(self, timeout: float = 0.05) -> None:
        while (frame := self.sock.recv(timeout)) is not None:
            if frame.startswith("ping "):
                assert frame == f"ping {self.r4_sub}", frame
                self.pings += 1
                continue
            bundle = json.loads(frame)
            status = status_of(bundle)
            assert status["type"] == "event-notification", bundle
            assert status["subscription"]["reference"].endswith(f"Subscription/{self.topic_sub}")
            self.events += [(n, ref.rsplit("/", 1)[1]) for n, ref in status["events"]]


# -- 1. two clients on two workers --------------------------------------------------------------


def test_two_clients_on_different_workers_exchange_messages_with_attachments(
    live: Live, world: World
) -> None:
    """The requester's and the provider's websocket clients are held by different worker
    processes (read from /proc); they exchange messages with attachments, each hears of every
    message of the other (R4 ``ping`` and Backport event Bundles on the same connection), reads
    the other's attachment, and the admin reads none of it."""
    sr_id, _ = case(world)
    subs = {
        who: (r4_subscription(world, who, sr_id), topic_subscription(world, who, sr_id))
        for who in ("reqA", "prov1")
    }

    def connect(who: str) -> tuple[Socket, int]:
        r4_sub, topic_sub = subs[who]
        sock = bind_r4(live, world, who, r4_sub)
        sock.send(f"bind-with-token {binding_token(world, who, topic_sub)}")
        handshake = status_of(sock.expect_json())
        assert handshake["type"] == "handshake" and handshake["topic"] == CHAT_TOPIC
        return sock, worker_holding(live.proc.pid, live.port, sock.local_port)

    requester, requester_worker = connect("reqA")
    provider: Socket | None = None
    tried: list[int] = []
    try:
        for _ in range(20):
            candidate, worker = connect("prov1")
            if worker != requester_worker:
                provider = candidate
                break
            tried.append(worker)
            candidate.close()
        assert provider is not None, (
            f"20 connections all landed on worker {requester_worker} ({tried}); the kernel "
            f"did not spread them over {workers_of(live.proc.pid)}"
        )
        assert len(workers_of(live.proc.pid)) == 2

        # the exchange: an inline PDF one way, a raw-uploaded image the other, and words
        letter = send(
            world,
            "reqA",
            sr_id,
            text("Letter attached"),
            {
                "contentAttachment": {
                    "contentType": PDF,
                    "data": b64(pdf_bytes()),
                    "title": "letter.pdf",
                }
            },
        )
        image = png_bytes() + b"\x00" * 50_000
        binary_id = upload(world, "prov1", image, "image/png")
        scan = send(
            world,
            "prov1",
            sr_id,
            text("The scan"),
            {
                "contentAttachment": {
                    "contentType": "image/png",
                    "url": f"Binary/{binary_id}",
                    "title": "scan.png",
                }
            },
        )
        sent_by = {"reqA": [letter["id"]], "prov1": [scan["id"]]}
        everything = [letter["id"], scan["id"]]
        for n in range(2):
            for who in ("reqA", "prov1"):
                sent_by[who].append(send(world, who, sr_id, text(f"{who} {n}"))["id"])
                everything.append(sent_by[who][-1])

        listeners = {
            "reqA": Listener(requester, *subs["reqA"]),
            "prov1": Listener(provider, *subs["prov1"]),
        }

        def heard_all() -> bool:
            for listener in listeners.values():
                listener.drain()
            return all(
                listener.pings >= len(everything) and len(listener.events) >= len(everything)
                for listener in listeners.values()
            )

        wait_until(heard_all, "both clients to hear of every message")
        for who, other in (("reqA", "prov1"), ("prov1", "reqA")):
            listener = listeners[who]
            listener.drain(0.5)  # nothing more than one notification a message
            assert listener.pings == len(everything), who
            numbers = [n for n, _ in listener.events]
            assert numbers == list(range(1, len(everything) + 1)), (who, numbers)
            heard = {focus for _, focus in listener.events}
            assert set(sent_by[other]) <= heard and heard == set(everything), who
    finally:
        requester.close()
        if provider is not None:
            provider.close()

    # the attachments: each party reads the other's, the admin reads neither
    got = ok(world.get("prov1", f"Communication/{letter['id']}"))
    attachment = got["payload"][1]["contentAttachment"]
    assert attachment["data"] == b64(pdf_bytes()) and attachment["contentType"] == PDF
    raw = world.client.get(
        f"/fhir/Binary/{binary_id}", headers={**world.as_("reqA"), "Accept": "image/png"}
    )
    assert raw.status_code == 200 and raw.content == image
    for ref in (
        f"Communication/{letter['id']}",
        f"Communication/{scan['id']}",
        f"Binary/{binary_id}",
    ):
        assert world.get("admin", ref).status_code == 404, ref
    assert thread_ids(world, "reqA", sr_id) == everything
    assert thread_ids(world, "prov1", sr_id) == everything


# -- 2. unread counts ---------------------------------------------------------------------------


def mark_read(world: World, who: str, sr_id: str, **extra: dict[str, Any]) -> int:
    """``$mark-read`` (the chat tests' request); the count of the case's unread messages."""
    params = {p["name"]: p for p in ok(post_mark_read(world, who, sr_id, **extra))["parameter"]}
    assert params["case"]["valueReference"]["reference"] == f"ServiceRequest/{sr_id}"
    return params["count"]["valueInteger"]


def test_unread_counts_and_mark_read_on_the_live_server(world: World) -> None:
    """``$unread`` counts what the other party sent (never one's own), per case, over requests
    answered by either worker; ``$mark-read`` up to a message, then all, brings it to 0."""
    sr_id, _ = case(world)
    from_provider = [send(world, "prov1", sr_id, text(f"p{n}")) for n in range(3)]
    for n in range(2):
        send(world, "reqA", sr_id, text(f"r{n}"))
    for _ in range(4):  # each answer may come from either worker: all agree
        assert unread(world, "reqA") == (3, {sr_id: 3})
        assert unread(world, "prov1") == (2, {sr_id: 2})
        assert unread(world, "admin") == (0, {})
    second = {"valueReference": {"reference": f"Communication/{from_provider[1]['id']}"}}
    assert mark_read(world, "reqA", sr_id, message=second) == 1
    assert unread(world, "reqA") == (1, {sr_id: 1})
    assert mark_read(world, "reqA", sr_id) == 0
    assert mark_read(world, "prov1", sr_id) == 0
    assert unread(world, "reqA") == (0, {}) and unread(world, "prov1") == (0, {})
    send(world, "prov1", sr_id, text("later"))
    assert unread(world, "reqA") == (1, {sr_id: 1})


# -- 3. immutable -------------------------------------------------------------------------------


def test_messages_are_immutable_on_the_live_server(world: World) -> None:
    """PUT, JSON-PATCH and DELETE of a chat message are 405 OperationOutcomes for sender and
    recipient; the message keeps one version."""
    sr_id, _ = case(world)
    mine = send(world, "reqA", sr_id, text("Original words"))
    path = f"/fhir/Communication/{mine['id']}"
    edited = {**mine, "payload": [text("Other words")]}
    patch = [{"op": "replace", "path": "/status", "value": "entered-in-error"}]
    for who in ("reqA", "prov1"):
        headers = world.as_(who)
        for response in (
            world.client.put(path, json=edited, headers=headers),
            world.client.patch(
                path,
                content=json.dumps(patch),
                headers={**headers, "Content-Type": "application/json-patch+json"},
            ),
            world.client.delete(path, headers=headers),
        ):
            assert response.status_code == 405, response.text
            outcome = response.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["details"]["coding"][0]["code"] == "MSO-CHAT-405"
    history = ok(world.get("reqA", f"Communication/{mine['id']}/_history"))
    assert len(history["entry"]) == 1
    current = ok(world.get("prov1", f"Communication/{mine['id']}"))
    assert current["meta"]["versionId"] == "1" and current["payload"] == [text("Original words")]


# -- 4. the admin -------------------------------------------------------------------------------


def test_the_admin_reaches_no_chat_content_and_hears_of_no_message(
    live: Live, world: World
) -> None:
    """On every read path of the live server (read, search, type and system ``_history``,
    ``_revinclude``, ``$everything``, a batch) the admin finds no chat message; its websocket
    Subscription on the chat, bound on a live socket, hears nothing while the parties talk."""
    sr_id, _ = case(world)
    admin_sub = r4_subscription(world, "admin", sr_id)
    requester_sub = r4_subscription(world, "reqA", sr_id)
    secret = f"secret-{uuid.uuid4().hex}"
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    with bind_r4(live, world, "admin", admin_sub) as admin_socket:
        sent = [send(world, who, sr_id, text(f"{secret} {who}")) for who in ("reqA", "prov1")]
        ids = {m["id"] for m in sent}
        wait_until(
            lambda: events_total(world, "reqA", requester_sub) == 2,
            "the requester's Subscription to count both messages",
        )
        assert admin_socket.recv(1.0) is None  # not a ping
    assert events_total(world, "admin", admin_sub) == 0
    assert replay(world, "admin", admin_sub) == []

    responses: list[httpx.Response] = []

    def admin_get(path: str, **params: str) -> dict[str, Any]:
        response = world.get("admin", path, params=params)
        responses.append(response)
        return ok(response)

    for message_id in ids:
        for path in (f"Communication/{message_id}", f"Communication/{message_id}/_history"):
            response = world.get("admin", path)
            responses.append(response)
            assert response.status_code == 404, path
    searches = [
        admin_get("Communication", **{"based-on": f"ServiceRequest/{sr_id}"}),
        admin_get("Communication/_history", _since=start, _count="1000"),
        admin_get("_history", _since=start, _count="1000"),
        admin_get("ServiceRequest", _id=sr_id, _revinclude="Communication:based-on"),
        admin_get(f"Patient/{world.patient}/$everything"),
    ]
    for bundle in searches:
        assert not chat_ids(bundle) & ids
    # what the admin may read of it is there: the in-app notices of the messages ("New message
    # from ... on case ..."), which are about the case, not chat
    case_ref = f"ServiceRequest/{sr_id}"
    notices = [
        e["resource"]
        for e in searches[1]["entry"]
        if e.get("resource", {}).get("topic", {}).get("text") == "chat-message"
        and any(a.get("reference") == case_ref for a in e["resource"].get("about", ()))
    ]
    assert len(notices) == 2 and all(secret not in str(n) for n in notices), notices
    assert searches[3]["entry"][0]["resource"]["id"] == sr_id  # the case itself, yes
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Communication/{i}"}} for i in ids]
        + [{"request": {"method": "GET", "url": f"Communication?based-on=ServiceRequest/{sr_id}"}}],
    }
    posted = world.post("admin", "", batch)
    responses.append(posted)
    entries = ok(posted)["entry"]
    assert [e["response"]["status"][:3] for e in entries[:2]] == ["404", "404"]
    assert not chat_ids(entries[2].get("resource", {}))
    for response in responses:
        assert secret not in response.text


# -- 5. rest-hook -------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A rest-hook endpoint answering 500 to the first three requests, then 200."""
    with receiving([500] * 3) as got:
        yield got


def test_a_failing_rest_hook_gets_every_message_in_order_and_recovers(
    world: World, receiver: Receiver
) -> None:
    """A rest-hook endpoint answering 500 three times, then 200, receives every message (R4
    full payload: ``PUT [endpoint]/Communication/<id>``) once answered 200, in the order they
    were sent; the Subscription went to ``error`` and came back to ``active``."""
    sr_id, _ = case(world)
    body = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "t",
        "criteria": criteria(sr_id),
        "channel": {
            "type": "rest-hook",
            "endpoint": receiver.url,
            "payload": "application/fhir+json",
        },
    }
    sub_id = ok(world.post("reqA", "Subscription", body), 201)["id"]
    sent = [send(world, "prov1" if n % 2 else "reqA", sr_id, text(f"m{n}"))["id"] for n in range(4)]
    expected = [f"/hook/Communication/{i}" for i in sent]
    wait_until(lambda: len(receiver.delivered()) >= len(sent), "every message at the hook")
    time.sleep(0.3)  # a duplicate would come right after
    assert receiver.delivered() == expected
    with receiver.lock:
        requests = list(receiver.requests)
    assert all(r["method"] == "PUT" for r in requests)
    failed = [r["path"] for r in requests if r["status"] == 500]
    assert failed == [expected[0]] * 3  # one Subscription's notifications wait for the oldest
    for r in requests:
        if r["status"] == 200:
            resource = json.loads(r["body"])
            assert resource["resourceType"] == "Communication"
            assert r["path"].endswith(resource["id"])

    def statuses() -> list[str]:
        history = ok(world.get("reqA", f"Subscription/{sub_id}/_history", params={"_count": "50"}))
        return [e["resource"]["status"] for e in reversed(history["entry"])]

    seen = wait_until(
        lambda: (s := statuses()) and s[-1] == "active" and "error" in s and s,
        "the Subscription back to active",
    )
    assert seen[0] == "active" and "error" in seen[1:-1], seen
    current = ok(world.get("reqA", f"Subscription/{sub_id}"))
    assert current["status"] == "active" and "error" not in current


# -- 6. replay after a disconnect ---------------------------------------------------------------


def test_a_subscriber_that_disconnects_replays_what_it_missed(live: Live, world: World) -> None:
    """A topic-based Subscription bound with a token hears two messages, its client goes
    away, three more are sent; it binds again with the same token, the handshake counts five,
    and ``$events`` from the last number seen + 1 returns exactly the three it missed."""
    sr_id, _ = case(world)
    sub_id = topic_subscription(world, "reqA", sr_id)
    token = binding_token(world, "reqA", sub_id)

    seen: list[tuple[int, str]] = []
    with Socket(live.ws_url) as sock:  # no header: the binding token authenticates
        sock.send(f"bind-with-token {token}")
        handshake = status_of(sock.expect_json())
        assert handshake["type"] == "handshake"
        assert handshake["events-since-subscription-start"] == "0"
        before = [send(world, "prov1", sr_id, text(f"b{n}"))["id"] for n in range(2)]
        while len(seen) < 2:
            status = status_of(sock.expect_json(WAIT))
            assert status["type"] == "event-notification"
            seen += [(n, ref.rsplit("/", 1)[1]) for n, ref in status["events"]]
    assert seen == [(1, before[0]), (2, before[1])]

    missed = [
        send(world, who, sr_id, text(f"a{n}"))["id"]
        for n, who in enumerate(("prov1", "reqA", "prov1"))
    ]
    wait_until(lambda: events_total(world, "reqA", sub_id) == 5, "five events")
    with Socket(live.ws_url) as sock:
        sock.send(f"bind-with-token {token}")  # the same token, still valid
        handshake = status_of(sock.expect_json())
        assert handshake["type"] == "handshake"
        assert handshake["events-since-subscription-start"] == "5"
        replayed = replay(world, "reqA", sub_id, since=seen[-1][0] + 1)
        assert replayed == [(3, missed[0]), (4, missed[1]), (5, missed[2])]
        # and the new connection hears what comes next
        after = send(world, "prov1", sr_id, text("after"))["id"]
        heard: list[tuple[int, str]] = []
        while not any(number > 5 for number, _ in heard):
            status = status_of(sock.expect_json(WAIT))
            assert status["type"] == "event-notification"
            heard += [(n, ref.rsplit("/", 1)[1]) for n, ref in status["events"]]
    # only what came after the handshake's count: events 1-5 were seen or replayed, and a
    # socket bound after they were queued is not sent them again
    assert heard == [(6, after)]


# -- 7. a worker SIGKILLed mid-burst ------------------------------------------------------------


@POSTGRES_ONLY
def test_a_worker_killed_during_a_burst_loses_and_doubles_no_notification(
    db_url: str, tmp_path: Path
) -> None:
    """Four clients post 25 messages each while one uvicorn worker is SIGKILLed (the
    supervisor starts another): every message on the server — every 201 among them — is
    exactly one event of the requester's Subscription, numbered 1..N without gaps."""
    smtp_port = free_port()  # nobody listens: no e-mail is due (nobody has an address)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc, base = start_server(db_url, data_dir, workers=2, env=server_env(smtp_port))
    live = Live(db_url, base, proc, Collector(), data_dir)
    _SERVERS.append(live)
    try:
        with httpx.Client(base_url=live.root, timeout=30) as http:
            world = build_live_world(live, http)
            sr_id, _ = case(world)
            sub_id = topic_subscription(world, "reqA", sr_id)
            workers = workers_of(proc.pid)
            assert len(workers) == 2, workers

            created: list[str] = []
            failures: list[str] = []
            lock = threading.Lock()
            go = threading.Event()

            def post_many(who: str, n: int) -> None:
                # its own client: its own connections, spread over the workers
                with httpx.Client(base_url=live.root, timeout=30) as own:
                    for i in range(25):
                        go.wait(30)
                        try:
                            response = own.post(
                                "/fhir/Communication",
                                json=message(sr_id, text(f"{who}-{n}-{i}")),
                                headers=world.as_(who),
                            )
                        except httpx.TransportError as exc:  # the worker died under it
                            with lock:
                                failures.append(type(exc).__name__)
                            continue
                        with lock:
                            if response.status_code == 201:
                                created.append(response.json()["id"])
                            else:
                                failures.append(str(response.status_code))

            posters = [
                threading.Thread(target=post_many, args=(who, n), daemon=True)
                for n, who in enumerate(("reqA", "prov1", "reqA", "prov1"))
            ]
            for poster in posters:
                poster.start()
            go.set()
            wait_until(lambda: len(created) >= 20, "20 messages before the kill", timeout=60)
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            for poster in posters:
                poster.join(timeout=120)
                assert not poster.is_alive(), "a poster hung"
            wait_until(
                lambda: len(w := workers_of(proc.pid)) == 2 and victim not in w,
                "the supervisor to replace the killed worker",
            )
            print(f"{len(created)} created, failures: {failures}")
            assert len(created) == len(set(created))

            on_server = thread_ids(world, "reqA", sr_id)
            assert len(on_server) == len(set(on_server))
            assert set(created) <= set(on_server)
            # a request cut by the kill may or may not have committed: only what exists counts
            assert len(on_server) - len(created) <= len(failures), (failures, on_server)
            wait_until(
                lambda: events_total(world, "reqA", sub_id) >= len(on_server),
                f"{len(on_server)} events",
                timeout=60,
            )
            time.sleep(0.5)  # a doubled event would be counted by now
            events = replay(world, "reqA", sub_id)
            numbers = [n for n, _ in events]
            focus = [f for _, f in events]
            assert numbers == list(range(1, len(on_server) + 1)), numbers
            assert sorted(focus) == sorted(on_server)  # each exactly once
            assert events_total(world, "reqA", sub_id) == len(on_server)
            assert len(created) >= 50, (len(created), failures)  # the burst went on after
    finally:
        _SERVERS.remove(live)
        stop_server(proc)


# -- 8. e-mail ----------------------------------------------------------------------------------


def set_emails(live: Live, world: World, *who: str) -> dict[str, str]:
    """Give ``who`` (users ``<who>-<u>``) an e-mail address; the addresses by role."""
    from fhir_server.storage.auth_schema import auth_user
    from fhir_server.storage.engine import build_engine

    addresses = {w: f"{w.lower()}-{world.u}@example.test" for w in who}
    engine = build_engine(live.db_url)
    try:
        with engine.begin() as conn:
            for w, address in addresses.items():
                conn.execute(
                    update(auth_user)
                    .where(auth_user.c.username == f"{w}-{world.u}")
                    .values(email=address)
                )
    finally:
        engine.dispose()
    return addresses


def mails_to(smtp: Collector, address: str) -> list[Any]:
    with smtp.lock:
        return [m for _, rcpt, m in smtp.messages if address in rcpt]


def outbox_of_case(live: Live, sr_id: str) -> list[tuple[str, str]]:
    """(user name, event) of the e-mails queued about the case."""
    from fhir_server.storage.engine import build_engine
    from fhir_server.storage.messaging_schema import mail_outbox

    engine = build_engine(live.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(mail_outbox.c.username, mail_outbox.c.event)
                .where(mail_outbox.c.case_id == sr_id)
                .order_by(mail_outbox.c.id)
            ).all()
    finally:
        engine.dispose()
    return [(r.username, r.event) for r in rows]


def test_an_offline_recipient_gets_one_email_a_burst_without_the_text(
    live: Live, world: World
) -> None:
    """Three messages of the provider in a burst reach the (offline) requester as one e-mail
    through the real SMTP server: who wrote on which case, a deep link, no message text. The
    requester's answer is one e-mail to the provider; the admin gets none."""
    sr_id, _ = case(world)
    number = case_number(world, sr_id)
    addresses = set_emails(live, world, "reqA", "prov1", "admin")
    words = [f"clinical words {uuid.uuid4().hex}" for _ in range(3)]
    sent = [send(world, "prov1", sr_id, text(w)) for w in words]
    display = sent[0]["sender"]["display"]

    def chat_mail(who: str) -> Any:
        return next(
            (
                m
                for m in mails_to(live.smtp, addresses[who])
                if number in m["Subject"] and "New message" in m["Subject"]
            ),
            None,
        )

    mail = wait_until(lambda: chat_mail("reqA"), "the requester's chat e-mail")
    body = body_of(mail)
    assert f"New message from {display} on case {number}" in body
    assert f"{PUBLIC_URL}/viewer/cases/{sr_id}" in body
    for w in words:
        assert w not in body and w not in mail["Subject"]
    answer = f"answer {uuid.uuid4().hex}"
    send(world, "reqA", sr_id, text(answer))
    to_provider = wait_until(lambda: chat_mail("prov1"), "the provider's chat e-mail")
    assert answer not in body_of(to_provider)
    assert f"{PUBLIC_URL}/viewer/cases/{sr_id}" in body_of(to_provider)

    # one e-mail a burst, to the parties only: the queue says so for good (no e-mail pending)
    users = {who: f"{who}-{world.u}" for who in addresses}
    chat = [user for user, event in outbox_of_case(live, sr_id) if event == "chat-message"]
    assert chat == [users["reqA"], users["prov1"]]
    assert len(mails_to(live.smtp, addresses["reqA"])) == 1
    assert mails_to(live.smtp, addresses["admin"]) == []
    assert users["admin"] not in {user for user, _ in outbox_of_case(live, sr_id)}


# -- 9. access removed --------------------------------------------------------------------------


def test_a_provider_who_rejects_the_case_hears_nothing_more_and_its_successor_does(
    live: Live, world: World
) -> None:
    """The first provider's websocket Subscription hears a message, then the provider rejects
    the case and the admin assigns another: later messages reach the new provider's socket,
    and not the first one's (no frame, its event count stays)."""
    sr_id, task_id = case(world, accept=False)  # Assigned: the chat is open to clarify
    first_sub = r4_subscription(world, "prov1", sr_id)
    with bind_r4(live, world, "prov1", first_sub) as first:
        send(world, "reqA", sr_id, text("Is there an MRI?"))
        assert first.expect(WAIT) == f"ping {first_sub}"
        assert events_total(world, "prov1", first_sub) == 1

        ok(world.op("prov1", task_id, "reject", reason="Outside my field"))
        ok(world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov2}"))
        second_sub = r4_subscription(world, "prov2", sr_id)
        with bind_r4(live, world, "prov2", second_sub) as second:
            for n in range(2):
                send(world, "reqA", sr_id, text(f"For the new provider {n}"))
            assert [second.expect(WAIT) for _ in range(2)] == [f"ping {second_sub}"] * 2
            wait_until(lambda: events_total(world, "prov2", second_sub) == 2, "two events")
            assert first.recv(1.0) is None
            assert second.recv(0.2) is None
        assert events_total(world, "prov1", first_sub) == 1
        assert replay(world, "prov1", first_sub) == []  # not even the old one: not its to read
