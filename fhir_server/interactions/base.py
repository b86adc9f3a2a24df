"""Request, response and context types shared by every interaction handler.

The storage types a handler's context carries (:class:`Repository`, :class:`Tx`,
:class:`BlobStore`) are re-exported here: the REST layer names them through this module and
never imports storage itself. :class:`Router` is what a handler that dispatches to other
handlers (transaction and batch entries) or describes them (the CapabilityStatement) is given
instead of importing the route table, which imports every handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fhir_server.storage.blobs import BlobStore
from fhir_server.storage.repository import Repository, Tx
from fhir_server.workflow.services import Services

if TYPE_CHECKING:
    from fhir_server.config import Settings

__all__ = [
    "BlobStore",
    "FhirRequest",
    "FhirResponse",
    "Handler",
    "InteractionContext",
    "Prefer",
    "Repository",
    "Router",
    "Tx",
    "Written",
]


@dataclass(slots=True)
class Prefer:
    """The parsed ``Prefer`` header (http://hl7.org/fhir/R4/http.html#ops)."""

    return_: str | None = None  # minimal | representation | OperationOutcome
    handling: str | None = None  # strict | lenient
    respond_async: bool = False

    @classmethod
    def parse(cls, header: str | None) -> Prefer:
        """Parse a ``Prefer`` header value such as ``return=minimal, handling=strict``."""
        prefer = cls()
        if not header:
            return prefer
        for part in header.replace(";", ",").split(","):
            key, _, value = part.strip().partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "return":
                prefer.return_ = value
            elif key == "handling":
                prefer.handling = value.lower()
            elif key == "respond-async":
                prefer.respond_async = True
        return prefer


@dataclass(slots=True)
class FhirRequest:
    """One FHIR interaction, independent of HTTP.

    ``params`` keeps repeated query parameters in order; ``headers`` has lower-case names;
    ``body`` is the parsed JSON resource (``None`` when there is none); ``raw_body`` carries
    non-JSON payloads (Binary) as a file-like stream.
    """

    method: str
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: str | None = None
    operation: str | None = None
    compartment_type: str | None = None
    file_name: str | None = None  # a bulk export's output file
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    raw_body: Any = None
    prefer: Prefer = field(default_factory=Prefer)

    def header(self, name: str) -> str | None:
        """A request header by lower-case name."""
        return self.headers.get(name)

    def param(self, name: str) -> str | None:
        """The first value of a query parameter."""
        for key, value in self.params:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Written:
    """One resource a request wrote (or, for a conditional create that matched, named): the
    RESTful ``interaction`` that did it and the versioned ``reference``
    (``Type/id/_history/vid``). The audit trail names it as the event's entity."""

    interaction: str
    reference: str


@dataclass(slots=True)
class FhirResponse:
    """The result of an interaction.

    Exactly one of ``resource`` (a dict to serialize), ``body`` (already serialized FHIR JSON
    bytes, e.g. a stored resource returned as-is) or ``stream`` (an iterator of bytes with
    ``media_type``) is set, or none for an empty body.
    """

    status: int = 200
    resource: dict[str, Any] | None = None
    body: bytes | None = None
    stream: Any = None
    media_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    last_updated: str | None = None  # meta.lastUpdated of the version returned, for Bundle entries
    written: tuple[Written, ...] = ()  # what the request wrote, for its AuditEvent(s)


Handler = Callable[["InteractionContext", FhirRequest], FhirResponse]


class Router(Protocol):
    """The route table as handlers see it (:data:`fhir_server.interactions.table.ROUTER`)."""

    @property
    def type_interactions(self) -> tuple[str, ...]:
        """The interaction codes every resource type supports (CapabilityStatement)."""
        ...

    @property
    def system_interactions(self) -> tuple[str, ...]:
        """The system-level interaction codes (CapabilityStatement)."""
        ...

    def resolve(self, method: str, path: str, req: FhirRequest) -> Handler:
        """The handler of ``method`` on ``path`` (relative to the base), filling ``req``."""
        ...


@dataclass(slots=True)
class InteractionContext:
    """What a handler needs: the repository, settings, the base URL and the caller.

    ``tx`` is set when the handler runs inside a transaction Bundle: handlers then use it instead
    of opening their own unit of work. ``services`` holds the application's domain services
    (the workflow, billing, the case-event bus) for operations that need them. ``router`` is
    the route table (set by the REST layer): transaction and batch entries other than a plain
    POST, and the CapabilityStatement, need it.
    """

    repo: Repository
    settings: Settings
    base_url: str
    tx: Tx | None = None
    caller: Any = None
    services: Services = field(default_factory=Services)
    router: Router | None = None
