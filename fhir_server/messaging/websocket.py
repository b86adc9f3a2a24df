"""The Subscription websocket channel at ``[server]/fhir/websocket`` (the URL the
CapabilityStatement publishes in its ``capabilitystatement-websocket`` extension).

A client connects and binds Subscriptions whose channel is ``websocket`` and that it owns:

* R4 (http://hl7.org/fhir/R4/subscription.html#2.46.7.2): with an ``Authorization: Bearer``
  header on the upgrade request, it sends ``bind <id>``; the server answers ``bound <id>`` and
  then sends ``ping <id>`` for each notification;
* Backport IG 1.1.0: it sends ``bind-with-token <token>`` (a token from
  ``$get-ws-binding-token``, :mod:`.ws_binding`; no header needed, as in a browser); the
  server answers a ``handshake`` notification Bundle per Subscription, then
  ``event-notification`` Bundles (:mod:`.notification_bundle`) and, where the channel asks for a
  ``backport-heartbeat-period``, ``heartbeat`` Bundles when nothing else was sent for that long.

A client with a socket open counts as online (the ``on_present`` callback, the same presence as
an API request's), so the chat sends it no e-mail while it is connected.

``unbind <id>`` stops a binding (``unbound <id>``). Any other frame, a binary frame, or a bind
that is refused (unknown Subscription, not the caller's, not a websocket channel, not active)
gets an error frame — an OperationOutcome in JSON — and the connection stays open. A failed
authentication closes it (1008).

The socket may be held by any process of the deployment: the dispatcher queues websocket
notifications in the database, and each process's hub reads the new ones (a watermark on the
queue's ids, which commit in order: one dispatcher at a time) when woken — a NOTIFY on
PostgreSQL (:mod:`fhir_server.storage.wakeups`), a call on SQLite — or every second. Before
sending, it checks for all the round's Subscriptions at once that they still listen and their
owners' tokens are still honoured (a revoked token or a disabled user hears nothing more); the
owner's access to each focus was checked by the dispatcher when it queued the event, and is
checked again for an event queued more than :data:`FRESH_SECONDS` ago (:mod:`.deliveries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from fhir_server.auth.principal import Principal
from fhir_server.fhir.outcome import FhirError
from fhir_server.messaging import ws_binding
from fhir_server.messaging.deliveries import (
    Listening,
    events_total,
    listening,
    listening_among,
    read_as,
    readable_ids,
)
from fhir_server.messaging.notification_bundle import Event, notification_bundle
from fhir_server.messaging.subscriptions import BACKPORT, WEBSOCKET
from fhir_server.storage.records import ID_PATTERN, as_utc, utc_now
from fhir_server.storage.subscription_schema import subscription_delivery

if TYPE_CHECKING:
    from fhir_server.auth.tokens import TokenService
    from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

PATH = "/fhir/websocket"
HEARTBEAT_PERIOD = f"{BACKPORT}backport-heartbeat-period"
_TICK = 1.0  # seconds between two looks without a wake-up (and heartbeat resolution)
_READ_LIMIT = 2000
FRESH_SECONDS = 5.0
"""Events queued this recently are sent without checking the owner's access again."""
_d = subscription_delivery.c


@dataclass(eq=False)
class _Client:
    """One open socket: who is on it, its bindings, and when each last heard something."""

    socket: WebSocket
    base: str
    principal: Principal | None
    r4: set[str] = field(default_factory=set)
    backport: set[str] = field(default_factory=set)
    last_sent: dict[str, float] = field(default_factory=dict)
    heartbeats: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)  # events up to this number not sent
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    sub_id: str
    event: Event


class WebsocketHub:
    """The websocket endpoint and its pump of notifications to bound sockets."""

    def __init__(
        self,
        repo: Repository,
        tokens: TokenService,
        on_present: Callable[[Principal], None] | None = None,
    ) -> None:
        self.repo = repo
        self.tokens = tokens
        self.on_present = on_present
        self._clients: dict[str, set[_Client]] = defaultdict(set)  # by Subscription id
        self._connected: set[_Client] = set()
        self._presence_swept = 0.0
        self._delivering = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._watermark = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pump on the running loop (from the application's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._task = asyncio.create_task(self._pump(), name="websocket-hub")

    async def stop(self) -> None:
        """Stop the pump and close the sockets."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in {c for clients in self._clients.values() for c in clients}:
            with contextlib.suppress(Exception):
                await client.socket.close(code=1001)
        self._clients.clear()

    def wake(self) -> None:
        """Look for new notifications now (thread-safe: called from the wake-up listener)."""
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    # -- one connection ---------------------------------------------------------------------

    async def handle(self, socket: WebSocket) -> None:
        """Serve one websocket connection until the client leaves."""
        await socket.accept()
        base = _http_base(socket)
        principal = None
        header = socket.headers.get("authorization")
        if header:
            try:
                principal = await run_in_threadpool(self.tokens.authenticate, header, audience=base)
            except FhirError as err:
                await _send_error(socket, err.message, "login")
                await socket.close(code=1008)
                return
        client = _Client(socket, base, principal)
        self._connected.add(client)
        self._present(client)
        try:
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    await self._error(client, "Binary frames are not understood")
                    continue
                await self._command(client, text.strip())
        except WebSocketDisconnect:
            pass
        finally:
            self._connected.discard(client)
            for sub_id in client.r4 | client.backport:
                self._unbind(client, sub_id)

    async def _command(self, client: _Client, text: str) -> None:
        verb, _, argument = text.partition(" ")
        argument = argument.strip()
        is_id = bool(ID_PATTERN.fullmatch(argument))
        if verb == "bind" and is_id:
            await self._bind(client, argument)
        elif verb == "bind-with-token" and argument:
            await self._bind_with_token(client, argument)
        elif verb == "unbind" and is_id:
            self._unbind(client, argument)
            await self._send(client, f"unbound {argument}")
        else:
            await self._error(
                client,
                "Not understood: send 'bind <id>', 'bind-with-token <token>' or 'unbind <id>'",
            )

    async def _bind(self, client: _Client, sub_id: str) -> None:
        if client.principal is None:
            await self._error(
                client,
                "'bind' needs an Authorization header on the connection; "
                "without one use 'bind-with-token'",
                "login",
            )
            return
        sub = await run_in_threadpool(ws_binding.bindable, self.repo, client.principal, sub_id)
        if isinstance(sub, str):
            await self._error(client, sub)
            return
        await self._register(client, sub_id, client.r4)
        await self._send(client, f"bound {sub_id}")

    async def _bind_with_token(self, client: _Client, token: str) -> None:
        binding = await run_in_threadpool(ws_binding.redeem, self.repo, token)
        if binding is None:
            await self._error(client, "The binding token is unknown or expired", "login")
            return
        if client.principal is None:
            client.principal = binding.principal
            self._present(client)
        for sub_id in binding.subs:
            sub = await run_in_threadpool(ws_binding.bindable, self.repo, binding.principal, sub_id)
            if isinstance(sub, str):
                await self._error(client, sub)
                continue
            total = await self._register(client, sub_id, client.backport)
            period = _heartbeat_period(sub.body)
            if period:
                client.heartbeats[sub_id] = period
            bundle = notification_bundle(
                client.base, sub_id, sub.body, sub.spec, "handshake", total
            )
            await self._send(client, orjson.dumps(bundle).decode())

    async def _register(self, client: _Client, sub_id: str, kind: set[str]) -> int:
        """Bind ``sub_id`` to the client: it hears the events after the Subscription's count
        now (the earlier ones are ``$events``' to give; the handshake names the count). No
        round runs meanwhile, so no event falls between the count and the binding."""
        async with self._delivering:
            if not self._clients:  # the first binding after none: skip what nobody heard
                self._watermark = await run_in_threadpool(self._max_id)
            total = await run_in_threadpool(self._events_total, sub_id)
            kind.add(sub_id)
            client.after[sub_id] = total
            client.last_sent[sub_id] = time.monotonic()
            self._clients[sub_id].add(client)
        return total

    def _unbind(self, client: _Client, sub_id: str) -> None:
        client.r4.discard(sub_id)
        client.backport.discard(sub_id)
        clients = self._clients.get(sub_id)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._clients[sub_id]

    def _events_total(self, sub_id: str) -> int:
        with self.repo.engine.connect() as conn:
            return events_total(conn, sub_id)

    # -- the pump ----------------------------------------------------------------------------

    async def _pump(self) -> None:
        assert self._event is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=_TICK)
            self._event.clear()
            try:
                async with self._delivering:
                    await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: logged, the next round tries again
                log.exception("Websocket notification round failed")

    def _present(self, client: _Client) -> None:
        if self.on_present is not None and client.principal is not None:
            self.on_present(client.principal)

    async def _round(self) -> None:
        if time.monotonic() - self._presence_swept >= _TICK:
            self._presence_swept = time.monotonic()
            for client in self._connected:  # still here: still online
                self._present(client)
        if not self._clients:
            return  # nothing bound here: the queue is not this process's business now
        rows = await run_in_threadpool(self._read_new)
        by_sub: dict[str, list[_Row]] = defaultdict(list)
        for row in rows:
            if row.sub_id in self._clients:
                by_sub[row.sub_id].append(row)
        if by_sub:
            checked = await run_in_threadpool(self._deliverable, by_sub)
            await asyncio.gather(*(self._deliver(sub, *found) for sub, *found in checked))
        await self._heartbeats()

    def _read_new(self) -> list[_Row]:
        """The websocket notifications queued since the last look (all of them: which are for
        this process's sockets is decided in memory)."""
        with self.repo.engine.connect() as conn:
            found = conn.execute(
                select(_d.id, _d.sub_id, _d.event_no, _d.created, _d.res_type, _d.res_id)
                .where(_d.id > self._watermark, _d.channel == WEBSOCKET)
                .order_by(_d.id)
                .limit(_READ_LIMIT)
            ).all()
        if found:
            self._watermark = int(found[-1].id)
            if len(found) == _READ_LIMIT:
                self.wake()  # more are waiting
        return [
            _Row(
                int(r.id), r.sub_id, Event(int(r.event_no), as_utc(r.created), r.res_type, r.res_id)
            )
            for r in found
        ]

    def _max_id(self) -> int:
        with self.repo.engine.connect() as conn:
            return int(conn.execute(select(func.max(_d.id))).scalar() or 0)

    async def _deliver(
        self,
        sub: Listening,
        events: list[Event],
        resources: dict[tuple[str, str], dict[str, Any]],
    ) -> None:
        sub_id = sub.sub_id
        for client in list(self._clients.get(sub_id, ())):
            news = [e for e in events if e.number > client.after.get(sub_id, 0)]
            if not news:
                continue
            if sub_id in client.r4:
                for _event in news:
                    await self._send(client, f"ping {sub_id}")
            if sub_id in client.backport:
                bundle = notification_bundle(
                    client.base, sub_id, sub.body, sub.spec, "event-notification",
                    news[-1].number, news, resources,
                )  # fmt: skip
                await self._send(client, orjson.dumps(bundle).decode())
            client.last_sent[sub_id] = time.monotonic()

    def _deliverable(
        self, by_sub: dict[str, list[_Row]]
    ) -> list[tuple[Listening, list[Event], dict[tuple[str, str], dict[str, Any]]]]:
        """For each Subscription with new rows that still listens (its owner still enabled:
        one query for all), the events to send and, for full-resource content, the resources
        as the owner reads them. The dispatcher queued each event after checking the owner's
        access a moment ago; an event queued more than :data:`FRESH_SECONDS` ago (a backlog)
        has it checked again."""
        out = []
        stale_before = utc_now() - timedelta(seconds=FRESH_SECONDS)
        for sub_id, sub in listening_among(self.repo, by_sub.keys()).items():
            rows = by_sub[sub_id]
            stale: dict[str, set[str]] = defaultdict(set)
            for row in rows:
                if row.event.at < stale_before:
                    stale[row.event.res_type].add(row.event.res_id)
            gone = {
                (res_type, res_id)
                for res_type, ids in stale.items()
                for res_id in ids - readable_ids(self.repo, sub.owner, res_type, ids)
            }
            events = [r.event for r in rows if (r.event.res_type, r.event.res_id) not in gone]
            if not events:
                continue
            resources = {}
            if sub.spec.content == "full-resource":
                resources = read_as(self.repo, sub.owner, [(e.res_type, e.res_id) for e in events])
                events = [e for e in events if (e.res_type, e.res_id) in resources]
                if not events:
                    continue
            out.append((sub, events, resources))
        return out

    async def _heartbeats(self) -> None:
        now = time.monotonic()
        due: list[tuple[_Client, str, int]] = []
        for sub_id, clients in self._clients.items():
            for client in clients:
                period = client.heartbeats.get(sub_id)
                if period and now - client.last_sent.get(sub_id, now) >= period:
                    due.append((client, sub_id, period))
        for client, sub_id, _period in due:
            sub = await run_in_threadpool(listening, self.repo, sub_id)
            if sub is None:
                continue
            total = await run_in_threadpool(self._events_total, sub_id)
            bundle = notification_bundle(
                client.base, sub_id, sub.body, sub.spec, "heartbeat", total
            )
            await self._send(client, orjson.dumps(bundle).decode())
            client.last_sent[sub_id] = time.monotonic()

    # -- frames -------------------------------------------------------------------------------

    async def _send(self, client: _Client, text: str) -> None:
        if client.socket.application_state is not WebSocketState.CONNECTED:
            return
        async with client.lock:
            with contextlib.suppress(Exception):  # the client left: its handler cleans up
                await client.socket.send_text(text)

    async def _error(self, client: _Client, message: str, code: str = "invalid") -> None:
        await _send_error(client.socket, message, code, client.lock)


async def _send_error(
    socket: WebSocket, message: str, code: str = "invalid", lock: asyncio.Lock | None = None
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }
    async with lock or asyncio.Lock():
        with contextlib.suppress(Exception):
            await socket.send_text(orjson.dumps(outcome).decode())


def websocket_url(base_url: str) -> str:
    """The Subscription websocket URL of the FHIR server at ``base_url`` (ws or wss)."""
    scheme, sep, rest = base_url.rstrip("/").partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}{sep}{rest}/websocket"


def _heartbeat_period(body: dict[str, Any]) -> int | None:
    """The channel's ``backport-heartbeat-period`` in seconds, if it asks for heartbeats."""
    for e in (body.get("channel") or {}).get("extension") or ():
        if isinstance(e, dict) and e.get("url") == HEARTBEAT_PERIOD:
            value = e.get("valueUnsignedInt")
            return value if isinstance(value, int) and value > 0 else None
    return None


def _http_base(socket: WebSocket) -> str:
    """The FHIR base URL (http/https) of the server the socket came to."""
    scheme = "https" if socket.url.scheme == "wss" else "http"
    return f"{scheme}://{socket.url.netloc}/fhir"
