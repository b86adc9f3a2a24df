"""The hostile requests of issue 21's report, sent as they were found, through the fuzz
suite's invariants (no 5xx, an MSO OperationOutcome for every 4xx, every request audited,
FHIR JSON that parses with an integer Bundle.total). The fixes' own regression tests assert
their particular statuses and codes; these keep the shapes in the sweep whatever the fix."""

from __future__ import annotations

import base64
import json

import pytest

from tests.fuzz.strategies import FuzzRequest

_FHIR = {"Content-Type": "application/fhir+json"}


def _cursor(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _body(value: object) -> bytes:
    return json.dumps(value).encode()


_PAGE = {"p": 1, "b": False, "m": 10**6, "t": None}
_TOTAL_ZZ = _cursor({**_PAGE, "k": [], "t": "zz"})
SHAPES = {
    "GET Patient/%00": ("GET", "Patient/%00", "", {}, None),
    "DELETE Patient/%00": ("DELETE", "Patient/%00", "", {}, None),
    "vread 2147483648": ("GET", "Patient/{patient}/_history/2147483648", "", {}, None),
    "vread 20 digits": ("GET", "Patient/{patient}/_history/99999999999999999999", "", {}, None),
    "cursor k [null]": ("GET", "Patient", "_cursor=" + _cursor({**_PAGE, "k": [None]}), {}, None),
    "cursor k [[1]]": ("GET", "Patient", "_cursor=" + _cursor({**_PAGE, "k": [[1]]}), {}, None),
    "cursor k [x]": ("GET", "Patient", "_cursor=" + _cursor({**_PAGE, "k": ["x"]}), {}, None),
    "cursor t zz": (
        "GET",
        "Patient",
        f"_cursor={_TOTAL_ZZ}",
        {},
        None,
    ),
    "$answer parameter [1]": (
        "POST",
        "Task/{task}/$answer",
        "",
        _FHIR,
        _body({"resourceType": "Parameters", "parameter": [1]}),
    ),
    "$mso-stats parameter [x]": (
        "POST",
        "$mso-stats",
        "",
        _FHIR,
        _body({"resourceType": "Parameters", "parameter": ["x"]}),
    ),
    "FHIRPath Patch part name an object": (
        "PATCH",
        "Patient/{patient}",
        "",
        _FHIR,
        _body(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {
                        "name": "operation",
                        "part": [
                            {"name": "type", "valueCode": "add"},
                            {"name": {"x": 1}, "valueString": "a"},
                        ],
                    }
                ],
            }
        ),
    ),
    "name=%00": ("GET", "Patient", "name=%00", {}, None),
    "name=x repeated 200 times": ("GET", "Patient", "&".join(["name=x"] * 200), {}, None),
    "X-Forwarded-For of 100 characters": (
        "GET",
        "Patient/{patient}",
        "",
        {"X-Forwarded-For": "1" * 100},
        None,
    ),
    "id of 70 characters": ("GET", "Patient/" + "i" * 70, "", {}, None),
    "patient= of 100 characters": ("GET", "Observation", "patient=" + "p" * 100, {}, None),
    "create with an id of 80 characters": (
        "PUT",
        "Patient/" + "c" * 80,
        "",
        _FHIR,
        _body({"resourceType": "Patient", "id": "c" * 80}),
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_issue_21_shapes_keep_the_invariants(fuzz, shape) -> None:
    method, path, query, headers, body = SHAPES[shape]
    path = path.format(patient=fuzz.patient, task=fuzz.known.task)
    response = fuzz.probe.send(FuzzRequest(method, path, query, headers, body))
    if shape == "name=%00" and response.status_code == 200:
        # The criterion must not be dropped: the world's patient is not named NUL.
        ids = {e["resource"]["id"] for e in response.json().get("entry", ())}
        assert fuzz.patient not in ids, "name=%00 was ignored: every Patient came back"
