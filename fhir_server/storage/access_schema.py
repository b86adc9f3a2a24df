"""Tables of the access policy, kept by :mod:`fhir_server.auth.access_index` on every write and
read by the rules of :mod:`fhir_server.auth.policy`.

``access_scope`` says what a resource belongs to, one row per membership, so that visibility is
an indexed ``EXISTS`` in the same SQL statement as the read or search it guards:

* ``PATIENT`` - the resource is in that Patient's compartment (a Patient is in its own);
* ``CASE`` - it belongs to that case (references that ServiceRequest; a case issue Task
  inherits the case of the Task it is part of);
* ``OWNER`` - who created it (``org:<id>`` for a requester's organization, ``user:<name>``
  otherwise), for resources that belong to no case yet (an uploaded Binary, a new Patient);
* ``CHAT`` - it is chat content (a Communication about a case): never shown to admins;
* ``VIA`` - it is visible exactly when ``ref_type/ref_id`` is (Binary.securityContext);
* ``RECIPIENT`` - a notification addressed to ``ref_type/ref_id`` (or the user ``ref_id``).

Rows survive a delete, so the history of a deleted resource stays visible to the same people.

``case_access`` is one row per case (ServiceRequest): its patient, the requesting organization
or person, the provider it is assigned to and the case Task's status, kept current from the
ServiceRequest and its Task so that "the cases this caller may see" is one indexed lookup.
"""

from __future__ import annotations

from enum import IntEnum

from sqlalchemy import Column, Index, SmallInteger, String, Table

from fhir_server.storage.base_schema import PidType, metadata


class ScopeKind(IntEnum):
    """The values of ``access_scope.kind`` (see the module docstring; ``RECIPIENT``: a
    notification's addressee, a FHIR identity or a user account)."""

    PATIENT = 1
    CASE = 2
    OWNER = 3
    CHAT = 4
    VIA = 5
    RECIPIENT = 6
    WITHHELD = 7  # kept from providers (the security label codes.WITHHELD_FROM_PROVIDER)


access_scope = Table(
    "access_scope",
    metadata,
    Column("pid", PidType, nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("ref_type", String(64), nullable=True),
    Column("ref_id", String(128), nullable=False),
    Index("ix_access_scope_pid", "pid", "kind"),
    Index("ix_access_scope_kind", "kind", "ref_id", "pid"),
)

case_access = Table(
    "case_access",
    metadata,
    Column("case_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=True),
    Column("requester_org", String(64), nullable=True),
    Column("requester_ref", String(130), nullable=True),
    Column("provider_role", String(64), nullable=True),
    Column("status", String(32), nullable=True),
    Index("ix_case_access_org", "requester_org"),
    Index("ix_case_access_requester", "requester_ref"),
    Index("ix_case_access_provider", "provider_role"),
    Index("ix_case_access_patient", "patient_id"),
)
