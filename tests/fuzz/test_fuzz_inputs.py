"""Each kind of hostile input on its own, with more examples than the route sweep gives it:
bodies on every route that reads one, search query strings, paging cursors, headers, and the
parameters of every registered operation (issue 21). Then the request shapes of the issue's
table, sent as they were found. The invariants are :class:`tests.fuzz.probe.Probe`'s."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_server.interactions.table import ROUTES
from tests.fuzz.conftest import examples
from tests.fuzz.strategies import (
    AUTH_KINDS,
    BODY_METHODS,
    CONTENT_TYPES,
    TYPES,
    FuzzRequest,
    bodies,
    cursors,
    encode,
    fhirpath_patches,
    fresh_id,
    header_sets,
    json_patches,
    operation_targets,
    parameters,
    queries,
    route_label,
)

BODY_ROUTES = [
    pytest.param(route, id=route_label(route)) for route in ROUTES if route.method in BODY_METHODS
]
OPERATIONS = [pytest.param(path, id=label) for label, path in operation_targets()]


def _fill(pattern: tuple[str, ...], fuzz, resource_type: str) -> str:
    """A route's path with its placeholders set to things that exist (or plausibly could)."""
    values = {
        "{type}": resource_type,
        "{ctype}": "Observation",
        "{id}": fuzz.known.task if resource_type == "Task" else fuzz.patient,
        "{vid}": "1",
        "{op}": "$validate",
    }
    return "/".join(values.get(p, p) for p in pattern)


@pytest.mark.parametrize("route", BODY_ROUTES)
@settings(max_examples=examples(2))
@given(data=st.data())
def test_bodies(fuzz, route, data) -> None:
    resource_type = data.draw(st.sampled_from(["Patient", "Task", "Bundle", "Parameters"]))
    query = f"_id={fresh_id()}" if route.conditional else ""
    patch = route.method == "PATCH"
    body = data.draw(
        st.one_of(bodies(fuzz.known.ids), (json_patches() if patch else parameters()).map(_json)),
        label="body",
    )
    content_type = data.draw(
        st.sampled_from(
            ["application/json-patch+json"] * patch + ["application/fhir+json", *CONTENT_TYPES]
        )
    )
    fuzz.probe.send(
        FuzzRequest(
            route.method,
            _fill(route.pattern, fuzz, resource_type),
            query,
            {"Content-Type": content_type},
            body,
            data.draw(st.sampled_from(AUTH_KINDS)),
        )
    )


@settings(max_examples=examples(4))
@given(data=st.data())
def test_fhirpath_patches(fuzz, data) -> None:
    body = _json(data.draw(fhirpath_patches(), label="patch"))
    headers = {"Content-Type": "application/fhir+json"}
    fuzz.probe.send(FuzzRequest("PATCH", f"Patient/{fuzz.patient}", "", headers, body))


@settings(max_examples=examples(6))
@given(data=st.data())
def test_search_queries(fuzz, data) -> None:
    resource_type = data.draw(st.sampled_from(TYPES))
    query = data.draw(queries(fuzz.known.params_of(resource_type)), label="query")
    where = data.draw(st.sampled_from(["type", "post", "system", "compartment"]))
    auth = data.draw(st.sampled_from(AUTH_KINDS))
    if where == "post":
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        request = FuzzRequest("POST", f"{resource_type}/_search", "", form, query.encode(), auth)
    elif where == "system":
        request = FuzzRequest("GET", "", query, auth=auth)
    elif where == "compartment":
        request = FuzzRequest("GET", f"Patient/{fuzz.patient}/{resource_type}", query, auth=auth)
    else:
        request = FuzzRequest("GET", resource_type, query, auth=auth)
    fuzz.probe.send(request)


@settings(max_examples=examples(4))
@given(data=st.data())
def test_cursors(fuzz, data) -> None:
    cursor = data.draw(cursors(), label="cursor")
    path = data.draw(st.sampled_from(["Patient", "Task", "AuditEvent", "", "Patient/_history"]))
    count = data.draw(st.sampled_from(["", "&_count=1", "&_count=0", "&_total=accurate"]))
    fuzz.probe.send(FuzzRequest("GET", path, f"_cursor={encode(cursor)}{count}"))


@settings(max_examples=examples(4))
@given(data=st.data())
def test_headers(fuzz, data) -> None:
    headers = data.draw(header_sets(), label="headers")
    method, path = data.draw(
        st.sampled_from(
            [
                ("GET", f"Patient/{fuzz.patient}"),
                ("GET", "Patient"),
                ("POST", "Patient"),
                ("PUT", f"Patient/{fresh_id()}"),
                ("PUT", f"Patient/{fuzz.patient}"),
                ("DELETE", f"Patient/{fresh_id()}"),
                ("POST", ""),
            ]
        )
    )
    body = None
    if method in BODY_METHODS:
        resource = {"resourceType": "Patient", "active": True}
        if path:
            resource["id"] = path.rsplit("/", 1)[-1]
        if not path:
            resource = {"resourceType": "Bundle", "type": "batch"}
        body = _json(resource)
    auth = data.draw(st.sampled_from(AUTH_KINDS))
    fuzz.probe.send(FuzzRequest(method, path, "", headers, body, auth))


@pytest.mark.parametrize("template", OPERATIONS)
@settings(max_examples=examples(1))
@given(data=st.data())
def test_operation_parameters(fuzz, template, data) -> None:
    path = template.replace("{id}", fuzz.known.task if "Task/" in template else fuzz.patient)
    method = data.draw(st.sampled_from(["POST", "POST", "GET"]))
    body = None
    query = ""
    if method == "POST":
        body = data.draw(st.one_of(parameters().map(_json), bodies(fuzz.known.ids)), label="body")
    else:
        query = data.draw(queries(), label="query")
    auth = data.draw(st.sampled_from(AUTH_KINDS))
    headers = {"Content-Type": "application/fhir+json"}
    fuzz.probe.send(FuzzRequest(method, path, query, headers, body, auth))


def _json(value: object) -> bytes:
    import json

    return json.dumps(value).encode()
