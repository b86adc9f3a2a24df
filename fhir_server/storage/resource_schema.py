"""SQLAlchemy Core tables of the FHIR store (the same schema on SQLite and PostgreSQL).

``resource`` holds the current version of every resource (a deleted one keeps its row with
``deleted`` set and no content); ``resource_history`` holds every version, including the current
one, so vread and ``_history`` never touch ``resource``. ``binary_content`` maps a Binary version
to its blob in the content store. Search index tables live in
:mod:`fhir_server.storage.index_schema`, one per SearchParameter type (HAPI's design), keyed by
``resource.pid``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)

from fhir_server.storage.base_schema import PidType, metadata

resource = Table(
    "resource",
    metadata,
    Column("pid", PidType, primary_key=True, autoincrement=True),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content", LargeBinary, nullable=True),
    UniqueConstraint("res_type", "res_id"),
    Index(None, "res_type", "last_updated"),
)

resource_history = Table(
    "resource_history",
    metadata,
    Column("pid", PidType, ForeignKey("resource.pid", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("method", String(8), nullable=False),
    Column("content", LargeBinary, nullable=True),
    Index(None, "last_updated"),
    Index(None, "res_type", "last_updated"),
)

binary_content = Table(
    "binary_content",
    metadata,
    Column("pid", PidType, ForeignKey("resource.pid", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("content_type", String(255), nullable=False),
    Index(None, "sha256"),
)
