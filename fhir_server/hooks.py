"""Typed hook points where cross-cutting concerns attach without touching the REST layer.

A hook runs inside the write's database transaction (``before_*`` may change the resource or
raise a :class:`~fhir_server.fhir.outcome.FhirError` to refuse it; ``after_*`` sees the stored
version) or after commit (``after_commit``: notifications, subscriptions). ``before_read`` and
``before_search`` may refuse or narrow an access. The repository fires them on every path
(single writes, transaction and batch entries, PATCH). Audit registers here, and so does the
workflow, once per write point: its table of guards (:mod:`fhir_server.workflow.guards`), whose
case decisions are made by the pure state machine :mod:`fhir_server.workflow.status`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class HookPoint(StrEnum):
    """Where a hook attaches."""

    BEFORE_CREATE = "before_create"
    AFTER_CREATE = "after_create"
    BEFORE_UPDATE = "before_update"
    AFTER_UPDATE = "after_update"
    BEFORE_DELETE = "before_delete"
    AFTER_DELETE = "after_delete"
    BEFORE_READ = "before_read"
    BEFORE_SEARCH = "before_search"
    AFTER_COMMIT = "after_commit"


@dataclass(slots=True)
class HookEvent:
    """What a hook receives.

    ``resource`` is the incoming resource (before_*) or the stored one (after_*); ``previous`` the
    current stored resource for update and delete; ``tx`` the open unit of work (``None`` after
    commit); ``caller`` whoever made the request (set once authentication exists).
    """

    point: HookPoint
    resource_type: str
    resource_id: str | None = None
    resource: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    tx: Any = None
    caller: Any = None
    params: list[tuple[str, str]] | None = None


Hook = Callable[[HookEvent], None]


def written_version(event: HookEvent) -> int:
    """The version an ``after_*`` write event stored: the resource's ``versionId``, or for a
    deletion the version after the deleted one (the tombstone's)."""
    if event.point is HookPoint.AFTER_DELETE:
        return int(((event.previous or {}).get("meta") or {}).get("versionId") or 0) + 1
    return int(((event.resource or {}).get("meta") or {}).get("versionId") or 1)


@dataclass
class Hooks:
    """A registry of hook functions per point, called in registration order."""

    _hooks: dict[HookPoint, list[Hook]] = field(default_factory=dict)

    def register(self, point: HookPoint, hook: Hook) -> Hook:
        """Attach ``hook`` at ``point``; returns it so this works as a decorator helper."""
        self._hooks.setdefault(point, []).append(hook)
        return hook

    def has(self, point: HookPoint) -> bool:
        """True when something listens at ``point`` (lets hot paths skip building events)."""
        return bool(self._hooks.get(point))

    def fire(self, event: HookEvent) -> None:
        """Call every hook registered at the event's point."""
        for hook in self._hooks.get(event.point, ()):
            hook(event)
