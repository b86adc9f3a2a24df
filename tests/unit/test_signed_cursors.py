"""Signed paging cursors (fhir_server.storage.cursors) and the Parameters shape check."""

from __future__ import annotations

import pytest

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.operations.parameters import BAD_PARAMETERS, check_parameters
from fhir_server.storage.cursors import seal, unseal

KEY = b"k" * 32


def test_a_sealed_payload_opens_with_its_key_and_purpose() -> None:
    token = seal({"k": [1, "a"], "t": 3}, KEY, "search")
    assert unseal(token, KEY, "search") == {"k": [1, "a"], "t": 3}


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t.split(".")[0],
        lambda t: "A" + t,
        lambda t: t.replace(".", ".."),
        lambda t: t + "\u00e9",
        lambda t: "",
        lambda t: "not a cursor",
    ],
)
def test_a_changed_token_does_not_open(mangle) -> None:
    assert unseal(mangle(seal([1, 2], KEY, "search")), KEY, "search") is None


def test_another_purpose_or_key_does_not_open() -> None:
    token = seal([1, 2], KEY, "history")
    assert unseal(token, KEY, "search") is None
    assert unseal(token, b"x" * 32, "history") is None


@pytest.mark.parametrize(
    "parameter",
    [
        1,
        [1],
        ["x"],
        [{"valueString": "no name"}],
        [{"name": {"a": 1}}],
        [{"name": "a", "valueString": {"a": 1}}],
        [{"name": "a", "valueCoding": "x"}],
        [{"name": "a", "resource": []}],
        [{"name": "a", "part": {"name": "b"}}],
        [{"name": "a", "part": [{"name": "b", "part": [2]}]}],
    ],
)
def test_a_malformed_parameters_body_is_refused(parameter) -> None:
    with pytest.raises(FhirError) as caught:
        check_parameters({"resourceType": "Parameters", "parameter": parameter})
    assert caught.value.status == 400 and caught.value.code == BAD_PARAMETERS


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"resourceType": "Patient", "parameter": 1},
        {"resourceType": "Parameters"},
        {"resourceType": "Parameters", "parameter": [
            {"name": "a", "valueString": "x", "_valueString": {"id": "e"}},
            {"name": "b", "valueCoding": {"code": "c"}, "part": [{"name": "c", "valueInteger": 1}]},
            {"name": "r", "resource": {"resourceType": "Patient"}},
        ]},
    ],
)  # fmt: skip
def test_a_well_formed_or_other_body_passes(body) -> None:
    check_parameters(body)
