"""PostgreSQL plans of the write path that must not depend on when a connection first ran them."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.engine import build_engine
from fhir_server.storage.repository import Repository


@pytest.mark.parametrize(
    "fresh_db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_writes_current_version_lookup_is_never_a_prepared_statement(fresh_db_url):
    """psycopg prepares a statement after five executions, and PostgreSQL may then keep one
    generic plan for it; made on a nearly empty table, that plan read every row of the type on
    each write. The lookup is planned for its values every time instead (PostgreSQL only)."""
    engine = build_engine(fresh_db_url, pool_size=1)  # one connection: it ran every write
    try:
        repo = Repository(engine, registry=SearchRegistry.load())
        for n in range(8):
            body = {"resourceType": "Patient", "name": [{"family": f"Plan{n}"}]}
            repo.write(lambda tx, b=body, i=n: tx.update("Patient", f"plan-{i}", b))
            repo.write(lambda tx, b=body, i=n: tx.update("Patient", f"plan-{i}", b))
        with engine.connect() as conn:
            prepared = conn.execute(text("SELECT statement FROM pg_prepared_statements")).all()
    finally:
        engine.dispose()
    statements = [row.statement for row in prepared]
    assert any("INSERT INTO resource" in s for s in statements), statements  # psycopg prepares
    assert not any("FOR UPDATE" in s for s in statements), statements
