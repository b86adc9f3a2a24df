"""The audit trail's own append-only table.

AuditEvents arrive at the rate of requests (one per read), so they are not stored like other
resources (a resource row, a history row and a score of search index rows each): one row per
event holds the JSON and the handful of columns the BALP searches use, written in batches.
``seq`` orders them (newest first) and pages them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, LargeBinary, String, Table

from fhir_server.storage.base_schema import PidType, metadata

audit_event = Table(
    "audit_event",
    metadata,
    Column("seq", PidType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False),
    Column("recorded_ms", BigInteger, nullable=False),
    Column("type_code", String(64), nullable=True),
    Column("subtype", String(64), nullable=True),
    Column("action", String(1), nullable=True),
    Column("outcome", String(3), nullable=True),
    Column("agent", String(200), nullable=True),
    Column("altid", String(128), nullable=True),
    Column("client", String(128), nullable=True),
    Column("address", String(64), nullable=True),
    Column("patient", String(64), nullable=True),
    Column("entity", String(200), nullable=True),
    Column("content", LargeBinary, nullable=False),
    Index("ix_audit_event_id", "id", unique=True),
    Index("ix_audit_event_recorded", "recorded_ms"),
    Index("ix_audit_event_patient", "patient", "seq"),
    Index("ix_audit_event_agent", "agent", "seq"),
    Index("ix_audit_event_altid", "altid", "seq"),
    Index("ix_audit_event_entity", "entity", "seq"),
)
