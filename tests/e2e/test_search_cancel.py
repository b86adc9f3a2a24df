"""A search whose client disconnects is cancelled in PostgreSQL (issue 21): over a real socket
to ``mso serve``, the statement is gone from ``pg_stat_activity`` within a second."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.e2e.conftest import server_auth

# PostgreSQL only (pg_stat_activity, a backend cancelled): the SQLite backend is not a skip,
# it is not a parameter of these tests.
pytestmark = pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def pg(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        yield conn


def _searches_running(admin: psycopg.Connection, me: int) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> %s "
        "AND datname = current_database() AND query ILIKE '%%idx_string%%'",
        (me,),
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "search",
    ["Patient?name=gone", "Patient?name=gone&gender=male"],
    ids=["generic-plan-pool", "unit-connection"],
)
def test_a_disconnected_clients_search_is_cancelled(
    server: str, pg, db_url: str, search: str
) -> None:  # type: ignore[no-untyped-def]
    import psycopg as driver

    url = db_url.replace("postgresql+psycopg://", "postgresql://")
    headers = server_auth(server)
    parts = urlsplit(server)
    with driver.connect(url, autocommit=True) as admin:
        me = admin.info.backend_pid
        pg.execute("LOCK TABLE idx_string IN ACCESS EXCLUSIVE MODE")  # the search waits
        try:
            sock = socket.create_connection((parts.hostname, parts.port))
            request = (
                f"GET {parts.path}/{search} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization: {headers['Authorization']}\r\n\r\n"
            )
            sock.sendall(request.encode())
            deadline = time.monotonic() + 10
            while _searches_running(admin, me) == 0:
                assert time.monotonic() < deadline, "the search never reached PostgreSQL"
                time.sleep(0.05)
            sock.close()
            gone_by = time.monotonic() + 1.0
            while _searches_running(admin, me):
                assert time.monotonic() < gone_by, "the search still runs after 1 s"
                time.sleep(0.02)
        finally:
            pg.rollback()
