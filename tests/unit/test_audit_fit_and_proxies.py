"""Audit columns hold any value (:func:`fhir_server.audit.store.fit`), and ``mso serve``
honours forwarding headers only from ``MSO_TRUSTED_PROXIES`` (issue 21)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from pydantic import ValidationError

from fhir_server.audit import store
from fhir_server.config import Settings
from fhir_server.serve import proxy_options


def test_a_value_that_fits_is_kept() -> None:
    assert store.fit("10.0.0.1", 64) == "10.0.0.1"
    assert store.fit(None, 64) is None


def test_a_long_value_is_cut_with_a_marker_and_a_digest() -> None:
    value = "x" * 300
    cut = store.fit(value, 64)
    assert cut is not None and len(cut) == 64
    assert cut.startswith("x" * 51) and cut[51] == "…"
    assert store.fit(value[:-1] + "y", 64) != cut  # same prefix, another value
    assert store.fit(value, 64) == cut  # a search value is cut alike


def test_nul_and_code_columns() -> None:
    assert store.fit("a\x00b", 64) == "a\ufffdb"
    assert store.fit("XYZ", 1) == "X"


def test_a_row_can_always_be_made() -> None:
    """An event ``prepare`` refuses still gets a row: its JSON, an id, no searchable columns."""
    event = {"resourceType": "AuditEvent", "recorded": "not an instant", "x": {1, 2}}
    with pytest.raises(Exception):  # noqa: B017 - any error: the event is malformed
        store.prepare(event)
    row = store.bare_prepare(event)
    assert row["content"] and row["id"] and isinstance(row["recorded_ms"], int)
    assert all(row[name] is None for name in store.SEARCH_COLUMNS)
    renamed = store.renamed(row)
    assert renamed["id"] != row["id"] and renamed["id"].encode() in renamed["content"]


def test_a_given_id_the_column_cannot_hold_is_replaced() -> None:
    event = {"resourceType": "AuditEvent", "recorded": "2026-01-01T00:00:00Z", "id": "i" * 65}
    body, row = store.prepare(event)
    assert body["id"] == row["id"] and len(row["id"]) == 36


def _client_seen(trusted_proxies: str, peer: str, forwarded: str) -> Any:
    """The ASGI ``client`` the app gets behind uvicorn configured as ``mso serve`` does."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["client"] = scope["client"]

    config = uvicorn.Config(app, log_config=None, **proxy_options(trusted_proxies))
    config.load()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "client": (peer, 5000),
        "headers": [(b"x-forwarded-for", forwarded.encode())],
    }
    asyncio.run(config.loaded_app(scope, None, None))
    return seen["client"][0]


def test_no_forwarding_header_is_trusted_by_default() -> None:
    assert proxy_options(Settings(_env_file=None).trusted_proxies)["proxy_headers"] is False
    assert _client_seen("", "127.0.0.1", "203.0.113.1") == "127.0.0.1"


def test_forwarding_headers_are_trusted_from_the_configured_proxies_only() -> None:
    trusted = "10.0.0.5,192.168.0.0/16"
    assert _client_seen(trusted, "10.0.0.5", "203.0.113.1") == "203.0.113.1"
    assert _client_seen(trusted, "192.168.7.7", "203.0.113.1") == "203.0.113.1"
    assert _client_seen(trusted, "10.0.0.6", "203.0.113.1") == "10.0.0.6"
    assert _client_seen(trusted, "127.0.0.1", "203.0.113.1") == "127.0.0.1"


def test_the_setting_accepts_addresses_and_networks_only(monkeypatch) -> None:
    monkeypatch.setenv("MSO_TRUSTED_PROXIES", " 10.1.2.3/8 , ::1 ")
    assert Settings(_env_file=None).trusted_proxies == "10.0.0.0/8,::1"
    monkeypatch.setenv("MSO_TRUSTED_PROXIES", "proxy.local")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
