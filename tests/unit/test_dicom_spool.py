"""The gateway's spool and forwarders without sockets: durable puts, recovery after a crash,
sequence continuity, and forwarding in arrival order per study with a fake Orthanc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dicom_gateway import spool as spool_module
from dicom_gateway.forwarder import ForwarderPool
from dicom_gateway.orthanc import OrthancRejected, OrthancUnavailable
from dicom_gateway.spool import Spool, uid_key

STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"


def put(spool: Spool, study: str, number: int) -> None:
    spool.put_bytes(f"{study}/{number}".encode(), study_uid=study, sop_uid=f"{study}.{number}")


def test_entries_come_back_in_arrival_order_with_no_uid_in_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for number in range(3):
        put(spool, STUDY_A, number)
        put(spool, STUDY_B, number)
    entries = spool.pending()
    assert [spool.read(e).decode() for e in entries] == [
        f"{study}/{n}" for n in range(3) for study in (STUDY_A, STUDY_B)
    ]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert {e.study_key for e in entries} == {uid_key(STUDY_A), uid_key(STUDY_B)}
    assert not any("1.2.826" in p.name for p in tmp_path.rglob("*"))
    assert spool.status() == {"received": 6, "removed": 0, "pending": 6, "failed": 0}


def test_a_put_is_invisible_in_the_queue_until_fsynced_and_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    seen: list[tuple[list[str], list[str]]] = []
    real_fsync = os.fsync

    def observing_fsync(fd: int) -> None:
        seen.append(
            (sorted(p.name for p in spool.tmp_dir.iterdir()), [e.name for e in spool.pending()])
        )
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", observing_fsync)
    entry = spool.put_bytes(b"DICM", study_uid=STUDY_A, sop_uid="1.2.3")
    file_sync, dir_sync = seen
    assert len(file_sync[0]) == 1 and file_sync[1] == []  # data synced while still in tmp/
    assert dir_sync == ([], [entry.name])  # renamed, then the directory is synced
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", full_disk)
    with pytest.raises(OSError):
        put(spool, STUDY_A, 1)
    assert list(spool.tmp_dir.iterdir()) == [] and spool.pending() == []


def test_restart_discards_partial_writes_and_continues_the_sequence(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    for number in range(3):
        put(first, STUDY_A, number)
    first.remove(first.pending()[0])
    (first.tmp_dir / "crashed-mid-write.part").write_bytes(b"half an instance")
    (first.queue_dir / "not-an-entry.txt").write_text("ignored")
    first.close()

    second = Spool(tmp_path)
    assert second.discarded == 1 and list(second.tmp_dir.iterdir()) == []
    before = second.pending()
    assert [second.read(e) for e in before] == [f"{STUDY_A}/{n}".encode() for n in (1, 2)]
    put(second, STUDY_A, 3)
    after = second.pending()
    assert after[:-1] == before and after[-1].seq == before[-1].seq + 1


def test_sequence_continues_past_failed_entries(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    put(first, STUDY_A, 1)
    failed = first.move_to_failed(first.pending()[0])
    assert failed.parent == first.failed_dir
    first.close()
    second = Spool(tmp_path)
    put(second, STUDY_A, 2)
    assert second.pending()[0].seq == 2


class FakeOrthanc:
    """Records what it stores; fails while ``down``; rejects payloads starting with BAD."""

    def __init__(self) -> None:
        self.down = False
        self.stored: list[bytes] = []
        self.lock = threading.Lock()

    def uploader(self) -> FakeOrthanc:
        return self

    def store(self, data: bytes) -> None:
        if self.down:
            raise OrthancUnavailable("down")
        if data.startswith(b"BAD"):
            raise OrthancRejected("not DICOM")
        time.sleep(0.001)  # let the threads interleave
        with self.lock:
            self.stored.append(data)

    def close(self) -> None:
        pass


def studies_in_order(stored: list[bytes], study: str) -> list[int]:
    return [int(d.split(b"/")[1]) for d in stored if d.startswith(study.encode())]


def test_forwarders_keep_arrival_order_per_study_across_an_outage(tmp_path: Path) -> None:
    spool, orthanc = Spool(tmp_path), FakeOrthanc()
    studies = [f"1.2.3.{i}" for i in range(5)]
    for number in range(10):  # interleaved, as from several modalities
        for study in studies:
            put(spool, study, number)
    orthanc.down = True
    pool = ForwarderPool(spool, orthanc.uploader, threads=4, retry_max=0.3)
    pool.start()
    for study in studies:  # more arrive while Orthanc is down
        put(spool, study, 10)
    time.sleep(0.4)
    assert orthanc.stored == [] and len(spool.pending()) == 55
    orthanc.down = False
    assert pool.wait_idle(10)
    pool.stop()
    assert len(orthanc.stored) == 55 and spool.pending() == []
    for study in studies:
        assert studies_in_order(orthanc.stored, study) == list(range(11))
    assert pool.status()["forwarded"] == 55


def test_a_rejected_instance_goes_to_failed_and_the_study_goes_on(tmp_path: Path) -> None:
    spool, orthanc = Spool(tmp_path), FakeOrthanc()
    put(spool, STUDY_A, 1)
    spool.put_bytes(b"BAD bytes", study_uid=STUDY_A, sop_uid="9.9")
    put(spool, STUDY_A, 2)
    pool = ForwarderPool(spool, orthanc.uploader, threads=2, retry_max=0.3)
    pool.start()
    assert pool.wait_idle(5)
    pool.stop()
    assert studies_in_order(orthanc.stored, STUDY_A) == [1, 2]
    assert [p.read_bytes() for p in spool.failed_dir.iterdir()] == [b"BAD bytes"]
    assert pool.status()["rejected"] == 1


def test_stop_lets_the_attempt_in_flight_finish(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    put(spool, STUDY_A, 1)
    started, release = threading.Event(), threading.Event()

    class SlowOrthanc(FakeOrthanc):
        def store(self, data: bytes) -> None:
            started.set()
            release.wait(5)
            super().store(data)

    orthanc = SlowOrthanc()
    pool = ForwarderPool(spool, orthanc.uploader, threads=1)
    pool.start()
    assert started.wait(5)
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive()  # waiting for the upload
    release.set()
    stopper.join(5)
    assert orthanc.stored == [f"{STUDY_A}/1".encode()] and spool.pending() == []
