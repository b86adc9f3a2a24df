"""How a dialect stores resource rows: one small interface, one implementation per database.

The unit of work (:class:`fhir_server.storage.repository.Tx`) decides *what* to write (a first
version, a later one, a deletion) and when; a :class:`ResourceWriter` decides *how*:

* :class:`~.postgres.PostgresWriter` stores a single write's resource row, history row and
  search index rows in one statement (the index writes chained as CTEs), and a transaction
  Bundle's held-back versions as arrays, one statement for all first versions and one for all
  later ones (pids drawn from the sequence beforehand);
* :class:`~.sqlite.SqliteWriter` stores the resource and history rows with one statement each
  and leaves the index rows to :mod:`fhir_server.storage.indexer`.

Versioning rules (http://hl7.org/fhir/R4/http.html#versioning) are the unit's: a later version
moves a row only from the version it was read at, which is how a lost update is detected.
"""

from __future__ import annotations

from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.writers.base import ConcurrentCreate, ResourceWriter
from fhir_server.storage.writers.postgres import PostgresWriter
from fhir_server.storage.writers.sqlite import SqliteWriter

__all__ = ["ConcurrentCreate", "PostgresWriter", "ResourceWriter", "SqliteWriter", "writer_for"]


def writer_for(dialect: str, registry: SearchRegistry) -> ResourceWriter:
    """The writer of the ``dialect`` (an engine's ``dialect.name``)."""
    if dialect == "postgresql":
        return PostgresWriter(registry)
    return SqliteWriter()
