"""Schema migrations with Alembic (``mso migrate``); revisions live in ``migrations/versions``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for ``database_url`` without an alembic.ini on disk."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` up to ``revision`` (SQLite: creating its folder)."""
    from fhir_server.storage.engine import build_engine

    engine = build_engine(database_url)  # creates the SQLite folder and applies the pragmas
    try:
        with engine.begin() as conn:
            config = alembic_config(database_url)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()
