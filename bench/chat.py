"""Case chat live delivery: websocket subscribers vs the raw PostgreSQL LISTEN/NOTIFY round trip.

The benchmark creates a throw-away PostgreSQL database, starts ``mso serve --workers N`` on it
and builds a world through the public FHIR API (users and their access tokens through the
server's own Python API, as the token endpoint would issue them): ``--subscribers / 2`` cases,
each submitted by its own requester (own Organization) and assigned to, and accepted by, its
own provider. Each party of each case holds one websocket bound (``bind-with-token``) to a
topic-based Subscription (R5 Backport IG, topic ``chat-message``, filter
``Communication?based-on=ServiceRequest/<case>``, ``id-only`` content), so every message is two
notifications: one to each party, the sender included.

``--senders`` threads then post chat messages (``POST /fhir/Communication``, keep-alive
connections, each sender on its own cases as either party in turn) on a fixed schedule reaching
``--rate`` messages/s in total for ``--duration`` seconds; a sender that falls behind sends at
once until it is back on schedule. The sockets are held by one asyncio loop in a separate
process (the ``websockets`` asyncio client, no keep-alive pings, no compression); each frame
is stamped on arrival and matched to its message by the notification's ``focus``. After the
sending, a drain period (``--drain``) lets the last notifications arrive; what has not arrived
by then is lost.

Latency is message commit -> frame received, bracketed on the client: from the 201 response
(a lower bound: the commit happened before it; a notification can even beat the response) and
from the request start (an upper bound). The server's own stamps split it into stages: the
message's ``sent`` (stamped in the write transaction, just before its commit) -> the event's
``timestamp`` (queued by the dispatcher) -> the notification Bundle's ``timestamp`` (built by
the websocket hub) -> frame received (wall clocks of one machine, millisecond precision).

The baseline, in the same run once the server has stopped: a psycopg connection LISTENing, a
second one doing ``NOTIFY`` in a committed transaction at the same rate; latency commit
returned -> notification received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from unittest import mock

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import (
    CpuShares,
    CpuWatch,
    backend_pids,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    fmt_share,
    format_table,
    fresh_database,
    http_json,
    machine_state,
    percentile,
    process_tree,
    psycopg_dsn,
    run_benchmark,
    running_server,
)

CHAT_TOPIC = "https://mso.example.org/fhir/SubscriptionTopic/chat-message"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
MAX_SUBSCRIBERS = 2000
MAX_SENDERS = 500
MAX_RATE = 5000.0
MAX_DURATION = 120.0
SETUP_CLIENTS = 4  # requests at a time while building the world
SETUP_TIMEOUT = 120.0  # seconds for the whole world (cases, Subscriptions, sockets)
WARMUP_TIMEOUT = 60.0  # seconds for the warm-up messages' notifications
REQUEST_TIMEOUT = 30.0  # seconds for one chat POST
BASELINE_CHANNEL = "mso_bench_chat"
TARGET_RATE = 500.0
TARGET_P95 = 100.0  # ms
WS_MAX_SIZE = 64 * 2**20  # bytes: a frame or message of the hub is never refused


# -- the subscriber process ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One notification event as a subscriber got it."""

    socket: int
    message_id: str
    t_mono: float  # time.monotonic() at the frame's arrival (shared by all processes)
    t_wall: float  # time.time() at the frame's arrival
    queued: float  # the event's timestamp (epoch s): when the dispatcher queued it
    built: float  # the Bundle's timestamp (epoch s): when the hub built the frame


def _epoch(instant: str) -> float:
    return datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()


def parse_frames(
    frames: list[tuple[int, float, float, bytes]],
) -> tuple[list[Received], Counter[str]]:
    """The notification events of the raw ``frames`` (socket, arrival, wall, text) and a count
    of the frames by kind (``event-notification``, ``handshake``, ``error``, ...)."""
    out: list[Received] = []
    kinds: Counter[str] = Counter()
    for index, t_mono, t_wall, raw in frames:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            kinds["not JSON"] += 1
            continue
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            kinds["error" if isinstance(body, dict) else "other"] += 1
            continue
        try:
            status = body["entry"][0]["resource"]["parameter"]
            built = _epoch(body["timestamp"])
        except (KeyError, IndexError, TypeError, ValueError):
            kinds["malformed Bundle"] += 1
            continue
        kind = next((p.get("valueCode") for p in status if p.get("name") == "type"), "?")
        kinds[str(kind)] += 1
        for param in status:
            if param.get("name") != "notification-event":
                continue
            parts = {p.get("name"): p for p in param.get("part") or ()}
            focus = ((parts.get("focus") or {}).get("valueReference") or {}).get("reference", "")
            stamp = (parts.get("timestamp") or {}).get("valueInstant")
            out.append(
                Received(
                    index,
                    focus.rsplit("/", 1)[-1],
                    t_mono,
                    t_wall,
                    _epoch(stamp) if stamp else float("nan"),
                    built,
                )
            )
    return out, kinds


async def _subscriber_main(pipe: Any, url: str, tokens: list[str], timeout: float) -> None:
    """Open and bind one socket per binding token, report ready, stamp every frame until the
    parent says stop, then send back the parsed events."""
    loop = asyncio.get_running_loop()
    frames: list[tuple[int, float, float, bytes]] = []
    state = {"events": 0}
    ended: set[int] = set()  # sockets the server closed (or dropped) before the stop
    limit = asyncio.Semaphore(16)

    async def open_one(index: int, token: str) -> ClientConnection:
        async with limit:
            ws = await connect(
                url,
                open_timeout=timeout,
                close_timeout=2.0,
                ping_interval=None,  # no keep-alive pings during the measurement
                compression=None,  # frames as the hub writes them, no inflating
                max_size=WS_MAX_SIZE,
                max_queue=None,  # never stop reading: a frame's stamp is its arrival
            )
            try:
                await ws.send(f"bind-with-token {token}")
                first = await asyncio.wait_for(ws.recv(decode=False), timeout)
            except BaseException:
                await ws.close()
                raise
            if b'"handshake"' not in first:
                await ws.close()
                raise ConnectionError(f"socket {index}: no handshake: {first!r:.300}")
            return ws

    opened = await asyncio.gather(
        *(open_one(i, t) for i, t in enumerate(tokens)), return_exceptions=True
    )
    sockets = {i: ws for i, ws in enumerate(opened) if isinstance(ws, ClientConnection)}
    failures = [repr(e) for e in opened if not isinstance(e, ClientConnection)]

    async def pump(index: int, ws: ClientConnection) -> None:
        clock, wall = time.monotonic, time.time
        try:
            while True:
                message = await ws.recv(decode=False)
                frames.append((index, clock(), wall(), message))
                state["events"] += message.count(b'"notification-event"')
        except ConnectionClosed:
            if not stop.done():
                ended.add(index)

    stop = loop.create_future()
    tasks = [asyncio.create_task(pump(i, ws)) for i, ws in sockets.items()]

    def on_request() -> None:
        try:
            request = pipe.recv()
        except (EOFError, OSError):
            request = ("stop",)
        if request[0] == "count":
            pipe.send(("count", state["events"]))
        elif not stop.done():
            stop.set_result(None)

    loop.add_reader(pipe.fileno(), on_request)
    pipe.send(("ready", len(sockets), failures[:5]))
    await stop
    loop.remove_reader(pipe.fileno())
    await asyncio.gather(*(ws.close() for ws in sockets.values()), return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    events, kinds = parse_frames(frames)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = {
        "frames": len(frames),
        "kinds": dict(kinds),
        "closed_by_server": len(ended),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }
    pipe.send(("done", events, stats))


def subscriber_process(pipe: Any, url: str, tokens: list[str], timeout: float) -> None:
    """Entry point of the subscriber process (``multiprocessing``, spawn)."""
    try:
        asyncio.run(_subscriber_main(pipe, url, tokens, timeout))
    except BaseException as exc:  # the parent reports it
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)))
        raise


class Subscribers:
    """The parent's handle on the subscriber process; every wait is bounded."""

    def __init__(self, ws_url: str, tokens: list[str], timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(
            target=subscriber_process,
            args=(child, ws_url, tokens, timeout),
            name="bench-chat-subscribers",
            daemon=True,
        )
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        """PID of the subscriber process."""
        return int(self.process.pid or 0)

    def _answer(self, timeout: float) -> tuple[Any, ...]:
        if not self.pipe.poll(timeout):
            raise RuntimeError(f"the subscriber process did not answer within {timeout:.0f} s")
        try:
            answer = self.pipe.recv()
        except EOFError:
            raise RuntimeError("the subscriber process died") from None
        if answer[0] == "error":
            raise RuntimeError(f"the subscriber process failed: {answer[1]}")
        return answer

    def ready(self, timeout: float) -> tuple[int, list[str]]:
        """How many sockets were bound, and why the others were not."""
        _, bound, failures = self._answer(timeout)
        return int(bound), list(failures)

    def count(self, timeout: float = 10.0) -> int:
        """Notification events received so far."""
        self.pipe.send(("count",))
        return int(self._answer(timeout)[1])

    def stop(self, timeout: float = 60.0) -> tuple[list[Received], dict[str, Any]]:
        """Close the sockets; the events received and the process's statistics."""
        self.pipe.send(("stop",))
        _, events, stats = self._answer(timeout)
        return events, stats

    def close(self) -> None:
        """End the process (it has normally ended already)."""
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.pipe.close()


# -- the world ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One case: its ServiceRequest and Task, its two parties' tokens (requester, provider),
    their Subscriptions and websocket binding tokens."""

    index: int
    requester: str
    provider: str
    sr_id: str = ""
    task_id: str = ""
    subs: list[str] = field(default_factory=list)
    ws_tokens: list[str] = field(default_factory=list)

    def token(self, party: int) -> str:
        """Party 0 is the requester, 1 the provider."""
        return self.requester if party == 0 else self.provider


def _ids(i: int) -> tuple[str, str, str, str]:
    return f"bench-org-{i}", f"bench-rq-{i}", f"bench-pv-{i}", f"bench-pt-{i}"


def directory_bundle(cases: int) -> dict[str, Any]:
    """A transaction Bundle of each case's Organization, requester and provider
    PractitionerRoles and Patient."""
    from fhir_server.codes import SPECIALTY_SYSTEM

    specialty = [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]}]
    entries = []
    for i in range(cases):
        org, rq, pv, pt = _ids(i)
        bodies = [
            ("Organization", org, {"name": f"Bench Hospital {i}", "active": True}),
            (
                "PractitionerRole",
                rq,
                {"active": True, "organization": {"reference": f"Organization/{org}"}},
            ),
            ("PractitionerRole", pv, {"active": True, "specialty": specialty}),
            (
                "Patient",
                pt,
                {
                    "active": True,
                    "identifier": [{"system": "urn:mso:bench-mrn", "value": f"MRN-{i:05d}"}],
                    "name": [{"family": f"Bench{i}", "given": ["Pat"]}],
                },
            ),
        ]
        for res_type, res_id, body in bodies:
            entries.append(
                {
                    "resource": {"resourceType": res_type, "id": res_id, **body},
                    "request": {"method": "PUT", "url": f"{res_type}/{res_id}"},
                }
            )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def issue_tokens(database_url: str, fhir_base: str, cases: int) -> tuple[str, list[Case]]:
    """Create a user per party of each case and an admin (through the server's user store;
    they share one password hash, as the benchmark never logs in with a password: argon2 costs
    a quarter of a second a user here) and issue each a day-long access token; the admin's
    token and the cases (without ids yet)."""
    from fhir_server.auth import users as users_module
    from fhir_server.auth.secrets import hash_password
    from fhir_server.auth.tokens import TokenService
    from fhir_server.config import Settings
    from fhir_server.storage.engine import build_engine

    engine = build_engine(database_url)
    try:
        store = users_module.UserStore(engine)
        service = TokenService(engine, Settings(database_url=database_url))
        shared = hash_password(secrets.token_urlsafe(16))
        password = secrets.token_urlsafe(16)

        def user(username: str, role: str, **who: str) -> str:
            store.create(username=username, password=password, role=role, **who)
            fhir_user = f"PractitionerRole/{who['practitioner_role']}" if who else None
            return service.issue_access_token(
                client_id="bench",
                scopes="user/*.cruds",
                role=role,
                username=username,
                fhir_user=fhir_user,
                audience=fhir_base,
                lifetime=86400,
                **who,
            )

        with mock.patch.object(users_module, "hash_password", lambda _password: shared):
            admin = user("bench-admin", "admin")
            out = []
            for i in range(cases):
                org, rq, pv, _ = _ids(i)
                requester = user(
                    f"bench-rq-{i}", "requester", organization=org, practitioner_role=rq
                )
                provider = user(f"bench-pv-{i}", "provider", practitioner_role=pv)
                out.append(Case(i, requester, provider))
        return admin, out
    finally:
        engine.dispose()


def _check(response: httpx.Response, expected: int, what: str) -> dict[str, Any]:
    if response.status_code != expected:
        raise RuntimeError(
            f"{what}: {response.status_code}, not {expected}: {response.text[:1500]}"
        )
    return response.json()


def _parameters(**values: Any) -> dict[str, Any]:
    params = []
    for name, value in values.items():
        if name == "provider":
            params.append({"name": name, "valueReference": {"reference": value}})
        else:
            params.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": params}


def chat_subscription(sr_id: str) -> dict[str, Any]:
    """A topic-based websocket Subscription on the chat of case ``sr_id`` (id-only)."""
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [f"{BACKPORT}backport-subscription"]},
        "status": "requested",
        "reason": "bench",
        "criteria": CHAT_TOPIC,
        "_criteria": {
            "extension": [
                {
                    "url": f"{BACKPORT}backport-filter-criteria",
                    "valueString": f"Communication?based-on=ServiceRequest/{sr_id}",
                }
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


def chat_message(sr_id: str, text: str) -> bytes:
    """The body of a chat message on case ``sr_id``."""
    return orjson.dumps(
        {
            "resourceType": "Communication",
            "status": "completed",
            "basedOn": [{"reference": f"ServiceRequest/{sr_id}"}],
            "payload": [{"contentString": text}],
        }
    )


def _auth(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
    }


def open_case(http: httpx.Client, case: Case, admin: str) -> None:
    """Submit the case as its requester, assign it to its provider (admin), accept it
    (provider), subscribe both parties to its chat and get their binding tokens."""
    from fhir_server.codes import (
        CASE_CATEGORY_SECOND_OPINION,
        CASE_CATEGORY_SYSTEM,
        SPECIALTY_SYSTEM,
    )

    _, rq, pv, pt = _ids(case.index)
    request = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "category": [
            {"coding": [{"system": CASE_CATEGORY_SYSTEM, "code": CASE_CATEGORY_SECOND_OPINION}]}
        ],
        "code": {"coding": [{"system": SPECIALTY_SYSTEM, "code": "oncology"}]},
        "subject": {"reference": f"Patient/{pt}"},
        "requester": {"reference": f"PractitionerRole/{rq}"},
        "note": [{"text": "Is surgery needed?"}],
    }
    created = http.post("/fhir/ServiceRequest", json=request, headers=_auth(case.requester))
    case.sr_id = _check(created, 201, f"case {case.index}: POST ServiceRequest")["id"]
    found = http.get(
        "/fhir/Task",
        params={"focus": f"ServiceRequest/{case.sr_id}"},
        headers=_auth(case.requester),
    )
    tasks = [e["resource"] for e in _check(found, 200, "Task search").get("entry", [])]
    if len(tasks) != 1:
        raise RuntimeError(f"case {case.index}: {len(tasks)} case Tasks, not 1")
    case.task_id = tasks[0]["id"]
    base = f"/fhir/Task/{case.task_id}"
    assigned = http.post(
        f"{base}/$assign",
        json=_parameters(provider=f"PractitionerRole/{pv}"),
        headers=_auth(admin),
    )
    _check(assigned, 200, f"case {case.index}: $assign")
    accepted = http.post(f"{base}/$accept", json=_parameters(), headers=_auth(case.provider))
    _check(accepted, 200, f"case {case.index}: $accept")
    for party in (0, 1):
        token = case.token(party)
        sub = http.post(
            "/fhir/Subscription", json=chat_subscription(case.sr_id), headers=_auth(token)
        )
        body = _check(sub, 201, f"case {case.index}: POST Subscription")
        if body.get("status") != "active":
            raise RuntimeError(f"case {case.index}: Subscription is {body.get('status')}")
        case.subs.append(body["id"])
        binding = http.get(
            f"/fhir/Subscription/{body['id']}/$get-ws-binding-token", headers=_auth(token)
        )
        values = {
            p["name"]: next(v for k, v in p.items() if k != "name")
            for p in _check(binding, 200, "$get-ws-binding-token")["parameter"]
        }
        case.ws_tokens.append(values["token"])


def build_world(database_url: str, base_url: str, cases: int) -> tuple[str, list[Case]]:
    """The cases, ready to chat: their parties, Subscriptions and binding tokens."""
    status, answer = http_json("POST", base_url, directory_bundle(cases), timeout=SETUP_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"directory transaction failed with {status}: {str(answer)[:1500]}")
    admin, world = issue_tokens(database_url, base_url, cases)
    origin = base_url.removesuffix("/fhir")
    limits = httpx.Limits(max_connections=SETUP_CLIENTS, max_keepalive_connections=SETUP_CLIENTS)
    deadline = time.monotonic() + SETUP_TIMEOUT
    with (
        httpx.Client(base_url=origin, timeout=60.0, limits=limits) as http,
        ThreadPoolExecutor(SETUP_CLIENTS) as pool,
    ):
        futures = [pool.submit(open_case, http, case, admin) for case in world]
        for future in futures:
            future.result(timeout=max(1.0, deadline - time.monotonic()))
    return admin, world


# -- sending --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """One chat POST: its case, when it started and was answered, and the created message."""

    case: int
    t_start: float
    t_done: float
    status: int
    message_id: str = ""
    sent: float = float("nan")  # the server's ``sent`` stamp (epoch s)


def sender_plan(index: int, senders: int, cases: int) -> list[tuple[int, int]]:
    """The (case, party) pairs sender ``index`` posts as, in turn: its own cases (every
    ``senders``-th one), the requester's side, then the provider's."""
    own = list(range(index, cases, senders)) or [index % cases]
    return [(c, party) for party in (0, 1) for c in own]


def run_senders(
    base_url: str,
    world: list[Case],
    *,
    senders: int,
    rate: float,
    duration: float,
    tag: str,
) -> tuple[list[Sent], float]:
    """Post chat messages on schedule from ``senders`` threads; all POSTs and the moment the
    schedule started (time.monotonic)."""
    origin = base_url.removesuffix("/fhir")
    bodies = {c.index: c.sr_id for c in world}
    results: list[list[Sent]] = [[] for _ in range(senders)]
    failures: list[BaseException] = []
    ready = threading.Barrier(senders + 1, timeout=60)
    start = {"t0": 0.0}

    def body(i: int) -> None:
        plan = sender_plan(i, senders, len(world))
        out = results[i]
        try:
            with httpx.Client(base_url=origin, timeout=REQUEST_TIMEOUT) as http:
                http.get("/fhir/metadata")  # the keep-alive connection, before the clock
                headers = [_auth(world[c].token(party)) for c, party in plan]
                ready.wait()
                t0 = start["t0"]
                end = t0 + duration
                k = 0
                while True:
                    when = t0 + (i + k * senders) / rate
                    if when >= end or time.monotonic() >= end:
                        break  # the window is over (a sender behind drops its backlog)
                    pause = when - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    slot = k % len(plan)
                    case = plan[slot][0]
                    payload = chat_message(bodies[case], f"bench {tag} message {i}-{k}")
                    t_start = time.monotonic()
                    try:
                        response = http.post(
                            "/fhir/Communication", content=payload, headers=headers[slot]
                        )
                    except httpx.HTTPError:
                        out.append(Sent(case, t_start, time.monotonic(), 0))
                        k += 1
                        continue
                    t_done = time.monotonic()
                    if response.status_code == 201:
                        created = orjson.loads(response.content)
                        out.append(
                            Sent(
                                case,
                                t_start,
                                t_done,
                                201,
                                created["id"],
                                _epoch(created["sent"]),
                            )
                        )
                    else:
                        out.append(Sent(case, t_start, t_done, response.status_code))
                    k += 1
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            failures.append(exc)
            ready.abort()

    threads = [
        threading.Thread(target=body, args=(i,), name=f"sender-{i}", daemon=True)
        for i in range(senders)
    ]
    for thread in threads:
        thread.start()
    start["t0"] = time.monotonic() + 0.2
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(f"sender setup failed: {failures[:1]!r}") from None
    give_up = start["t0"] + duration + REQUEST_TIMEOUT + 30
    for thread in threads:
        thread.join(timeout=max(0.1, give_up - time.monotonic()))
    if failures:
        raise RuntimeError(f"a sender failed: {failures[0]!r}")
    return [s for own in results for s in own], start["t0"]


def warm_up(base_url: str, world: list[Case], subscribers: Subscribers) -> tuple[set[str], float]:
    """One message per case (as its requester), each worker's paths warmed, every socket
    checked: waits until all their notifications arrived; (the messages' ids, seconds)."""
    origin = base_url.removesuffix("/fhir")
    t0 = time.monotonic()
    before = subscribers.count()

    def post(case: Case) -> str:
        with httpx.Client(base_url=origin, timeout=REQUEST_TIMEOUT) as http:
            response = http.post(
                "/fhir/Communication",
                content=chat_message(case.sr_id, "warm-up"),
                headers=_auth(case.requester),
            )
            return str(_check(response, 201, f"case {case.index}: warm-up chat message")["id"])

    with ThreadPoolExecutor(SETUP_CLIENTS) as pool:
        ids = set(pool.map(post, world))
    expected = before + 2 * len(world)
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while (got := subscribers.count()) < expected:
        if time.monotonic() > deadline:
            print(
                f"warning: warm-up: only {got - before} of {2 * len(world)} notifications "
                f"arrived within {WARMUP_TIMEOUT:.0f} s",
                file=sys.stderr,
            )
            break
        time.sleep(0.1)
    return ids, time.monotonic() - t0


# -- the baseline: raw LISTEN/NOTIFY --------------------------------------------------------


@dataclass
class Latencies:
    """Sorted latencies in milliseconds."""

    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Latencies:
        """From unsorted values."""
        return cls(sorted(values))

    def p(self, q: float) -> float | None:
        """The ``q`` percentile (``None`` when empty)."""
        return percentile(self.values, q) if self.values else None


@dataclass
class Baseline:
    """The LISTEN/NOTIFY round trip at the chat's rate."""

    sent: int
    received: int
    seconds: float
    from_commit: Latencies
    from_start: Latencies
    cpu: CpuShares | None = None

    @property
    def rate(self) -> float:
        """NOTIFYs committed per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def listen_notify_baseline(dsn: str, rate: float, duration: float) -> Baseline:
    """One connection LISTENing, another doing ``NOTIFY`` in a committed transaction on a
    fixed schedule of ``rate`` per second for ``duration`` seconds."""
    import psycopg

    count = max(1, int(rate * duration))
    arrived: dict[int, float] = {}
    listening = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def listen() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"LISTEN {BASELINE_CHANNEL}")
                listening.set()
                give_up = time.monotonic() + duration + 30
                while len(arrived) < count and not done.is_set():
                    remaining = give_up - time.monotonic()
                    if remaining <= 0:
                        break
                    for note in conn.notifies(timeout=min(0.5, remaining)):
                        arrived[int(note.payload)] = time.monotonic()
                        if len(arrived) >= count:
                            break
        except BaseException as exc:
            errors.append(exc)
            listening.set()

    listener = threading.Thread(target=listen, name="listen", daemon=True)
    listener.start()
    if not listening.wait(30) or errors:
        raise RuntimeError(f"the LISTEN connection failed: {errors[:1]!r}")
    stamps: list[tuple[float, float]] = []
    watch = CpuWatch({"postgres": lambda: backend_pids(dsn)})
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        watch.start()
        t0 = time.monotonic() + 0.05
        for k in range(count):
            pause = t0 + k / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            t_start = time.monotonic()
            conn.execute("SELECT pg_notify(%s, %s)", (BASELINE_CHANNEL, str(k)))
            conn.commit()
            stamps.append((t_start, time.monotonic()))
        seconds = time.monotonic() - t0
        cpu = watch.stop()
    deadline = time.monotonic() + 10
    while len(arrived) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    listener.join(timeout=5)
    from_commit = [(arrived[k] - stamps[k][1]) * 1000 for k in range(count) if k in arrived]
    from_start = [(arrived[k] - stamps[k][0]) * 1000 for k in range(count) if k in arrived]
    return Baseline(
        count,
        len(from_commit),
        seconds,
        Latencies.of(from_commit),
        Latencies.of(from_start),
        cpu,
    )


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Figures:
    """Everything the report prints."""

    cases: int = 0
    setup_seconds: float = 0.0
    bound: int = 0
    warmup_seconds: float = 0.0
    posts: int = 0
    created: int = 0
    post_errors: Counter[int] = field(default_factory=Counter)
    send_seconds: float = 0.0
    post_latency: Latencies = field(default_factory=lambda: Latencies([]))
    expected: int = 0
    received: int = 0
    duplicates: int = 0
    unexpected: int = 0
    drain_seconds: float = 0.0
    from_response: Latencies = field(default_factory=lambda: Latencies([]))
    from_start: Latencies = field(default_factory=lambda: Latencies([]))
    stage_dispatch: Latencies = field(default_factory=lambda: Latencies([]))
    stage_hub: Latencies = field(default_factory=lambda: Latencies([]))
    stage_socket: Latencies = field(default_factory=lambda: Latencies([]))
    frames: int = 0
    events_per_frame: float = 0.0
    frame_kinds: dict[str, int] = field(default_factory=dict)
    closed_by_server: int = 0
    cpu: CpuShares | None = None
    senders_cpu: float = 0.0
    baseline: Baseline | None = None
    environment: str = ""

    @property
    def rate(self) -> float:
        """Messages created per second."""
        return self.created / self.send_seconds if self.send_seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        """Notifications expected but not received."""
        return self.expected - self.received


def _environment(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'} at 127.0.0.1:5432; {machine_state()}"


def match(sent: list[Sent], events: list[Received], figures: Figures, warm_ids: set[str]) -> None:
    """Fill ``figures`` with the delivery counts and latencies of ``sent`` messages (events
    of the warm-up messages ``warm_ids`` are left out; any other unknown one is counted)."""
    by_id = {s.message_id: s for s in sent if s.status == 201}
    seen: set[tuple[int, str]] = set()
    from_response, from_start, dispatch, hub, sock = [], [], [], [], []
    for event in events:
        message = by_id.get(event.message_id)
        if message is None or event.socket // 2 != message.case:
            if event.message_id not in warm_ids:
                figures.unexpected += 1
            continue
        key = (event.socket, event.message_id)
        if key in seen:
            figures.duplicates += 1
            continue
        seen.add(key)
        from_response.append((event.t_mono - message.t_done) * 1000)
        from_start.append((event.t_mono - message.t_start) * 1000)
        dispatch.append((event.queued - message.sent) * 1000)
        hub.append((event.built - event.queued) * 1000)
        sock.append((event.t_wall - event.built) * 1000)
    figures.expected = 2 * len(by_id)
    figures.received = len(seen)
    figures.from_response = Latencies.of(from_response)
    figures.from_start = Latencies.of(from_start)
    figures.stage_dispatch = Latencies.of(dispatch)
    figures.stage_hub = Latencies.of(hub)
    figures.stage_socket = Latencies.of(sock)


def run(args: argparse.Namespace) -> Figures:
    """Set everything up, measure, tear everything down; returns the figures."""
    fig = Figures(cases=args.subscribers // 2)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(prefix="mso_bench_chat", keep=args.keep))
        dsn = psycopg_dsn(url)
        print(f"Database: {url}")
        fig.environment = _environment(dsn)
        print(f"Environment: {fig.environment}")
        with contextlib.ExitStack() as serving:
            t0 = time.monotonic()
            server = serving.enter_context(
                running_server(url, workers=args.workers, extra_env=args.server_env)
            )
            print(
                f"Server: {server.base_url} ({args.workers} workers, "
                f"ready in {time.monotonic() - t0:.1f} s)"
            )
            t0 = time.monotonic()
            _, world = build_world(url, server.base_url, fig.cases)
            tokens = [t for case in world for t in case.ws_tokens]
            subscribers = Subscribers(server.base_url.replace("http", "ws", 1) + "/websocket",
                                      tokens, timeout=30.0)  # fmt: skip
            serving.callback(subscribers.close)
            fig.bound, failures = subscribers.ready(timeout=SETUP_TIMEOUT)
            if fig.bound != len(tokens):
                raise RuntimeError(
                    f"{len(tokens) - fig.bound} of {len(tokens)} sockets could not be bound: "
                    + "; ".join(failures)
                )
            fig.setup_seconds = time.monotonic() - t0
            print(
                f"World: {fig.cases} cases, {len(tokens)} Subscriptions, {fig.bound} sockets "
                f"bound in {fig.setup_seconds:.1f} s"
            )
            warm_ids, fig.warmup_seconds = warm_up(server.base_url, world, subscribers)
            warm = len(warm_ids)
            print(f"Warm-up: {warm} messages, all notifications in {fig.warmup_seconds:.1f} s")

            watch = CpuWatch(
                {
                    "server": lambda: process_tree(server.pid),
                    "postgres": lambda: backend_pids(dsn),
                    "subscribers": lambda: [subscribers.pid],
                }
            )
            print(
                f"Sending: {args.senders} senders, {args.rate:g} messages/s for "
                f"{args.duration:g} s ...",
                flush=True,
            )
            watch.start()
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
            sent, started = run_senders(
                server.base_url,
                world,
                senders=args.senders,
                rate=args.rate,
                duration=args.duration,
                tag="run",
            )
            usage1 = resource.getrusage(resource.RUSAGE_SELF)
            fig.cpu = watch.stop()
            elapsed = max(time.monotonic() - started, 1e-9)
            fig.senders_cpu = (
                usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
            ) / elapsed
            created = [s for s in sent if s.status == 201]
            fig.posts, fig.created = len(sent), len(created)
            fig.post_errors = Counter(s.status for s in sent if s.status != 201)
            last = max((s.t_done for s in sent), default=started)
            fig.send_seconds = max(args.duration, last - started)
            fig.post_latency = Latencies.of([(s.t_done - s.t_start) * 1000 for s in sent])
            print(f"  {fig.created:,} messages in {fig.send_seconds:.1f} s; draining ...")

            # the drain: until every notification came, or --drain seconds
            baseline_count = 2 * warm
            wanted = baseline_count + 2 * fig.created
            drain_end = time.monotonic() + args.drain
            t_drain = time.monotonic()
            while subscribers.count() < wanted and time.monotonic() < drain_end:
                time.sleep(0.05)
            fig.drain_seconds = time.monotonic() - t_drain
            events, stats = subscribers.stop()
            fig.frames = int(stats["frames"])
            fig.frame_kinds = dict(stats["kinds"])
            fig.closed_by_server = int(stats["closed_by_server"])
            notifying = fig.frame_kinds.get("event-notification", 0)
            fig.events_per_frame = len(events) / notifying if notifying else 0.0
            match(sent, events, fig, warm_ids)
            print(
                f"  {fig.received:,} of {fig.expected:,} notifications "
                f"(drained {fig.drain_seconds:.1f} s)"
            )
        if not args.no_baseline:
            seconds = args.baseline_duration
            print(f"Baseline: LISTEN/NOTIFY at {args.rate:g}/s for {seconds:g} s ...", flush=True)
            fig.baseline = listen_notify_baseline(dsn, args.rate, seconds)
    return fig


# -- the report -------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "-"
    return fmt_ratio(value / base)


def _server_share(cpu: CpuShares | None) -> str:
    if cpu is None or "server" not in cpu.groups:
        return "-"
    split = "+".join(f"{x * 100:.0f}" for x in cpu.busiest("server"))
    total = fmt_share(cpu.groups["server"])
    return f"{total} ({split})" if split else total


def _others(cpu: CpuShares | None, senders: float) -> float | None:
    """CPU of everything else on the machine (other users' work), in shares of one core."""
    if cpu is None:
        return None
    ours = sum(cpu.groups.values()) + senders
    return max(0.0, cpu.machine_busy * (os.cpu_count() or 1) - ours)


def report(fig: Figures, args: argparse.Namespace) -> str:
    """The printed result: throughput, delivery, latency against the baseline, CPU."""
    b = fig.baseline
    out = [
        f"Chat benchmark: {args.subscribers} websocket subscribers ({fig.cases} cases x 2 "
        f"parties), {args.senders} senders, target {args.rate:g} messages/s for "
        f"{args.duration:g} s, {args.workers} server workers (latencies in ms)"
        + "".join(f", {k}={v}" for k, v in args.server_env.items()),
        f"Environment: {fig.environment}",
        "",
    ]
    errors = ", ".join(f"{n} x {code or 'no answer'}" for code, n in fig.post_errors.items())
    rows = [
        ["messages/s target", fmt_rate(args.rate), fmt_rate(args.rate) if b else "-"],
        ["messages/s achieved", f"{fig.rate:,.1f}", f"{b.rate:,.1f}" if b else "-"],
        ["messages sent (201) / failed", f"{fig.created:,} / {fig.posts - fig.created:,}", "-"],
        ["notifications expected", f"{fig.expected:,}", f"{b.sent:,}" if b else "-"],
        ["notifications received", f"{fig.received:,}", f"{b.received:,}" if b else "-"],
        ["lost (after drain)", f"{fig.lost:,}", f"{b.sent - b.received:,}" if b else "-"],
        ["duplicates", f"{fig.duplicates:,}", "-"],
    ]
    out.append(format_table(["figure", "chat", "LISTEN/NOTIFY"], rows, align="lrr"))
    if errors:
        out += ["", f"Failed chat POSTs: {errors}."]
    out += [
        "",
        "Delivery latency, commit -> notification received (chat: frame on the websocket; "
        "LISTEN/NOTIFY: notification on the listening connection):",
        "",
    ]
    lat_rows = []
    for q in (50, 95, 99):
        chat, base = fig.from_response.p(q), b.from_commit.p(q) if b else None
        lat_rows.append(
            [
                f"p{q}",
                fmt_ms(chat),
                fmt_ms(fig.from_start.p(q)),
                fmt_ms(base),
                _ratio(chat, base),
                fmt_ms(fig.post_latency.p(q)),
            ]
        )
    out.append(
        format_table(
            [
                "",
                "chat from 201",
                "chat from request",
                "LISTEN/NOTIFY",
                "ratio",
                "chat POST",
            ],
            lat_rows,
            align="lrrrrr",
        )
    )
    out += [
        "",
        "chat from 201: from the POST's response (the commit is before it: a lower bound); from "
        "request: from the POST's start (an upper bound). LISTEN/NOTIFY: from the return of the "
        "COMMIT. ratio = chat from 201 / LISTEN/NOTIFY. chat POST: the POST's own latency.",
        "",
        "Where the chat latency goes (server stamps, wall clock, 1 ms resolution):",
        "",
    ]
    stages = [
        ("message sent -> event queued (dispatcher)", fig.stage_dispatch),
        ("event queued -> Bundle built (websocket hub)", fig.stage_hub),
        ("Bundle built -> frame received (socket, client)", fig.stage_socket),
    ]
    stage_rows = [[name, *(fmt_ms(s.p(q)) for q in (50, 95, 99))] for name, s in stages]
    out.append(format_table(["stage", "p50", "p95", "p99"], stage_rows, align="lrrr"))
    kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(fig.frame_kinds.items()))
    out += [
        "",
        f"Frames: {fig.frames:,} ({kinds}); {fig.events_per_frame:.2f} events per notification "
        f"frame; {fig.closed_by_server} sockets closed by the server during the run. Unmatched "
        f"events: {fig.unexpected}.",
        "",
        "CPU while sending, in % of one core (machine: "
        f"{os.cpu_count()} CPUs; 'machine' = all CPUs busy, in % of the machine; 'others' = "
        "busy CPU not used by the benchmark, its server or its database):",
        "",
    ]
    cpu = fig.cpu
    cpu_rows = [
        [
            fmt_share(fig.senders_cpu),
            fmt_share(cpu.groups.get("subscribers") if cpu else None),
            _server_share(cpu),
            fmt_share(cpu.groups.get("postgres") if cpu else None),
            f"{cpu.machine_busy * 100:.0f}%" if cpu else "-",
            fmt_share(_others(cpu, fig.senders_cpu)),
            fmt_share(b.cpu.groups.get("postgres") if b and b.cpu else None),
        ]
    ]
    out.append(
        format_table(
            [
                "senders (client)",
                "subscribers (client)",
                "server (per process)",
                "postgres",
                "machine",
                "others",
                "baseline postgres",
            ],
            cpu_rows,
            align="rrrrrrr",
        )
    )
    p95 = fig.from_response.p(95)
    ok_rate = fig.rate >= 0.95 * TARGET_RATE
    out += [
        "",
        f"Target (information only): p95 < {TARGET_P95:g} ms at {TARGET_RATE:g} messages/s, "
        f"0 lost: p95 {fmt_ms(p95)} ms at {fig.rate:,.0f}/s, {fig.lost:,} lost -> "
        + (
            "PASS"
            if p95 is not None and p95 < TARGET_P95 and fig.lost == 0 and ok_rate
            else "below"
        ),
    ]
    if fig.lost:
        out += [
            "",
            f"WARNING: {fig.lost:,} notifications did not arrive within {args.drain:g} s "
            "after the last message.",
        ]
    return "\n".join(out)


# -- options --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m bench chat``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench chat",
        description="Chat messages to websocket subscribers: rate, delivery latency and losses, "
        "against the raw PostgreSQL LISTEN/NOTIFY round trip.",
    )
    parser.add_argument(
        "--subscribers", type=int, default=200, help="websockets, two per case (200)"
    )
    parser.add_argument("--senders", type=int, default=50, help="sending threads (50)")
    parser.add_argument(
        "--rate", type=float, default=500.0, help="target messages per second in total (500)"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sending (20)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (2)")
    parser.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="seconds after the sending for the last notifications (5)",
    )
    parser.add_argument(
        "--baseline-duration",
        type=float,
        default=None,
        help="seconds of the LISTEN/NOTIFY baseline (default: --duration, at most 10)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the server, e.g. MSO_SUBSCRIPTION_ROUND_GAP=0.05 (repeatable)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip LISTEN/NOTIFY")
    parser.add_argument("--keep", action="store_true", help="do not drop the fresh database")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 2 <= args.subscribers <= MAX_SUBSCRIBERS or args.subscribers % 2:
        parser.error(f"--subscribers must be even and within 2..{MAX_SUBSCRIBERS}")
    if not 1 <= args.senders <= MAX_SENDERS:
        parser.error(f"--senders must be within 1..{MAX_SENDERS}")
    if not 1 <= args.rate <= MAX_RATE:
        parser.error(f"--rate must be within 1..{MAX_RATE:g}")
    if not 1 <= args.duration <= MAX_DURATION:
        parser.error(f"--duration must be within 1..{MAX_DURATION:g} seconds")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be within 1..16")
    if not 0 <= args.drain <= 120:
        parser.error("--drain must be within 0..120 seconds")
    args.server_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MSO_"):
            parser.error(f"--env takes MSO_NAME=VALUE, not {item!r}")
        args.server_env[name] = value
    if args.baseline_duration is None:
        args.baseline_duration = min(args.duration, 10.0)
    if not 1 <= args.baseline_duration <= MAX_DURATION:
        parser.error(f"--baseline-duration must be within 1..{MAX_DURATION:g} seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    """``python -m bench chat [options]``: run the benchmark and print its tables."""
    return run_benchmark(
        _parse_args(argv), run, report, stopped="server stopped and database cleaned up"
    )


if __name__ == "__main__":
    sys.exit(main())
