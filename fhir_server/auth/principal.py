"""Who is calling: the principal an access token stands for.

A principal is built from a verified access token (``auth.tokens``) and carried through every
request as the ``caller`` of the repository, where the access policy (``auth.policy``) turns it
into SQL conditions and checks. It never comes from anything the client asserts unverified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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

    def who(self) -> str:
        """A short, log-safe description for audit records: ``role:subject``."""
        return f"{self.role.value}:{self.subject}"
