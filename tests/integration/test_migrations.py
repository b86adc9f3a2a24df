"""The Alembic migrations build exactly the schema the code declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fhir_server.storage.engine import build_engine
from fhir_server.storage.schema import metadata


def test_migrations_match_the_declared_schema(fresh_db_url):
    engine = build_engine(fresh_db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_the_latest_migration_goes_down_and_up_again(fresh_db_url):
    """0007 (fewer index B-trees) can be undone and redone on both databases."""
    from alembic import command

    from fhir_server.storage.migrate import alembic_config

    config = alembic_config(fresh_db_url)
    command.downgrade(config, "0006")
    command.upgrade(config, "head")
    test_migrations_match_the_declared_schema(fresh_db_url)
