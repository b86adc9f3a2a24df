"""The access log of ``mso serve``: one line per request, no query string, status, duration."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fhir_server.serve import ACCESS_LOGGER, AccessLog


async def _answer(status: int, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _request(app: AccessLog, **scope_items: object) -> list[dict]:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/fhir/Patient",
        "raw_path": b"/fhir/Patient",
        "query_string": b"name=Smith&birthdate=1970-01-01",
        "client": ("10.1.2.3", 40000),
        **scope_items,
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_one_line_without_the_query_string(caplog) -> None:
    app = AccessLog(lambda scope, receive, send: _answer(200, scope, receive, send))
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        sent = _request(app)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    line = record.getMessage()
    assert line.startswith("10.1.2.3:40000 GET /fhir/Patient 200 ")
    assert line.endswith("ms")
    assert "Smith" not in line and "?" not in line


def test_raw_path_is_logged_encoded(caplog) -> None:
    """A decoded newline in the path cannot start a forged log line."""
    app = AccessLog(lambda scope, receive, send: _answer(404, scope, receive, send))
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        _request(app, path="/x\nGET /fhir/forged 200", raw_path=b"/x%0AGET%20/fhir/forged%20200")
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert "\n" not in record.getMessage() and " 404 " in record.getMessage()


def test_a_failing_app_is_logged_as_500(caplog) -> None:
    async def broken(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER), pytest.raises(RuntimeError):
        _request(AccessLog(broken), method="POST", client=None)
    [record] = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.getMessage().startswith("- POST /fhir/Patient 500 ")


def test_lifespan_events_pass_through() -> None:
    seen: list[str] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        seen.append(scope["type"])

    asyncio.run(AccessLog(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]
