"""Demo accounts: one user of every role with a known password, and the viewer's SMART client.

The users act as the demo bundle's resources, found by their business identifiers (the bundle
creates them with server-assigned ids). Existing accounts and clients are left as they are, so
seeding twice changes nothing and never resets a password someone changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import ScopeSet
from fhir_server.auth.users import User, UserStore
from fhir_server.codes import CANONICAL_BASE

if TYPE_CHECKING:
    from fhir_server.auth.clients import ClientStore
    from fhir_server.storage.repository import Repository

ORGANIZATION_SYSTEM = f"{CANONICAL_BASE}/sid/organization"
ROLE_SYSTEM = f"{CANONICAL_BASE}/sid/practitioner-role"
MRN_SYSTEM = f"{CANONICAL_BASE}/sid/mrn"
VIEWER_CLIENT_ID = "demo-viewer"
VIEWER_REDIRECT_URI = "http://127.0.0.1:8080/viewer/callback"
SEED_CLIENT_ID = "mso-seed-demo"
"""``client_id`` recorded on what the seeding principals do (no such client is registered)."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    """One demo account: its role and the demo bundle identifiers it acts as."""

    username: str
    password: str
    role: Role
    description: str
    organization: str | None = None  # ORG-n
    practitioner_role: str | None = None  # PRR-n
    patient: str | None = None  # MRN-nnnn


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser("admin", "mso-demo-admin", Role.ADMIN, "administrator"),
    DemoUser(
        "requester.riverside",
        "mso-demo-riverside",
        Role.REQUESTER,
        "requester, Riverside General Hospital",
        organization="ORG-1",
        practitioner_role="PRR-20",
    ),
    DemoUser(
        "requester.northwind",
        "mso-demo-northwind",
        Role.REQUESTER,
        "requester, Northwind Health Insurance",
        organization="ORG-2",
        practitioner_role="PRR-21",
    ),
    DemoUser(
        "provider.cardiology",
        "mso-demo-cardiology",
        Role.PROVIDER,
        "provider, cardiology (Dr. Amira Haddad)",
        practitioner_role="PRR-10",
    ),
    DemoUser(
        "provider.oncology",
        "mso-demo-oncology",
        Role.PROVIDER,
        "provider, oncology (Dr. Lukas Berg)",
        practitioner_role="PRR-11",
    ),
    DemoUser(
        "patient.farouk",
        "mso-demo-patient",
        Role.PATIENT,
        "patient Omar Farouk",
        patient="MRN-0020",
    ),
)


def find_id(repo: Repository, res_type: str, system: str, value: str) -> str:
    """The id of the ``res_type`` whose identifier is ``system|value`` (it must exist)."""

    def work(tx):  # type: ignore[no-untyped-def]
        with tx.internal():
            return tx.find(res_type, [("identifier", f"{system}|{value}")], limit=1)

    found = repo.read_only(work)
    if not found:
        raise LookupError(f"demo {res_type} {system}|{value} is missing")
    return found[0].res_id


def ensure_users(repo: Repository, users: UserStore) -> list[tuple[DemoUser, bool]]:
    """Create the missing demo accounts; every demo user with whether it was created now."""
    out = []
    for demo in DEMO_USERS:
        if users.get(demo.username) is not None:
            out.append((demo, False))
            continue
        users.create(
            username=demo.username,
            password=demo.password,
            role=demo.role,
            organization=_id(repo, "Organization", ORGANIZATION_SYSTEM, demo.organization),
            practitioner_role=_id(repo, "PractitionerRole", ROLE_SYSTEM, demo.practitioner_role),
            patient=_id(repo, "Patient", MRN_SYSTEM, demo.patient),
        )
        out.append((demo, True))
    return out


def _id(repo: Repository, res_type: str, system: str, value: str | None) -> str | None:
    return find_id(repo, res_type, system, value) if value else None


def ensure_viewer_client(clients: ClientStore) -> bool:
    """Register the viewer's public SMART client unless it exists; True when created now."""
    if clients.get(VIEWER_CLIENT_ID) is not None:
        return False
    clients.create(client_id=VIEWER_CLIENT_ID, kind="public", redirect_uris=[VIEWER_REDIRECT_URI])
    return True


def principal_of(user: User) -> Principal:
    """The principal a request of ``user`` through the viewer would carry (user scopes)."""
    scope = "patient/*.cruds" if user.role is Role.PATIENT else "user/*.cruds"
    return Principal(
        subject=user.username,
        role=user.role,
        scopes=ScopeSet.parse(scope),
        client_id=SEED_CLIENT_ID,
        fhir_user=user.fhir_user,
        practitioner_role=user.practitioner_role,
        organization=user.organization,
        patient=user.patient,
    )
