"""What every table module shares: the one ``MetaData`` and the pid column type.

Table modules (:mod:`.resource_schema`, :mod:`.index_schema`, :mod:`.access_schema`,
:mod:`.auth_schema`, :mod:`.audit_schema`, :mod:`.messaging_schema`) import from here only;
:mod:`.schema` gathers them all (so ``schema.metadata`` knows every table).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, MetaData

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only makes an auto-incrementing rowid alias of an INTEGER PRIMARY KEY, not a BIGINT one.
PidType = BigInteger().with_variant(Integer(), "sqlite")
