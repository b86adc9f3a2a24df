"""The durable spool: received instances wait here until Orthanc has them.

DICOM PS3.4 Annex B (Storage Service Class, B.2.3) lets an SCP answer Success only when it has
taken responsibility for the instance, so nothing is acknowledged before it is on disk:
:meth:`Spool.put_bytes` writes a temporary file, fsyncs it, renames it atomically into the queue
and fsyncs the queue directory. A crash before the rename leaves a temporary file that was never
acknowledged; :class:`Spool` discards those when it opens.

Layout under ``spool_dir``::

    tmp/                       writes in progress (discarded on start)
    queue/<seq>-<study>-<sop>.dcm    waiting for Orthanc, oldest first
    failed/<same name>         rejected by Orthanc for good (not a DICOM file)

``<seq>`` is a zero-padded sequence number, continued after a restart from the highest one on
disk, so the arrival order of every study survives a crash. ``<study>`` and ``<sop>`` are
truncated SHA-1 digests of the StudyInstanceUID and SOPInstanceUID: no identifier of a patient,
study or instance appears in a path or a log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".dcm"
KEY_LENGTH = 20  # hex digits of SHA-1 kept: 80 bits, no collision in any realistic spool
SEQ_WIDTH = 12


def uid_key(uid: str) -> str:
    """The digest standing for a UID in file names (never the UID itself)."""
    return hashlib.sha1(uid.strip().encode("ascii", "replace")).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True, order=True)
class SpoolEntry:
    """One spooled instance; entries sort in arrival order."""

    seq: int
    study_key: str = field(compare=False)
    sop_key: str = field(compare=False)
    path: Path = field(compare=False)

    @property
    def name(self) -> str:
        """The file name: sequence number and digests, safe to log."""
        return self.path.name

    @classmethod
    def parse(cls, path: Path) -> SpoolEntry | None:
        """The entry a queue file stands for, or None for a file that is not one."""
        parts = path.name.removesuffix(SUFFIX).split("-")
        if not path.name.endswith(SUFFIX) or len(parts) != 3 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2], path)


class _DirectorySync:
    """fsync of one directory with group commit: concurrent callers share one fsync.

    A caller's rename is durable once an fsync that *started after* the rename has completed;
    each caller takes a ticket after its rename and returns as soon as a completed fsync
    covered that ticket, so N associations storing at once pay for about one fsync.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self._tickets = threading.Lock()
        self._syncing = threading.Lock()
        self._issued = 0
        self._synced = 0

    def sync(self) -> None:
        with self._tickets:
            self._issued += 1
            ticket = self._issued
        with self._syncing:
            if self._synced >= ticket:
                return
            with self._tickets:
                upto = self._issued
            os.fsync(self._fd)
            self._synced = upto

    def close(self) -> None:
        os.close(self._fd)


class Spool:
    """The spool directory: durable puts, recovery on open, hand-over to the forwarders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.failed_dir = self.root / "failed"
        for folder in (self.tmp_dir, self.queue_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[SpoolEntry], None]] = []
        self.discarded = self._discard_temporary_files()
        pending = self._scan(self.queue_dir)
        failed = self._scan(self.failed_dir)
        self._next_seq = max((e.seq for e in (*pending, *failed)), default=0) + 1
        self._queue_sync = _DirectorySync(self.queue_dir)
        self.received = 0
        self.removed = 0
        self.failed = 0

    # -- writing ---------------------------------------------------------------------------

    def put_bytes(self, data: bytes, *, study_uid: str, sop_uid: str) -> SpoolEntry:
        """Store one DICOM Part-10 file durably and queue it behind its study.

        When this returns, the file survives a crash (file fsynced, renamed into the queue,
        queue directory fsynced); it raises ``OSError`` when that could not be done, and then
        nothing was queued.
        """
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                seq = self._next_seq
                self._next_seq += 1
            name = f"{seq:0{SEQ_WIDTH}d}-{uid_key(study_uid)}-{uid_key(sop_uid)}{SUFFIX}"
            entry = SpoolEntry(seq, uid_key(study_uid), uid_key(sop_uid), self.queue_dir / name)
            os.rename(tmp, entry.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._queue_sync.sync()
        with self._lock:
            self.received += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener(entry)
        return entry

    # -- the forwarders' side --------------------------------------------------------------

    def subscribe(self, listener: Callable[[SpoolEntry], None]) -> list[SpoolEntry]:
        """Call ``listener`` with every entry queued from now on; return those already queued
        (oldest first). An entry queued during the call may be both returned and announced."""
        with self._lock:
            self._listeners.append(listener)
        return self.pending()

    def pending(self) -> list[SpoolEntry]:
        """The queued entries, oldest first."""
        return self._scan(self.queue_dir)

    def read(self, entry: SpoolEntry) -> bytes:
        """The content of a queued entry (``FileNotFoundError`` once it was removed)."""
        return entry.path.read_bytes()

    def remove(self, entry: SpoolEntry) -> None:
        """Forget an entry Orthanc has stored. No directory fsync: should the removal be lost
        in a crash, the instance is sent again, and a second store is harmless."""
        entry.path.unlink(missing_ok=True)
        with self._lock:
            self.removed += 1

    def move_to_failed(self, entry: SpoolEntry) -> Path:
        """Set aside an entry Orthanc rejected for good; return where it now lies."""
        target = self.failed_dir / entry.name
        os.replace(entry.path, target)
        with self._lock:
            self.failed += 1
        return target

    def status(self) -> dict[str, int]:
        """Counts for logs and health checks: received and removed since start, now queued,
        failed in total."""
        return {
            "received": self.received,
            "removed": self.removed,
            "pending": sum(1 for _ in self.queue_dir.iterdir()),
            "failed": sum(1 for _ in self.failed_dir.iterdir()),
        }

    def close(self) -> None:
        """Release the directory handle."""
        self._queue_sync.close()

    # -- recovery --------------------------------------------------------------------------

    def _discard_temporary_files(self) -> int:
        count = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        if count:
            log.warning("spool: discarded %d unacknowledged partial writes", count)
        return count

    @staticmethod
    def _scan(folder: Path) -> list[SpoolEntry]:
        entries = (SpoolEntry.parse(p) for p in folder.iterdir())
        return sorted(e for e in entries if e is not None)
