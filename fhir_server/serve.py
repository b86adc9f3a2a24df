"""``mso serve``: uvicorn workers, each with its own ``SO_REUSEPORT`` listening socket.

uvicorn's own multi-worker mode shares one listening socket between the workers; each wakes
and accepts every pending connection, so a burst of keep-alive connections can all land on one
worker while the other idles. With one ``SO_REUSEPORT`` socket per worker the kernel spreads
new connections across the workers. The supervisor restarts a worker that dies and stops them
all on SIGINT/SIGTERM.

The access log (``MSO_ACCESS_LOG``, on by default; ``--no-access-log``) is :class:`AccessLog`,
one line per request on stdout from the logger ``fhir_server.access``: client address, method,
path, status and duration. It replaces uvicorn's, which writes the query string (search values
can be patient data, ``name=Smith``) and no duration. The path is the raw, still
percent-encoded one, so a decoded control character cannot forge a log line.

Forwarding headers (``X-Forwarded-For``, ``X-Forwarded-Proto``) are honoured only on connections
from ``MSO_TRUSTED_PROXIES`` (:func:`proxy_options`); from anyone else they are ignored, so the
client address that the audit trail and the login lockout record is the connection's own.
uvicorn's default (trust 127.0.0.1 and ::1) would let any local process forge it.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

APP = "fhir_server.serve:app_factory"
ACCESS_LOGGER = "fhir_server.access"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class AccessLog:
    """ASGI wrapper logging each HTTP request once it is answered (or failed: status 500)."""

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.state = getattr(app, "state", None)
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Pass the event on; for HTTP, note the response status and log when done."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            raw = scope.get("raw_path")
            path = raw.decode("latin-1") if raw else scope["path"]
            self.log.info(
                "%s %s %s %d %.1fms",
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                path.partition("?")[0],
                status,
                (time.perf_counter() - started) * 1000.0,
            )


def app_factory() -> Any:
    """The factory uvicorn runs in each worker: the app of the environment's settings, inside
    :class:`AccessLog` unless ``MSO_ACCESS_LOG`` is off."""
    from fhir_server.app import create_app
    from fhir_server.config import Settings

    settings = Settings()
    app = create_app(settings)
    return AccessLog(app) if settings.access_log else app


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes each record without flushing it: a daemon thread flushes
    the stream every ``interval`` seconds (and ``logging.shutdown`` at exit). Flushing every
    access-log line costs a write system call per request on the event loop."""

    def __init__(self, stream: Any = None, interval: float = 0.5) -> None:
        super().__init__(stream)
        self.interval = interval
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record (called under the handler's lock)."""
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_periodically, name="access-log-flush", daemon=True
            )
            self._flusher.start()

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration plus the access logger (to stdout, with a timestamp)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["mso_access"] = {"format": "%(asctime)s %(message)s"}
    config["handlers"]["mso_access"] = {
        "formatter": "mso_access",
        "()": BufferedStreamHandler,
        "stream": "ext://sys.stdout",
    }
    config["loggers"][ACCESS_LOGGER] = {
        "handlers": ["mso_access"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def proxy_options(trusted_proxies: str) -> dict[str, Any]:
    """uvicorn's proxy-header options for ``MSO_TRUSTED_PROXIES`` (comma-separated addresses
    and networks): off when it is empty, else trusting exactly those peers."""
    proxies = [item.strip() for item in trusted_proxies.split(",") if item.strip()]
    if not proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": []}
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def _uvicorn_options(log_level: str, trusted_proxies: str) -> dict[str, Any]:
    """What every uvicorn process gets; its own access log stays off (see :class:`AccessLog`)."""
    return {
        "factory": True,
        "log_level": log_level,
        "access_log": False,
        "log_config": log_config(),
        **proxy_options(trusted_proxies),
    }


def _worker(host: str, port: int, log_level: str, trusted_proxies: str) -> None:
    import uvicorn

    sock = _listen(host, port)
    options = _uvicorn_options(log_level, trusted_proxies)
    config = uvicorn.Config(APP, host=host, port=port, **options)
    uvicorn.Server(config).run(sockets=[sock])


def serve(*, host: str, port: int, workers: int, log_level: str, access_log: bool) -> int:
    """Serve the app on ``host:port`` with ``workers`` processes until a signal stops it.

    ``access_log`` reaches the workers as ``MSO_ACCESS_LOG`` (they build the app from the
    environment); so does ``MSO_TRUSTED_PROXIES``, read here for uvicorn's proxy options."""
    from fhir_server.config import Settings

    os.environ["MSO_ACCESS_LOG"] = "true" if access_log else "false"
    trusted_proxies = Settings().trusted_proxies
    if workers <= 1 or not hasattr(socket, "SO_REUSEPORT"):
        import uvicorn

        options = _uvicorn_options(log_level, trusted_proxies)
        uvicorn.run(APP, host=host, port=port, workers=workers, **options)
        return 0
    spawn = multiprocessing.get_context("spawn")
    args = (host, port, log_level, trusted_proxies)
    procs: list[Any] = []
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for _ in range(workers):
        proc = spawn.Process(target=_worker, args=args, daemon=False)
        proc.start()
        procs.append(proc)
    try:
        while not stopping:
            time.sleep(0.5)
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stopping:
                    replacement = spawn.Process(target=_worker, args=args, daemon=False)
                    replacement.start()
                    procs[i] = replacement
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
    return 0
