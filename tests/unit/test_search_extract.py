"""Index extraction: the compiled FHIRPath subset agrees with fhirpathpy; rows per type.

http://hl7.org/fhir/R4/search.html#ptypes
"""

from __future__ import annotations

import pytest
from fhirpathpy import evaluate as fp_evaluate
from fhirpathpy.models import models

from fhir_server.search.extract import extract_rows
from fhir_server.search.fhirpath import CompiledPath
from fhir_server.search.hashing import normalize
from fhir_server.search.registry import SearchRegistry

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "1", "tag": [{"system": "urn:t", "code": "x"}], "profile": ["http://p"]},
    "identifier": [
        {
            "system": "urn:mrn",
            "value": "42",
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                ]
            },
        }
    ],
    "active": True,
    "name": [{"family": "Müller", "given": ["Anna", "Béa"], "text": "Anna Müller"}],
    "telecom": [{"system": "phone", "value": "555-1"}, {"system": "email", "value": "a@x.org"}],
    "gender": "female",
    "birthDate": "1980-02-03",
    "deceasedBoolean": False,
    "address": [{"line": ["Main 1"], "city": "Berlin", "postalCode": "10115", "country": "DE"}],
    "generalPractitioner": [{"reference": "Practitioner/9"}],
    "managingOrganization": {"identifier": {"system": "urn:org", "value": "o1"}},
}
OBSERVATION = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "category": [{"coding": [{"system": "http://c", "code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
    "subject": {"reference": "Patient/p1"},
    "effectivePeriod": {"start": "2021-01-01", "end": "2021-01-02T10:00:00Z"},
    "valueQuantity": {
        "value": 72,
        "unit": "/min",
        "system": "http://unitsofmeasure.org",
        "code": "/min",
    },
    "component": [
        {"code": {"coding": [{"code": "c1"}]}, "valueQuantity": {"value": 7}},
        {"code": {"coding": [{"code": "c2"}]}, "valueCodeableConcept": {"text": "hi"}},
    ],
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"system": "http://c", "code": "AMB"},
    "subject": {"reference": "Patient/p1"},
    "participant": [{"individual": {"reference": "Practitioner/9"}}],
    "period": {"start": "2021-01-01T08:00:00+02:00"},
    "length": {"value": 30, "unit": "min"},
}


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


def _plain(value):
    return getattr(value, "data", value)


@pytest.mark.parametrize(
    "resource", [PATIENT, OBSERVATION, ENCOUNTER], ids=lambda r: r["resourceType"]
)
def test_compiled_paths_match_fhirpathpy(registry: SearchRegistry, resource: dict) -> None:
    rt = resource["resourceType"]
    checked = 0
    for param, path in registry.extractor(rt).paths:
        if not path.fast or "resolve()" in (param.expression or ""):
            continue
        ours = [n.value for n in path.evaluate(resource)]
        expr = " | ".join(
            p
            for p in param.expression.split(" | ")
            if p.lstrip("(").startswith((rt + ".", "Resource."))
        )
        expr = expr.replace("Resource.", rt + ".")  # fhirpathpy does not match Resource roots
        try:
            theirs = [_plain(v) for v in fp_evaluate(resource, expr, {}, models["r4"])]
        except ValueError:  # fhirpathpy insists on a singleton left of 'as'; we filter each item
            continue
        assert set(map(repr, ours)) == set(map(repr, theirs)), param.code  # union = distinct
        checked += 1
    assert checked > 10


def test_only_a_few_expressions_fall_back(registry: SearchRegistry) -> None:
    slow = [
        (rt, p.code)
        for rt in registry.resource_types
        for p, c in registry.extractor(rt).paths
        if not c.fast
    ]
    assert len(slow) < 10, slow


def test_patient_rows(registry: SearchRegistry) -> None:
    rows = extract_rows(registry, PATIENT)
    norms = {r["value_norm"] for r in rows["idx_string"]}
    assert {"muller", "anna", "bea", "berlin", "main 1"} <= norms
    codes = {(r["system"], r["code"]) for r in rows["idx_token"]}
    assert ("urn:mrn", "42") in codes and (None, "female") in codes and ("phone", "555-1") in codes
    assert ("urn:t", "x") in codes and (None, "true") in codes
    assert (None, "http://terminology.hl7.org/CodeSystem/v2-0203|MR|42") in codes  # :of-type
    assert ("urn:org", "o1") in codes  # logical reference (:identifier)
    refs = {(r["target_type"], r["target_id"]) for r in rows["idx_reference"]}
    assert ("Practitioner", "9") in refs
    assert {r["uri"] for r in rows["idx_uri"]} == {"http://p"}


def test_observation_rows(registry: SearchRegistry) -> None:
    rows = extract_rows(registry, OBSERVATION)
    dates = rows["idx_date"]
    assert any(r["high"] > r["low"] for r in dates)
    quantities = {(r["value"], r["code"], r["grp"]) for r in rows["idx_quantity"]}
    assert (72.0, "/min", 0) in quantities
    assert (7.0, None, 2) in quantities  # combo-code-value-quantity: component 1 is group 2
    assert {r["grp"] for r in rows["idx_token"]} >= {0, 1, 2}


def test_normalize() -> None:
    assert normalize("  Müller-Lüdenscheidt  ÉVA ") == "muller-ludenscheidt eva"
    assert normalize("Straße") == "strasse"


def test_fallback_expression_still_extracts(registry: SearchRegistry) -> None:
    path = CompiledPath("Bundle.entry[0].resource", "Bundle")
    assert not path.fast
    inner = {"resourceType": "Composition", "id": "c1"}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": inner}, {"resource": {}}]}
    assert [n.value for n in path.evaluate(bundle)] == [inner]


@pytest.mark.parametrize(
    "deceased",
    [{}, {"deceasedBoolean": True}, {"deceasedBoolean": False}, {"deceasedDateTime": "2020-01"}],
    ids=["absent", "true", "false", "dateTime"],
)
def test_present_and_not_false_is_compiled_and_agrees_with_fhirpathpy(
    registry: SearchRegistry, deceased: dict
) -> None:
    expression = "Patient.deceased.exists() and Patient.deceased != false"
    path = CompiledPath(expression, "Patient")
    assert path.fast
    patient = {"resourceType": "Patient", **deceased}
    theirs = fp_evaluate(patient, expression, {}, models["r4"])
    assert [n.value for n in path.evaluate(patient)] == theirs
    codes = {(r["system"], r["code"]) for r in extract_rows(registry, patient)["idx_token"]}
    assert (None, str(theirs[0]).lower()) in codes


def _doubled(value: object) -> object:
    """``value`` with every array holding each of its elements twice."""
    if isinstance(value, list):
        return [_doubled(v) for v in value for _ in range(2)]
    if isinstance(value, dict):
        return {k: _doubled(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("resource", [PATIENT, OBSERVATION], ids=["Patient", "Observation"])
def test_a_repeated_value_gives_one_row(registry: SearchRegistry, resource: dict) -> None:
    """Every type's extractor gives a value once however often it repeats (the indexer
    stores the rows as they come)."""
    once, twice = extract_rows(registry, resource), extract_rows(registry, _doubled(resource))
    for table, rows in twice.items():
        if table == "idx_text":  # one row of all the text, which doubles
            continue
        keys = [tuple(sorted(r.items())) for r in rows]
        assert len(keys) == len(set(keys)), table
        # composite values come in groups per element: doubled elements are more groups
        single = {k for k, r in zip(keys, rows, strict=True) if r.get("grp", 0) == 0}
        assert single == {tuple(sorted(r.items())) for r in once[table] if r.get("grp", 0) == 0}, (
            table
        )
