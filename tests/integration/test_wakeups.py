"""Wake-up signals (storage.wakeups): a committed write wakes the Subscription workers of every
process (PostgreSQL: the change feed's NOTIFY trigger, heard by another engine's listener; SQLite:
the repository's after-commit hook), and the dispatcher's EVENTS notification reaches them too —
at commit, never for a rolled-back transaction."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fhir_server.storage import wakeups
from fhir_server.storage.engine import build_engine, write_connection
from fhir_server.storage.wakeups import EVENTS, FEED, Wakeups
from fhir_server.wiring import build_repository
from tests.conftest import make_settings


@pytest.fixture
def repo(fresh_db_url: str, tmp_path: Any):
    built = build_repository(make_settings(fresh_db_url, tmp_path))
    yield built
    built.engine.dispose()


def _patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Wake"}]}


def _listener(repo: Any) -> tuple[Wakeups, dict[str, threading.Event]]:
    """Wake-ups as another process would have them: PostgreSQL, an engine of its own."""
    engine = build_engine(str(repo.engine.url.render_as_string(hide_password=False)))
    other = Wakeups(engine if repo.postgres else repo.engine)
    heard = {channel: threading.Event() for channel in (FEED, EVENTS)}
    for channel, event in heard.items():
        other.on(channel, event.set)
    if repo.postgres:
        other.start()
        assert other.listening.wait(10), "the listener did not connect"
    else:
        other.follow_commits(repo.hooks)
    for event in heard.values():
        event.clear()  # (re)connecting signals everything once
    return other, heard


def test_a_committed_write_wakes_the_listeners_and_a_rolled_back_one_does_not(repo: Any) -> None:
    other, heard = _listener(repo)
    try:
        with pytest.raises(RuntimeError):

            def fail(tx: Any) -> None:
                tx.create(_patient())
                raise RuntimeError("rolled back")

            repo.write(fail)
        assert not heard[FEED].wait(0.5)
        repo.write(lambda tx: tx.create(_patient()))
        assert heard[FEED].wait(10), "no wake-up after the commit"
        assert not heard[EVENTS].is_set()
    finally:
        other.stop()


@pytest.mark.parametrize(
    "fresh_db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)  # on SQLite the dispatcher signals its own process directly (no NOTIFY)
def test_the_dispatchers_notification_is_heard_at_commit(repo: Any) -> None:
    other, heard = _listener(repo)
    try:
        with write_connection(repo.engine) as conn, conn.begin():
            wakeups.notify(conn, EVENTS)
            assert not heard[EVENTS].wait(0.3)  # not before the commit
        assert heard[EVENTS].wait(10)
    finally:
        other.stop()
