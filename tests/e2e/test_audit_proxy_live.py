"""A live ``mso serve``: the audited client address is the connection's own unless the peer is
a configured proxy (``MSO_TRUSTED_PROXIES``), and a 300-character forwarded address from that
proxy is audited (issue 21)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import server_auth, start_server, stop_server


@pytest.fixture(scope="module")
def proxied(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live server trusting forwarding headers from the loopback (where the tests connect)."""
    data = tmp_path_factory.mktemp("proxied-server")
    proc, base = start_server(db_url, data, workers=1, env={"MSO_TRUSTED_PROXIES": "127.0.0.1"})
    try:
        yield base
    finally:
        stop_server(proc)


def _audited(base: str, marker: str, forwarded: str) -> list[dict[str, Any]]:
    """Read Patient/<marker> with ``X-Forwarded-For: forwarded``; its AuditEvents once stored."""
    with httpx.Client(base_url=base, headers=server_auth(base), timeout=30) as http:
        read = http.get(f"/Patient/{marker}", headers={"X-Forwarded-For": forwarded})
        assert read.status_code == 404
        deadline = time.monotonic() + 10  # the writer stores every 0.2 s
        while time.monotonic() < deadline:
            bundle = http.get("/AuditEvent", params={"entity": f"Patient/{marker}"}).json()
            if bundle.get("entry"):
                return [e["resource"] for e in bundle["entry"]]
            time.sleep(0.2)
    raise AssertionError("the read was not audited")


def test_a_forged_forwarded_for_is_ignored_by_default(server) -> None:
    (event,) = _audited(server, uuid.uuid4().hex, "203.0.113.50")
    assert event["agent"][0]["network"]["address"] == "127.0.0.1"


def test_a_configured_proxy_forwards_the_address_whatever_its_length(proxied) -> None:
    (event,) = _audited(proxied, uuid.uuid4().hex, "203.0.113.51")
    assert event["agent"][0]["network"]["address"] == "203.0.113.51"
    forwarded = "h" * 300
    (event,) = _audited(proxied, uuid.uuid4().hex, forwarded)
    assert event["agent"][0]["network"]["address"] == forwarded
