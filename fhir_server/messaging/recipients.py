"""The users an :class:`~fhir_server.messaging.rules.Audience` of a case event stands for.

Users live in the authorization server's ``auth_user`` table: admins by role, a case's requester
by its FHIR identity (``fhir_user``, PractitionerRole or Patient id) or, failing that, by the
requesting organization, the assigned provider by its PractitionerRole. Disabled accounts are
never notified, nor the user whose action caused the event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, false, or_, select

from fhir_server.auth.principal import Principal, Role
from fhir_server.messaging.rules import Audience
from fhir_server.storage.auth_schema import auth_user
from fhir_server.workflow.events import CaseEvent

_u = auth_user.c
_COLUMNS = (_u.username, _u.role, _u.fhir_user, _u.practitioner_role, _u.patient, _u.email)


@dataclass(frozen=True, slots=True)
class Recipient:
    """A user to notify: ``identity`` is the ``Type/id`` the in-app notification is addressed
    to (``None`` for an account without a FHIR identity, addressed by user name)."""

    username: str
    role: str
    identity: str | None
    email: str | None


def split_reference(reference: str | None) -> tuple[str, str] | None:
    """``(type, id)`` of a ``Type/id`` reference (absolute or versioned too), else ``None``."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2 or not parts[-2] or not parts[-1]:
        return None
    return parts[-2], parts[-1]


def _identity(row: Any) -> str | None:
    if row.fhir_user:
        return row.fhir_user
    if row.practitioner_role:
        return f"PractitionerRole/{row.practitioner_role}"
    if row.patient:
        return f"Patient/{row.patient}"
    return None


def _select(conn: Connection, condition: Any) -> list[Recipient]:
    rows = conn.execute(
        select(*_COLUMNS).where(_u.disabled.is_(False), condition).order_by(_u.username)
    ).all()
    return [Recipient(r.username, r.role, _identity(r), r.email) for r in rows]


def _acting_as(reference: str | None) -> Any:
    """SQL: the user acts as the FHIR resource ``reference``."""
    parsed = split_reference(reference)
    if parsed is None:
        return false()
    rtype, rid = parsed
    conds = [_u.fhir_user == f"{rtype}/{rid}"]
    if rtype == "PractitionerRole":
        conds.append(_u.practitioner_role == rid)
    elif rtype == "Patient":
        conds.append(and_(_u.role == Role.PATIENT.value, _u.patient == rid))
    elif rtype == "Organization":
        conds.append(and_(_u.role == Role.REQUESTER.value, _u.organization == rid))
    return or_(*conds)


def _organization(event: CaseEvent) -> str | None:
    parsed = split_reference(event.requester_org)
    if parsed is not None:
        return parsed[1] if parsed[0] == "Organization" else None
    return event.requester_org or None


def _org_users(event: CaseEvent) -> Any:
    org = _organization(event)
    if org is None:
        return false()
    return and_(_u.role == Role.REQUESTER.value, _u.organization == org)


def _users_of(conn: Connection, event: CaseEvent, audience: Audience) -> list[Recipient]:
    if audience is Audience.ADMINS:
        return _select(conn, _u.role == Role.ADMIN.value)
    if audience is Audience.PROVIDER:
        return _select(conn, _acting_as(event.provider)) if event.provider else []
    if audience is Audience.REQUESTER:
        return _select(conn, _acting_as(event.requester)) or _select(conn, _org_users(event))
    if audience is Audience.REQUESTER_ORG:
        self_request = (split_reference(event.requester) or ("", ""))[0] == "Patient"
        return _select(
            conn, or_(_org_users(event), _acting_as(event.requester) if self_request else false())
        )
    raise ValueError(f"no users for {audience}")


def _other_party(event: CaseEvent) -> tuple[Audience, ...]:
    actor = event.actor
    role = actor.role if isinstance(actor, Principal) else None
    if role is Role.PROVIDER:
        return (Audience.REQUESTER,)
    if role in (Role.REQUESTER, Role.PATIENT):
        return (Audience.PROVIDER,)
    return (Audience.REQUESTER, Audience.PROVIDER)


def resolve(conn: Connection, event: CaseEvent, audience: Audience) -> list[Recipient]:
    """The users ``audience`` of ``event`` is, without the actor, by user name."""
    audiences = _other_party(event) if audience is Audience.OTHER_PARTY else (audience,)
    actor = event.actor
    actor_name = (
        actor.subject if isinstance(actor, Principal) and actor.role is not Role.SYSTEM else None
    )
    found: dict[str, Recipient] = {}
    for each in audiences:
        for user in _users_of(conn, event, each):
            if user.username != actor_name:
                found.setdefault(user.username, user)
    return list(found.values())
