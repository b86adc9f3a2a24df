"""User accounts of the authorization server: who may log in, with which MSO role and identity.

A user has a role (admin, requester, provider, patient), optionally the FHIR resources they act as
(``fhir_user`` ``Type/id``, a PractitionerRole, an Organization, a Patient) and optionally a TOTP
secret (RFC 6238) as a second factor. Passwords are argon2id hashes (:mod:`.secrets`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyotp
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fhir_server.auth.principal import Role
from fhir_server.auth.secrets import hash_password
from fhir_server.storage.auth_schema import auth_user
from fhir_server.storage.repository import ID_PATTERN, utc_now

USER_ROLES = (Role.ADMIN, Role.REQUESTER, Role.PROVIDER, Role.PATIENT)
FHIR_USER_TYPES = ("Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Person")
_USERNAME = re.compile(r"^[A-Za-z0-9._@+\-]{1,128}$")
# One address, no display name, nothing that could break out of an email header.
_EMAIL = re.compile(r"^[^@\s<>,;:\"()\[\]]+@[^@\s<>,;:\"()\[\]]+\.[^@\s<>,;:\"()\[\]]+$")
TOTP_ISSUER = "MSO"


class UserError(ValueError):
    """An account that cannot be created as asked (bad role, duplicate name …)."""


@dataclass(frozen=True, slots=True)
class User:
    """One account, without its secrets."""

    username: str
    role: Role
    fhir_user: str | None
    practitioner_role: str | None
    organization: str | None
    patient: str | None
    has_totp: bool
    disabled: bool
    email: str | None = None


def check_fhir_user(value: str) -> None:
    """Reject a ``fhirUser`` that is not ``Type/id`` of a SMART user type."""
    rtype, _, rid = value.partition("/")
    if rtype not in FHIR_USER_TYPES or not ID_PATTERN.match(rid):
        raise UserError(f"fhirUser must be Type/id with Type one of {', '.join(FHIR_USER_TYPES)}")


def _check_id(name: str, value: str | None) -> None:
    if value is not None and not ID_PATTERN.match(value):
        raise UserError(f"{name} '{value}' is not a valid FHIR id")


def _user(row) -> User:  # type: ignore[no-untyped-def]
    return User(
        username=row.username,
        role=Role(row.role),
        fhir_user=row.fhir_user,
        practitioner_role=row.practitioner_role,
        organization=row.organization,
        patient=row.patient,
        has_totp=row.totp_secret is not None,
        disabled=row.disabled,
        email=row.email,
    )


class UserStore:
    """Create, find, list and disable accounts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        *,
        username: str,
        password: str,
        role: Role | str,
        fhir_user: str | None = None,
        practitioner_role: str | None = None,
        organization: str | None = None,
        patient: str | None = None,
        totp: bool = False,
        email: str | None = None,
    ) -> tuple[User, str | None]:
        """Create an account; returns it and, with ``totp``, the provisioning URI to scan."""
        if not _USERNAME.match(username):
            raise UserError("user names are 1-128 letters, digits and . _ @ + -")
        try:
            role = Role(role)
        except ValueError:
            raise UserError(
                f"role must be one of {', '.join(r.value for r in USER_ROLES)}"
            ) from None
        if role not in USER_ROLES:
            raise UserError(f"role must be one of {', '.join(r.value for r in USER_ROLES)}")
        if len(password) < 8:
            raise UserError("passwords have at least 8 characters")
        for name, value in (
            ("practitioner role", practitioner_role),
            ("organization", organization),
            ("patient", patient),
        ):
            _check_id(name, value)
        if email is not None and (len(email) > 320 or not _EMAIL.match(email)):
            raise UserError(f"'{email}' is not an email address")
        if role is Role.PATIENT and not patient:
            raise UserError("a patient user needs --patient (the Patient id they are)")
        if fhir_user is None:
            if role is Role.PATIENT:
                fhir_user = f"Patient/{patient}"
            elif practitioner_role:
                fhir_user = f"PractitionerRole/{practitioner_role}"
        if fhir_user is not None:
            check_fhir_user(fhir_user)
        secret = pyotp.random_base32() if totp else None
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(auth_user).values(
                        username=username,
                        password_hash=hash_password(password),
                        role=role.value,
                        fhir_user=fhir_user,
                        practitioner_role=practitioner_role,
                        organization=organization,
                        patient=patient,
                        email=email,
                        totp_secret=secret,
                        disabled=False,
                        created=utc_now(),
                    )
                )
        except IntegrityError:
            raise UserError(f"user '{username}' already exists") from None
        uri = (
            pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)
            if secret
            else None
        )
        user = self.get(username)
        assert user is not None
        return user, uri

    def get(self, username: str) -> User | None:
        """The account named ``username``, or ``None``."""
        row = self._row(username)
        return _user(row) if row else None

    def credentials(self, username: str) -> tuple[User | None, str | None, str | None]:
        """The account with its password hash and TOTP secret (for the login check only)."""
        row = self._row(username)
        if row is None:
            return None, None, None
        return _user(row), row.password_hash, row.totp_secret

    def all(self) -> list[User]:
        """Every account, by user name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(auth_user).order_by(auth_user.c.username)).all()
        return [_user(r) for r in rows]

    def set_disabled(self, username: str, disabled: bool = True) -> bool:
        """Disable (or re-enable) an account; its tokens stop working at once. False if unknown."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(auth_user).where(auth_user.c.username == username).values(disabled=disabled)
            )
        return result.rowcount == 1

    def _row(self, username: str):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(select(auth_user).where(auth_user.c.username == username)).first()
