"""The change feed (storage.change_feed): every committed write once, nothing rolled back, and a
reader that loses nothing when transactions commit out of the order they wrote in — on SQLite
and PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text

from fhir_server.fhir.outcome import FhirError
from fhir_server.storage import change_feed
from fhir_server.storage.change_feed import Position
from fhir_server.storage.feed_schema import change_feed as feed_table
from fhir_server.storage.records import utc_now
from fhir_server.wiring import build_repository
from tests.conftest import make_settings


@pytest.fixture
def repo(fresh_db_url: str, tmp_path: Any):
    built = build_repository(make_settings(fresh_db_url, tmp_path))
    yield built
    built.engine.dispose()


def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


def _drain(repo: Any, after: Position = Position()) -> tuple[list[Any], Position]:
    changes: list[Any] = []
    with repo.engine.connect() as conn:
        while batch := change_feed.read(conn, after, limit=7):
            changes += batch
            after = batch[-1].position
    return changes, after


def test_each_write_is_in_the_feed_once_with_its_version(repo: Any) -> None:
    created = repo.write(lambda tx: tx.create(_patient("Feed")))
    rid = created[0].res_id if isinstance(created, tuple) else created.res_id
    repo.write(lambda tx: tx.update("Patient", rid, {**_patient("Feed2"), "id": rid}))
    repo.write(lambda tx: tx.delete("Patient", rid))
    changes = _drain_until(repo, Position(), 3)
    end = changes[-1].position
    mine = [(c.res_type, c.res_id, c.version, c.method) for c in changes if c.res_id == rid]
    assert mine == [
        ("Patient", rid, 1, "create"),
        ("Patient", rid, 2, "update"),
        ("Patient", rid, 3, "delete"),
    ]
    positions = [c.position for c in changes]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert _drain(repo, end)[0] == []  # read to the end: nothing again


def test_a_unit_is_in_the_feed_whole_or_not_at_all(repo: Any) -> None:
    def several(tx: Any) -> list[str]:
        return [_id(tx.create(_patient(f"Unit{i}"))) for i in range(5)]

    ids = repo.write(several)
    changes = _drain_until(repo, Position(), len(ids))
    end = changes[-1].position
    assert {c.res_id for c in changes} >= set(ids)

    def failing(tx: Any) -> None:
        tx.create(_patient("RolledBack"))
        raise FhirError(422, "invalid", "no", code="MSO-TEST-422")

    with pytest.raises(FhirError):
        repo.write(failing)
    assert _drain(repo, end)[0] == []


def test_consumers_keep_their_positions(repo: Any) -> None:
    with repo.engine.begin() as conn:
        assert change_feed.position_of(conn, "a", for_update=True) == Position()
        change_feed.save_position(conn, "a", Position(3, 9))
    with repo.engine.begin() as conn:
        assert change_feed.position_of(conn, "a", for_update=True) == Position(3, 9)
        assert change_feed.position_of(conn, "b") == Position()


def _id(created: Any) -> str:
    return created[0].res_id if isinstance(created, tuple) else created.res_id


@pytest.mark.parametrize(
    "fresh_db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_transaction_committing_late_is_read_after_it_ends_not_skipped(repo: Any) -> None:
    """Transaction A writes its feed row first and commits last; B commits in between. A reader
    that remembered row ids would read B, move past A's id and never see A."""
    _, start = _drain(repo)
    with repo.engine.connect() as late:
        tx_a = late.begin()
        late.execute(
            insert(feed_table).values(
                xid=text("pg_current_xact_id()::text::bigint"),
                res_type="Patient",
                res_id="late-a",
                version=1,
                method="create",
                at=utc_now(),
            )
        )
        b = _id(repo.write(lambda tx: tx.create(_patient("Early"))))
        seen, middle = _drain(repo, start)
        assert seen == [] and middle == start  # B waits behind A, still running
        tx_a.commit()
    seen = _drain_until(repo, start, 2)
    assert [c.res_id for c in seen] == ["late-a", b]


def _drain_until(repo: Any, after: Position, count: int, timeout: float = 30.0) -> list[Any]:
    """Read until ``count`` changes came: the horizon is the oldest transaction running in
    the whole PostgreSQL cluster, and other tests' databases share it."""
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while len(seen) < count and time.monotonic() < deadline:
        batch, after = _drain(repo, after)
        seen += batch
        if len(seen) < count:
            time.sleep(0.02)
    return seen


def test_concurrent_writers_and_a_reader_lose_and_repeat_nothing(repo: Any) -> None:
    written: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    rng = random.Random(7)

    def writer(n: int) -> None:
        for i in range(12):
            pause = rng.random() * 0.02

            def work(tx: Any, i: int = i, pause: float = pause) -> str:
                created = _id(tx.create(_patient(f"W{n}-{i}")))
                time.sleep(pause)  # a transaction holding its id while others commit
                return created

            rid = repo.write(work)
            with lock:
                written.append(rid)

    read: list[str] = []
    _, position = _drain(repo)

    give_up = time.monotonic() + 120  # the cluster-wide horizon may wait for other databases

    def reader() -> None:
        nonlocal position
        while True:
            finished = done.is_set()
            with repo.engine.connect() as conn:
                batch = change_feed.read(conn, position, limit=5)
            read.extend(c.res_id for c in batch if c.res_type == "Patient")
            if batch:
                position = batch[-1].position
            elif finished and (len(read) >= len(written) or time.monotonic() > give_up):
                return
            else:
                time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    consumer = threading.Thread(target=reader)
    consumer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    consumer.join(timeout=150)
    assert not consumer.is_alive()
    assert sorted(read) == sorted(written)  # every committed write, each once


def test_pruning_removes_only_what_was_read_and_is_old_enough(repo: Any) -> None:
    ids = [_id(repo.write(lambda tx, i=i: tx.create(_patient(f"Old{i}")))) for i in range(4)]
    changes = _drain_until(repo, Position(), len(ids))
    mine = [c for c in changes if c.res_id in ids]
    read_up_to = mine[1].position
    with repo.engine.begin() as conn:
        assert change_feed.prune(conn, read_up_to, before=mine[0].at) == 0  # none that old
    with repo.engine.begin() as conn:
        change_feed.prune(conn, read_up_to, before=utc_now())
    left = _drain_until(repo, Position(), 2)
    assert [c.res_id for c in left if c.res_id in ids] == ids[2:]


def test_a_change_after_everything_was_pruned_is_still_read(repo: Any) -> None:
    """Pruning the whole read tail must not let ids be reused below a reader's position
    (SQLite hands out max(rowid) + 1 unless the table is AUTOINCREMENT)."""
    for i in range(3):
        repo.write(lambda tx, i=i: tx.create(_patient(f"Tail{i}")))
    end = _drain_until(repo, Position(), 3)[-1].position
    with repo.engine.begin() as conn:
        change_feed.prune(conn, end, before=utc_now() + timedelta(hours=1))
    rid = _id(repo.write(lambda tx: tx.create(_patient("AfterPrune"))))
    assert [c.res_id for c in _drain_until(repo, end, 1)] == [rid]
