"""Search index tables, one per SearchParameter type (HAPI's design), keyed by ``resource.pid``.

http://hl7.org/fhir/R4/search.html#ptypes. Rows exist only for the current, non-deleted version
of a resource (the indexer replaces them on every write and drops them on delete), so a search
never has to look at versions. Every row carries ``hash_identity`` = hash(owner type, parameter
code) (the owner is ``Resource`` for parameters defined on Resource / DomainResource, so
``_tag`` & co. work across types); value columns are hashed together with it at write time and
those hashes lead the indexes, so an equality search is one index range scan. ``grp`` numbers
the element a row came from for composite parameters (0 otherwise): components of one
composite value share ``(pid, grp)``.

Strings and URIs are compared in binary order (``COLLATE "C"`` on PostgreSQL, SQLite's default)
so that a prefix search is an index range ``value >= 'abc' AND value < 'abd'`` on both dialects.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, SmallInteger, String, Table, Text, text

from fhir_server.storage.base_schema import PidType, metadata

BinaryString = String(200).with_variant(String(200, collation="C"), "postgresql")
BinaryText = Text().with_variant(Text(collation="C"), "postgresql")


def _pid() -> Column:
    return Column("pid", PidType, nullable=False)


def _common() -> list[Column]:
    return [
        _pid(),
        Column("hash_identity", BigInteger, nullable=False),
        Column("grp", SmallInteger, nullable=False, default=0),
    ]


idx_string = Table(
    "idx_string",
    metadata,
    *_common(),
    Column("value_norm", BinaryString, nullable=False),
    Column("value_exact", Text, nullable=False),
    Index("ix_idx_string_pid", "pid"),
    # also serves :exact (an exact value has one normalized form; value_exact is a filter)
    Index("ix_idx_string_norm", "hash_identity", "value_norm", "pid"),
)

idx_token = Table(
    "idx_token",
    metadata,
    *_common(),
    Column("system", Text, nullable=True),
    Column("code", Text, nullable=True),
    Column("text_norm", BinaryString, nullable=True),
    Column("hash_sys_value", BigInteger, nullable=False),
    Column("hash_value", BigInteger, nullable=False),
    Column("hash_sys", BigInteger, nullable=False),
    Index("ix_idx_token_pid", "pid"),
    Index("ix_idx_token_sys_value", "hash_sys_value", "pid"),
    Index("ix_idx_token_value", "hash_value", "pid"),
    # ``system|`` searches give the identity too: one index serves them and identity-only scans
    # (:missing, :text), one B-tree less to maintain per row
    Index("ix_idx_token_identity", "hash_identity", "hash_sys", "pid"),
)

idx_date = Table(
    "idx_date",
    metadata,
    *_common(),
    Column("low", BigInteger, nullable=False),  # epoch milliseconds, inclusive
    Column("high", BigInteger, nullable=False),  # epoch milliseconds, inclusive
    Index("ix_idx_date_pid", "pid"),
    Index("ix_idx_date_low", "hash_identity", "low", "high", "pid"),
    Index("ix_idx_date_high", "hash_identity", "high", "pid"),
)

idx_reference = Table(
    "idx_reference",
    metadata,
    *_common(),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("target_url", BinaryText, nullable=True),
    Column("hash_url", BigInteger, nullable=True),
    Index("ix_idx_reference_pid", "pid"),
    Index("ix_idx_reference_target", "hash_identity", "target_id", "target_type", "pid"),
    Index("ix_idx_reference_rev", "target_id", "target_type", "hash_identity"),
    Index(
        "ix_idx_reference_url",
        "hash_url",
        "pid",
        postgresql_where=text("hash_url IS NOT NULL"),
        sqlite_where=text("hash_url IS NOT NULL"),
    ),
)

idx_quantity = Table(
    "idx_quantity",
    metadata,
    *_common(),
    Column("value", Float, nullable=False),
    Column("system", Text, nullable=True),
    Column("code", Text, nullable=True),
    Column("hash_sys_code", BigInteger, nullable=False),
    Column("hash_code", BigInteger, nullable=False),
    Index("ix_idx_quantity_pid", "pid"),
    Index("ix_idx_quantity_value", "hash_identity", "value", "pid"),
    Index("ix_idx_quantity_sys_code", "hash_sys_code", "value", "pid"),
    Index("ix_idx_quantity_code", "hash_code", "value", "pid"),
)

idx_number = Table(
    "idx_number",
    metadata,
    *_common(),
    Column("value", Float, nullable=False),
    Index("ix_idx_number_pid", "pid"),
    Index("ix_idx_number_value", "hash_identity", "value", "pid"),
)

idx_uri = Table(
    "idx_uri",
    metadata,
    *_common(),
    Column("uri", BinaryText, nullable=False),
    Column("hash_uri", BigInteger, nullable=False),
    Index("ix_idx_uri_pid", "pid"),
    Index("ix_idx_uri_hash", "hash_uri", "pid"),
)

# _text (narrative) and _content (every string of the resource), normalized, one row each.
idx_text = Table(
    "idx_text",
    metadata,
    _pid(),
    Column("kind", SmallInteger, nullable=False),  # 1 = _text, 2 = _content
    Column("text_norm", Text, nullable=False),
    Index("ix_idx_text_pid", "pid", "kind"),
)

INDEX_TABLES: tuple[Table, ...] = (
    idx_string,
    idx_token,
    idx_date,
    idx_reference,
    idx_quantity,
    idx_number,
    idx_uri,
    idx_text,
)
