"""A rest-hook endpoint on loopback for the Subscription tests: records every request (method,
path, headers, body and the status it was answered) and answers ``statuses`` in turn, then
200."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Receiver:
    """What a running :func:`receiving` endpoint got, and what it is to answer next."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def paths(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in arrival order."""
        with self.lock:
            return [(r["method"], r["path"]) for r in self.requests]

    def delivered(self) -> list[str]:
        """The paths answered 200, in arrival order."""
        with self.lock:
            return [r["path"] for r in self.requests if r["status"] == 200]


@contextmanager
def receiving(statuses: list[int] | None = None) -> Iterator[Receiver]:
    """A :class:`Receiver` serving on a free loopback port until the block ends."""
    got = Receiver(statuses=list(statuses or ()))

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with got.lock:
                status = got.statuses.pop(0) if got.statuses else 200
                got.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "status": status,
                    }
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _answer

        def log_message(self, *args: Any) -> None:
            pass

    got.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=got.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        got.server.shutdown()
        got.server.server_close()
