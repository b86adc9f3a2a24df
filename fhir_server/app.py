"""Application factory: ``create_app(settings)`` builds the engine, registries and routers.

Nothing is built at import time; ``app_from_env`` is the factory uvicorn workers call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket

from fhir_server import __version__
from fhir_server.audit.log import AuditLog
from fhir_server.auth.routes import router as auth_router
from fhir_server.auth.server import build_auth_server
from fhir_server.auth.tokens import TokenService
from fhir_server.bulk.worker import ExportWorker
from fhir_server.config import Settings
from fhir_server.dicomweb.bridge import build_bridge
from fhir_server.dicomweb.routes import build_router as dicomweb_router
from fhir_server.hooks import Hooks
from fhir_server.messaging.service import Messaging
from fhir_server.messaging.subscription_worker import SubscriptionWorker
from fhir_server.messaging.websocket import PATH as WEBSOCKET_PATH
from fhir_server.messaging.websocket import WebsocketHub
from fhir_server.rest.errors import install as install_error_handlers
from fhir_server.rest.fhir import FhirASGI, FhirEndpoint
from fhir_server.storage.blobs import BlobStore
from fhir_server.storage.cursors import cursor_key
from fhir_server.storage.wakeups import EVENTS, Wakeups
from fhir_server.wiring import build_repository
from fhir_server.workflow.appointments import Appointments
from fhir_server.workflow.billing import Billing
from fhir_server.workflow.events import CaseEvents
from fhir_server.workflow.feedback import Feedback
from fhir_server.workflow.guards import Guards, guard_table
from fhir_server.workflow.service import Workflow
from fhir_server.workflow.services import Services

__all__ = ["FrontDoor", "app_from_env", "build_services", "create_app"]


def build_services(
    settings: Settings, hooks: Hooks, blobs: BlobStore, events: CaseEvents
) -> Services:
    """The domain services on the application's one case-event bus ``events``, their guards
    registered at ``hooks``.

    Subscribers run in subscription order: notifications (subscribed by :class:`Messaging`,
    built before) see an event before billing does.
    """
    billing = Billing(events, currency=settings.currency)
    billing.subscribe()
    workflow = Workflow(settings=settings, events=events, blobs=blobs)
    guards = Guards(guard_table(workflow, Appointments(events), Feedback(events)))
    guards.install(hooks)
    return Services(events=events, workflow=workflow, billing=billing, guards=guards)


def create_app(settings: Settings | None = None) -> FrontDoor:
    """Build the FHIR server application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    repo = build_repository(settings)
    engine, hooks = repo.engine, repo.hooks
    blobs = BlobStore(settings.blob_path)
    tokens = TokenService(engine, settings)
    # read (or create) the cursor key now, not on a first search inside a write transaction
    cursor_key(engine)
    audit = AuditLog(repo)
    audit.register(hooks)
    events = CaseEvents()  # the one case-event bus of this application
    messaging = Messaging(engine, settings, events)
    services = build_services(settings, hooks, blobs, events)
    exports = ExportWorker(repo, settings)
    wakeups = Wakeups(engine)
    wakeups.follow_commits(hooks)
    notifications = SubscriptionWorker(repo, settings, wakeups)
    hub = WebsocketHub(repo, tokens, on_present=messaging.user_seen)
    wakeups.on(EVENTS, hub.wake)
    dicomweb = build_bridge(settings, repo, tokens=tokens, audit=audit)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        messaging.start()
        if settings.bulk_worker:
            exports.start()
        await hub.start()
        wakeups.start()
        if settings.subscription_worker:
            notifications.start()
        yield
        notifications.stop()
        wakeups.stop()
        await hub.stop()
        exports.stop()
        messaging.stop()
        await dicomweb.close()
        endpoint.close()
        audit.close()
        repo.dispose()

    app = FastAPI(
        title="MSO FHIR Server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.repo = repo
    app.state.hooks = hooks
    app.state.blobs = blobs
    app.state.auth = build_auth_server(engine, settings, tokens=tokens)
    app.include_router(auth_router)
    app.include_router(dicomweb_router(dicomweb))
    install_error_handlers(app)  # errors outside /fhir as OperationOutcomes
    app.state.tokens = tokens
    app.state.audit = audit
    app.state.messaging = messaging
    app.state.subscriptions = notifications
    app.state.websockets = hub
    app.state.wakeups = wakeups

    @app.websocket(WEBSOCKET_PATH)
    async def subscription_websocket(websocket: WebSocket) -> None:
        """The Subscription websocket channel (:mod:`fhir_server.messaging.websocket`)."""
        await hub.handle(websocket)

    app.state.services = services
    app.state.bulk = exports
    endpoint = FhirEndpoint(
        repo,
        settings,
        blobs,
        tokens=tokens,
        audit=audit,
        services=services,
        on_admit=messaging.user_seen,
    )
    return FrontDoor(app, FhirASGI(endpoint))


class FrontDoor:
    """The ASGI app uvicorn serves: FHIR requests go straight to the FHIR endpoint, the rest
    (and lifespan events) to the FastAPI application.

    The FHIR endpoint does its own routing, error handling and limits, so FastAPI's middleware
    stack in front of it would only add cost to every FHIR request. ``/fhir/.well-known/*``
    (SMART discovery relative to the FHIR base) is served by the authorization server routes.
    """

    def __init__(self, app: FastAPI, fhir: FhirASGI) -> None:
        self.app = app
        self.fhir = fhir
        self.state = app.state

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        """Dispatch one ASGI event."""
        if scope["type"] == "http":
            path = scope["path"]
            if (path == "/fhir" or path.startswith("/fhir/")) and not path.startswith(
                "/fhir/.well-known/"
            ):
                await self.fhir(scope, receive, send)
                return
        await self.app(scope, receive, send)


def app_from_env() -> FrontDoor:
    """The factory ``mso serve`` hands to uvicorn (settings from the environment)."""
    return create_app(Settings())
