"""The application's domain services, built once by :func:`fhir_server.app.create_app`.

One :class:`~fhir_server.workflow.events.CaseEvents` bus is created there and handed to every
component's constructor (the workflow and the appointment and feedback rules emit on it,
notifications and billing subscribe to it); :class:`Services` holds what interactions need,
typed, and reaches operations as ``ctx.services``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fhir_server.workflow.events import CaseEvents

if TYPE_CHECKING:
    from fhir_server.workflow.billing import Billing
    from fhir_server.workflow.guards import Guards
    from fhir_server.workflow.service import Workflow


@dataclass(slots=True)
class Services:
    """The domain services of one application (``app.state.services``, ``ctx.services``).

    An application built without the workflow (a bare repository, a test) has an empty bus
    and ``None`` for the rest; operations answer 501 for a service that is missing.
    """

    events: CaseEvents = field(default_factory=CaseEvents)
    workflow: Workflow | None = None
    billing: Billing | None = None
    guards: Guards | None = None
