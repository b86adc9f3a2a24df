"""Who is calling: the principal an access token stands for.

A principal is built from a verified access token (``auth.tokens``) and carried through every
request as the ``caller`` of the repository, where the access policy (``auth.policy``) turns it
into SQL conditions and checks. It never comes from anything the client asserts unverified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fhir_server.auth.scopes import ScopeSet


class Role(StrEnum):
    """MSO roles (DESIGN.md, Access). ``system`` is a backend-services client acting alone."""

    ADMIN = "admin"
    REQUESTER = "requester"
    PROVIDER = "provider"
    PATIENT = "patient"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request.

    ``subject`` is the user name (or the client id for a backend client); ``fhir_user`` the
    ``Type/id`` of the user's FHIR identity (Practitioner, PractitionerRole or Patient);
    ``practitioner_role`` and ``organization`` the ids a requester or provider acts as/for;
    ``patient`` the patient a patient user is (or the launch context patient of a
    ``patient/`` scoped token); ``scopes`` the granted SMART scopes.
    """

    subject: str
    role: Role
    scopes: ScopeSet
    client_id: str | None = None
    fhir_user: str | None = None
    practitioner_role: str | None = None
    organization: str | None = None
    patient: str | None = None
    encounter: str | None = None
    token_id: str | None = None
    source: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        """True for the admin role."""
        return self.role is Role.ADMIN

    @property
    def acts_for_platform(self) -> bool:
        """Admins and system clients bound to no organization: the platform's operators."""
        return self.role is Role.ADMIN or (self.role is Role.SYSTEM and not self.organization)

    def to_dict(self) -> dict[str, Any]:
        """The principal as JSON-ready data, for work done later on its behalf (a bulk export
        job runs as the caller who started it): :meth:`from_dict` restores it."""
        data: dict[str, Any] = {"subject": self.subject, "role": self.role.value}
        data["scopes"] = str(self.scopes)
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Principal:
        """The principal :meth:`to_dict` saved."""
        return cls(
            subject=data["subject"],
            role=Role(data["role"]),
            scopes=ScopeSet.parse(data.get("scopes"), strict=False),
            extra=dict(data.get("extra") or {}),
            **{name: data.get(name) for name in _OPTIONAL},
        )

    def who(self) -> str:
        """A short, log-safe description for audit records: ``role:subject``."""
        return f"{self.role.value}:{self.subject}"


_OPTIONAL = (
    "client_id",
    "fhir_user",
    "practitioner_role",
    "organization",
    "patient",
    "encounter",
    "token_id",
    "source",
)
