"""``mso serve``: uvicorn workers, each with its own ``SO_REUSEPORT`` listening socket.

uvicorn's own multi-worker mode shares one listening socket between the workers; each wakes
and accepts every pending connection, so a burst of keep-alive connections can all land on one
worker while the other idles. With one ``SO_REUSEPORT`` socket per worker the kernel spreads
new connections across the workers. The supervisor restarts a worker that dies and stops them
all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import time
from typing import Any

APP = "fhir_server.app:app_from_env"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(host: str, port: int, log_level: str, access_log: bool) -> None:
    import uvicorn

    sock = _listen(host, port)
    config = uvicorn.Config(
        APP, factory=True, host=host, port=port, log_level=log_level, access_log=access_log
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve(*, host: str, port: int, workers: int, log_level: str, access_log: bool) -> int:
    """Serve the app on ``host:port`` with ``workers`` processes until a signal stops it."""
    if workers <= 1 or not hasattr(socket, "SO_REUSEPORT"):
        import uvicorn

        uvicorn.run(
            APP,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=access_log,
        )
        return 0
    spawn = multiprocessing.get_context("spawn")
    args = (host, port, log_level, access_log)
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
