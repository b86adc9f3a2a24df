"""Small durable state of the gateway's sync: JSON documents under ``spool_dir/state/``.

Each document (a feed cursor, the study -> case links) is replaced atomically: written to a
temporary file in the same folder, fsynced, renamed over the old one (POSIX ``rename`` is
atomic), and the folder fsynced, so a crash leaves either the old or the new content, never a
torn file. Values hold UIDs and ids only, never patient data.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def state_dir(spool_dir: Path) -> Path:
    """``spool_dir/state``, created when missing."""
    folder = Path(spool_dir) / "state"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class StateFile:
    """One JSON document, read once and replaced atomically on every :meth:`save`."""

    def __init__(self, path: Path, default: Any) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self.data: Any = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            self.data = default

    def save(self, data: Any) -> None:
        """Replace the document with ``data`` (durably, atomically)."""
        with self._lock:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            with tmp.open("w", encoding="utf-8") as handle:
                json.dump(data, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.data = data


class Cursor:
    """A persisted feed position (an Orthanc change sequence number, an instant …)."""

    def __init__(self, spool_dir: Path, name: str, default: Any) -> None:
        self._file = StateFile(state_dir(spool_dir) / f"{name}.json", {"value": default})

    @property
    def value(self) -> Any:
        """The position saved last."""
        return self._file.data.get("value")

    def advance(self, value: Any) -> None:
        """Save a new position."""
        if value != self.value:
            self._file.save({"value": value})


def secret_key(spool_dir: Path, name: str) -> bytes:
    """A random 32-byte key kept in ``state/<name>.key`` (mode 0600), made on first use: what
    makes the gateway's keyed derivations repeatable across restarts, and only here."""
    path = state_dir(spool_dir) / f"{name}.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another thread
        return path.read_bytes()
    key = os.urandom(32)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return key
