"""The output files of export jobs: one folder a job, NDJSON files in it
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html#file-request).

A file is written under a temporary name, flushed to disk (``fsync``) and renamed to its final
name only when complete, so a file that has its name is whole. Its name is decided by the
job's checkpoint (type and part number), not by the worker: a worker that died after the
rename but before its checkpoint was committed leaves a file its successor writes again under
the same name, so no resource is exported twice.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

FILE_NAME = re.compile(r"^[A-Za-z]{1,64}-\d{1,6}\.ndjson$")
CHUNK = 256 * 1024


def part_name(kind: str, number: int) -> str:
    """The file name of part ``number`` of ``kind`` (a resource type, or ``deleted``)."""
    return f"{kind}-{number}.ndjson"


class PartWriter:
    """One output file being written; whole on disk only after :meth:`commit`."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.with_name(final.name + ".part")
        self._file: BinaryIO = open(self.temp, "wb")  # noqa: SIM115 (closed by commit/discard)
        self.size = 0
        self.count = 0

    def write_line(self, chunks: Iterator[bytes] | bytes) -> None:
        """Append one NDJSON line (one resource), given whole or as chunks."""
        if isinstance(chunks, bytes):
            self._file.write(chunks)
            self.size += len(chunks)
        else:
            for chunk in chunks:
                self._file.write(chunk)
                self.size += len(chunk)
        self._file.write(b"\n")
        self.size += 1
        self.count += 1

    def commit(self) -> None:
        """Make the file durable under its final name."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.final)
        _fsync_dir(self.final.parent)

    def discard(self) -> None:
        """Drop the unfinished file."""
        self._file.close()
        self.temp.unlink(missing_ok=True)


class OutputStore:
    """The folder of export output files, ``<root>/<job id>/<file>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        """The folder of one job's files."""
        return self.root / job_id

    def open_part(self, job_id: str, name: str) -> PartWriter:
        """A writer of ``name`` in ``job_id``'s folder (created when missing)."""
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        return PartWriter(folder / name)

    def path(self, job_id: str, name: str) -> Path | None:
        """The finished file ``name`` of ``job_id``, or ``None`` (an unknown or unsafe name)."""
        if not FILE_NAME.match(name):
            return None
        path = self.job_dir(job_id) / name
        return path if path.is_file() else None

    def read(self, path: Path) -> Iterator[bytes]:
        """The content of a finished file, in chunks."""
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def remove(self, job_id: str) -> None:
        """Delete every file of ``job_id``."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
