"""The route table: which handler a method and path reach, and 404/405 for the rest."""

from __future__ import annotations

import pytest

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions import create, delete, history, read, transaction, update
from fhir_server.interactions.base import FhirRequest, Prefer
from fhir_server.interactions.table import resolve


@pytest.mark.parametrize(
    ("method", "path", "handler", "fields"),
    [
        ("GET", "Patient/1", read.read, {"resource_type": "Patient", "resource_id": "1"}),
        ("GET", "Patient/1/_history/2", read.vread, {"version_id": "2"}),
        ("POST", "Patient", create.create, {"resource_type": "Patient"}),
        ("PUT", "Patient/a.b-c", update.update, {"resource_id": "a.b-c"}),
        ("PUT", "Patient", update.conditional_update, {}),
        ("DELETE", "Patient/1", delete.delete, {}),
        ("GET", "_history", history.history, {"resource_type": None}),
        ("GET", "Patient/_history", history.history, {"resource_type": "Patient"}),
        ("GET", "Patient/1/_history", history.history, {"resource_id": "1"}),
        ("POST", "", transaction.transaction_or_batch, {}),
    ],
)
def test_routes(method, path, handler, fields):
    req = FhirRequest(method=method)
    assert resolve(method, path, req) is handler
    for name, value in fields.items():
        assert getattr(req, name) == value


def test_operations_and_compartments_fill_the_request():
    req = FhirRequest(method="POST")
    resolve("POST", "Patient/1/$everything", req)
    assert (req.resource_type, req.resource_id, req.operation) == ("Patient", "1", "everything")
    req = FhirRequest(method="GET")
    resolve("GET", "Patient/1/Observation", req)
    assert req.compartment_type == "Observation"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "Patient/1", 405),
        ("DELETE", "", 405),
        ("GET", "a/b/c/d/e", 404),
        ("GET", "Patient/1/_history/2/x", 404),
    ],
)
def test_unknown_paths_and_methods(method, path, status):
    with pytest.raises(FhirError) as caught:
        resolve(method, path, FhirRequest(method=method))
    assert caught.value.status == status
    if status == 405:
        assert caught.value.headers["Allow"]


def test_prefer_header_parsing():
    prefer = Prefer.parse('return=minimal, handling="strict"; respond-async')
    assert (prefer.return_, prefer.handling, prefer.respond_async) == ("minimal", "strict", True)
    assert Prefer.parse(None).return_ is None
