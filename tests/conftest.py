"""Shared fixtures: a database per backend (SQLite file, fresh PostgreSQL database) and clients.

Integration tests take ``db_url`` (parametrized over ``sqlite`` and ``postgres``) or ``client``
(an HTTP client on an app over that database). The database lives for the whole test session;
tests isolate themselves with unique values (identifiers, tags) rather than by emptying tables.
A test that needs an empty store takes ``fresh_db_url``. PostgreSQL tests are marked
``postgres`` and skip with a reason when no server answers locally; CI always has one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.required_tools import missing_tool

# Every search statement reused for a new query of the same shape is checked against one
# compiled from scratch (fhir_server.search.shapes); servers started by tests inherit it.
os.environ.setdefault("MSO_VERIFY_SEARCH_SHAPES", "1")
PG_ADMIN_URL = os.environ.get("MSO_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:  # any failure means "no server here"
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"


def _create_pg_database() -> tuple[str, str]:
    import psycopg

    name = f"mso_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _make_db(backend: str, tmp: Path) -> Iterator[str]:
    from fhir_server.storage.migrate import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'mso.db'}"
        upgrade(url)
        yield url
        return
    reason = _pg_available()
    if reason:
        missing_tool(reason)
    name, url = _create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        from fhir_server.storage.engine import dispose_all

        dispose_all()
        _drop_pg_database(name)


@pytest.fixture(scope="session", params=BACKENDS)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database for the whole session, one per backend."""
    yield from _make_db(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))


@pytest.fixture(params=BACKENDS)
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty, migrated database for one test."""
    yield from _make_db(request.param, tmp_path)


def make_settings(db_url: str, tmp_path: Path, **overrides: object):
    """Settings for a test app on ``db_url`` with its data under ``tmp_path``."""
    from fhir_server.config import Settings

    # no Subscription delivery thread unless a test asks: the tests that need one drive it
    overrides.setdefault("subscription_worker", False)
    return Settings(
        database_url=db_url, data_dir=tmp_path, base_url="http://testserver/fhir", **overrides
    )


@pytest.fixture(scope="session")
def app(db_url: str, tmp_path_factory: pytest.TempPathFactory):
    """The FHIR app on the session database."""
    from fhir_server.app import create_app

    return create_app(make_settings(db_url, tmp_path_factory.mktemp("data")))


def issue_token(
    database_url: str,
    audience: str = "http://testserver/fhir",
    *,
    role: str = "system",
    scopes: str = "system/*.cruds",
    **claims: str,
) -> str:
    """A real signed access token for the server on ``database_url`` (no OAuth flow).

    The default is a backend-services token with full system scopes: the access policy still
    applies to it (a system client sees everything but chat content).
    """
    from fhir_server.auth.tokens import TokenService
    from fhir_server.config import Settings
    from fhir_server.storage.engine import build_engine

    service = TokenService(build_engine(database_url), Settings(database_url=database_url))
    return service.issue_access_token(
        client_id="test-suite",
        scopes=scopes,
        role=role,
        audience=audience,
        lifetime=86400,
        **claims,
    )


def authorized(database_url: str, audience: str = "http://testserver/fhir", **kw: str) -> dict:
    """``Authorization`` header of :func:`issue_token`."""
    return {"Authorization": f"Bearer {issue_token(database_url, audience, **kw)}"}


@pytest.fixture(scope="session")
def client(app) -> Iterator:
    """An HTTP client on the app with a system token; FHIR base is ``/fhir``."""
    from fastapi.testclient import TestClient

    headers = authorized(app.state.settings.database_url)
    with TestClient(
        app, base_url="http://testserver", follow_redirects=False, headers=headers
    ) as test_client:
        yield test_client


@pytest.fixture
def unique() -> str:
    """A value unique to this test, for identifiers and tags that isolate its data."""
    return uuid.uuid4().hex
