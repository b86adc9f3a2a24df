"""Every route of the route table, fuzzed: placeholders filled with known and hostile values,
hostile query strings, headers, bodies and credentials (issue 21). The routes are read from
:data:`fhir_server.interactions.table.ROUTES`, so a new route is fuzzed without a change here.
The invariants are :class:`tests.fuzz.probe.Probe`'s."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_server.interactions.table import ROUTES
from tests.fuzz.conftest import examples
from tests.fuzz.strategies import FuzzRequest, route_label, route_requests

ROUTE_PARAMS = [pytest.param(route, id=route_label(route)) for route in ROUTES]


@pytest.mark.parametrize("route", ROUTE_PARAMS)
@settings(max_examples=examples(1))
@given(data=st.data())
def test_every_route_keeps_the_invariants(fuzz, route, data) -> None:
    fuzz.probe.send(data.draw(route_requests(route, fuzz.known), label="request"))


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "HEAD", "PROPFIND"])
def test_other_methods_are_refused_with_an_outcome(fuzz, method) -> None:
    response = fuzz.probe.send(FuzzRequest(method, "Patient"))
    assert response.status_code == 405


@pytest.mark.parametrize(
    "request_", [FuzzRequest("GET", "Patient/x/y/z/w/v"), FuzzRequest("DELETE", "_history")]
)
def test_unrouted_requests_are_audited(fuzz, request_) -> None:
    import uuid

    from fastapi.testclient import TestClient

    address = f"fz-{uuid.uuid4().hex[:20]}"
    http = TestClient(fuzz.probe.app, client=(address, 40000))
    response = http.request(
        request_.method, request_.url(), headers={"Authorization": fuzz.probe.credentials["system"]}
    )
    assert response.status_code in (404, 405)
    assert fuzz.probe.audited(address)
