"""Wiring of notifications into the application (:func:`fhir_server.app.create_app`).

The case-event bus is the application's one bus, built by ``create_app`` and passed in, so
whoever emits case events (the workflow) and whoever listens (notifications, billing) share it.
"""

from __future__ import annotations

from sqlalchemy import Engine

from fhir_server.auth.principal import Principal, Role
from fhir_server.config import Settings
from fhir_server.messaging.notifications import Notifier
from fhir_server.messaging.presence import touch_presence
from fhir_server.messaging.worker import MailWorker
from fhir_server.workflow.events import CaseEvents


class Messaging:
    """Notifications subscribed to the case events, and this process's outbox worker."""

    def __init__(self, engine: Engine, settings: Settings, events: CaseEvents) -> None:
        self.engine = engine
        self.events = events
        self.notifier = Notifier(settings)
        self.notifier.subscribe(events)
        self.worker = MailWorker(engine, settings)
        self.enabled = settings.mail_worker

    def user_seen(self, principal: Principal) -> None:
        """A user made an authenticated request: "online" for notifications, so a user seen
        lately gets no e-mail (cheap: a dictionary lookup, a queued write once a minute)."""
        if principal.role is not Role.SYSTEM:
            touch_presence(self.engine, principal.subject)

    def start(self) -> None:
        """Start the outbox worker (application start-up)."""
        if self.enabled:
            self.worker.start()

    def stop(self) -> None:
        """Stop the outbox worker cleanly (application shutdown)."""
        self.worker.stop()
