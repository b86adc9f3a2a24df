"""A real server process (``mso serve``) on a free loopback port, per database backend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.smtp_server import free_port

_SERVER_DB: dict[str, str] = {}


def server_auth(base: str) -> dict[str, str]:
    """A system ``Authorization`` header for the live server at ``base``."""
    from tests.conftest import authorized

    return authorized(_SERVER_DB[base], base)


def start_server(
    db_url: str, data_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``mso serve`` (with ``env`` added to its environment) and wait until
    ``/fhir/metadata`` answers. Its log goes to ``data_dir/server.log``: a pipe nobody reads
    would stall a chatty server."""
    port = free_port()
    env = {
        **os.environ,
        "MSO_DATABASE_URL": db_url,
        "MSO_DATA_DIR": str(data_dir),
        **(env or {}),
    }
    env.pop("MSO_BASE_URL", None)
    log_path = data_dir / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhir_server.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()  # the child holds its own descriptor
    base = f"http://127.0.0.1:{port}/fhir"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/metadata?_summary=true", timeout=2).status_code == 200:
                _SERVER_DB[base] = db_url
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 60 s")


@pytest.fixture(scope="module")
def server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a live server on the session database."""
    proc, base = start_server(db_url, tmp_path_factory.mktemp("server-data"))
    try:
        yield base
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server :func:`start_server` started (killed if it does not stop in 15 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
