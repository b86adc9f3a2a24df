"""Differential search tests: the database's answer equals the in-memory matcher's.

Generated (seeded) Patients and Observations, generated queries over every type of parameter,
prefixes and modifiers, chains and ``_has``; the ids returned over HTTP (SQLite and PostgreSQL)
must equal :class:`fhir_server.search.matcher.MemoryStore`'s. http://hl7.org/fhir/R4/search.html
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from fhir_server.search.matcher import MemoryStore
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry
from fhir_server.search.types.base import ValueContext

TAG_SYSTEM = "urn:mso:diff"
FAMILIES = ["Müller", "Mueller", "Smith", "Smithson", "García", "Garcia", "Öz", "Lee"]
GIVEN = ["Anna", "Ann", "Bob", "Émile", "Zoë", "Li"]
CODES = ["8867-4", "8310-5", "29463-7", "85354-9"]
PREFIXES = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]


def _date(rng: random.Random) -> str:
    y = rng.randint(1950, 2020)
    return rng.choice(
        [
            f"{y}",
            f"{y}-{rng.randint(1, 12):02d}",
            f"{y}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        ]
    )


def _patient(rng: random.Random, meta: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": meta,
        "name": [{"family": rng.choice(FAMILIES), "given": [rng.choice(GIVEN)]}],
    }
    if rng.random() < 0.8:
        body["gender"] = rng.choice(["male", "female", "other"])
    if rng.random() < 0.9:
        body["birthDate"] = _date(rng)
    if rng.random() < 0.5:
        body["identifier"] = [
            {"system": rng.choice(["urn:a", "urn:b"]), "value": str(rng.randint(1, 5))}
        ]
    return body


def _observation(rng: random.Random, meta: dict[str, Any], patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "meta": meta,
        "status": rng.choice(["final", "amended"]),
        "code": {"coding": [{"system": "http://loinc.org", "code": rng.choice(CODES)}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"{rng.randint(2015, 2022)}-{rng.randint(1, 12):02d}-"
        f"{rng.randint(1, 28):02d}T10:00:00Z",
        "valueQuantity": {
            "value": round(rng.uniform(0, 200), 1),
            "system": "http://unitsofmeasure.org",
            "code": rng.choice(["mg", "kg"]),
        },
    }


def _queries(rng: random.Random) -> list[tuple[str, list[tuple[str, str]]]]:
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for _ in range(70):
        kind = rng.randrange(12)
        if kind == 0:
            fam = rng.choice(FAMILIES)
            out.append(("Patient", [("name", fam[: rng.randint(1, len(fam))].lower())]))
        elif kind == 1:
            out.append(
                (
                    "Patient",
                    [
                        (
                            rng.choice(["family:exact", "given:contains", "name:contains"]),
                            rng.choice(FAMILIES + GIVEN)[1:4],
                        )
                    ],
                )
            )
        elif kind == 2:
            out.append(
                (
                    "Patient",
                    [
                        (
                            rng.choice(["gender", "gender:not"]),
                            ",".join(rng.sample(["male", "female", "other"], rng.randint(1, 2))),
                        )
                    ],
                )
            )
        elif kind == 3:
            out.append(("Patient", [("birthdate", rng.choice(PREFIXES) + _date(rng))]))
        elif kind == 4:
            out.append(
                (
                    "Patient",
                    [
                        (
                            rng.choice(["gender:missing", "birthdate:missing"]),
                            rng.choice(["true", "false"]),
                        )
                    ],
                )
            )
        elif kind == 5:
            out.append(("Patient", [("identifier", rng.choice(["urn:a|", "urn:b|3", "2", "|2"]))]))
        elif kind == 6:
            num = rng.choice([str(rng.randint(0, 200)), f"{rng.uniform(0, 200):.1f}", "1e2"])
            unit = rng.choice(["", "|http://unitsofmeasure.org|mg", "||kg"])
            out.append(
                ("Observation", [("value-quantity", rng.choice([*PREFIXES, "ap"]) + num + unit)])
            )
        elif kind == 7:
            out.append(
                ("Observation", [("date", rng.choice(PREFIXES) + str(rng.randint(2015, 2022)))])
            )
        elif kind == 8:
            out.append(("Observation", [("subject:Patient.name", rng.choice(FAMILIES)[:3])]))
        elif kind == 9:
            out.append(("Patient", [("_has:Observation:subject:code", rng.choice(CODES))]))
        elif kind == 10:
            out.append(
                (
                    "Observation",
                    [
                        (
                            "code-value-quantity",
                            f"{rng.choice(CODES)}${rng.choice(['gt', 'lt'])}{rng.randint(0, 200)}",
                        )
                    ],
                )
            )
        elif rng.random() < 0.4:
            fam = rng.choice(FAMILIES)[:3]
            op = rng.choice(["and", "or"])
            expr = f"name sw {fam} {op} birthdate {rng.choice(['ge', 'lt'])} {_date(rng)}"
            if rng.random() < 0.5:
                expr = f"not ({expr}) or gender eq {rng.choice(['male', 'female'])}"
            out.append(("Patient", [("_filter", expr)]))
        else:
            out.append(
                (
                    "Observation",
                    [
                        ("code", rng.choice(CODES)),
                        ("status", rng.choice(["final", "amended"])),
                        ("value-quantity", f"ge{rng.randint(0, 150)}"),
                    ],
                )
            )
    return out


@pytest.fixture(scope="module")
def population(client) -> tuple[str, list[dict[str, Any]]]:
    rng = random.Random(20240611)
    tag = uuid.uuid4().hex
    meta = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    stored: list[dict[str, Any]] = []
    patients = []
    for _ in range(30):
        resp = client.post("/fhir/Patient", json=_patient(rng, meta))
        assert resp.status_code == 201
        stored.append(resp.json())
        patients.append(resp.json()["id"])
    for _ in range(45):
        resp = client.post("/fhir/Observation", json=_observation(rng, meta, rng.choice(patients)))
        assert resp.status_code == 201
        stored.append(resp.json())
    return tag, stored


def test_database_equals_matcher(client, population) -> None:
    tag, stored = population
    registry = SearchRegistry.load()
    store = MemoryStore(registry, stored)
    mismatches = []
    nonempty = 0
    for rtype, params in _queries(random.Random(7)):
        params = [*params, ("_tag", f"{TAG_SYSTEM}|{tag}")]
        query = parse_query(registry, (rtype,), params)
        assert not query.issues, (params, query.issues)
        expected = {
            r["id"] for r in store.search(query, ValueContext(base_url="http://testserver/fhir"))
        }
        resp = client.get(
            f"/fhir/{rtype}",
            params=[*params, ("_count", "1000")],
            headers={"Prefer": "handling=strict"},
        )
        assert resp.status_code == 200, resp.text
        got = {e["resource"]["id"] for e in resp.json().get("entry", [])}
        nonempty += bool(expected)
        if got != expected:
            mismatches.append((rtype, params, len(got), len(expected)))
    assert not mismatches
    assert nonempty > 25  # the generated queries do select something
