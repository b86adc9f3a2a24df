"""Websocket clients of a live ``mso serve`` and which of its worker processes holds them.

``mso serve --workers N`` is a supervisor whose children are the uvicorn workers, each with its
own ``SO_REUSEPORT`` listening socket (:mod:`fhir_server.serve`). Which worker took a client's
connection is read from Linux's ``/proc``: the server side of the connection is the TCP socket
whose local address is the server's port and whose remote address is the client's local port
(``/proc/net/tcp``, with its inode), and the worker is the child process that has a file
descriptor on that inode (``/proc/<pid>/fd/* -> socket:[inode]``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
from websockets.sync.client import ClientConnection, connect

LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (scanning ``/proc/*/stat`` for their parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def workers_of(supervisor: int) -> list[int]:
    """The uvicorn worker processes of an ``mso serve`` supervisor (its ``spawn`` children;
    multiprocessing's resource tracker is a child too, but no worker)."""
    workers = []
    for pid in children_of(supervisor):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(pid)
    return workers


def _server_side_inode(server_port: int, client_port: int) -> int | None:
    local = f"{LOOPBACK_HEX}:{server_port:04X}"
    remote = f"{LOOPBACK_HEX}:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[9])
    return None


def _holder_of(inode: int, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def worker_holding(
    supervisor: int, server_port: int, client_port: int, timeout: float = 5.0
) -> int:
    """The worker process of ``supervisor`` holding the server side of the TCP connection from
    the loopback port ``client_port`` to ``server_port``."""
    deadline = time.monotonic() + timeout
    while True:
        inode = _server_side_inode(server_port, client_port)
        if inode:
            pid = _holder_of(inode, workers_of(supervisor))
            if pid is not None:
                return pid
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no worker of process {supervisor} holds the connection from port "
                f"{client_port} (inode {inode})"
            )
        time.sleep(0.05)


class Socket:
    """A websocket client of the server's Subscription channel (synchronous ``websockets``)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        # entered as a context manager (websockets >= 17 warns about a bare connect())
        self.ws: ClientConnection = connect(
            url, additional_headers=headers or {}, open_timeout=10, close_timeout=2
        ).__enter__()

    @property
    def local_port(self) -> int:
        return int(self.ws.local_address[1])

    def send(self, text: str) -> None:
        self.ws.send(text)

    def recv(self, timeout: float) -> str | None:
        """The next text frame, or ``None`` when none came within ``timeout`` seconds."""
        try:
            frame = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        assert isinstance(frame, str), f"a binary frame: {frame!r}"
        return frame

    def expect(self, timeout: float = 30.0) -> str:
        frame = self.recv(timeout)
        assert frame is not None, f"no frame within {timeout} s"
        return frame

    def expect_json(self, timeout: float = 30.0) -> dict[str, Any]:
        return orjson.loads(self.expect(timeout))

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
