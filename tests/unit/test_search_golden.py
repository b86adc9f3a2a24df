"""Golden SQL: the exact statement compiled for representative searches, per dialect.

Regenerate after an intended change with ``MSO_UPDATE_GOLDEN=1 pytest`` on this file and
review the diff; without it a missing golden file fails the test (it is never written silently).
http://hl7.org/fhir/R4/search.html
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.search.compile import CompileOptions, compile_search, explain
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry

GOLDEN = Path(__file__).with_name("golden")
CASES = {
    "patient_identifier": ("Patient", [("identifier", "urn:mrn|42")]),
    "patient_name_prefix": ("Patient", [("name", "mul")]),
    "observation_chain": ("Observation", [("subject:Patient.name", "anna"), ("date", "ge2020")]),
    "patient_has": ("Patient", [("_has:Observation:subject:code", "http://loinc.org|8867-4")]),
    "observation_sorted": ("Observation", [("code", "8867-4"), ("_sort", "-date")]),
    "observation_composite": ("Observation", [("code-value-quantity", "8867-4$gt70")]),
}
DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_sql(registry: SearchRegistry, case: str, dialect: str) -> None:
    rtype, params = CASES[case]
    query = parse_query(registry, (rtype,), params)
    assert not query.issues
    options = CompileOptions(now_ms=1_700_000_000_000)
    sql = explain(compile_search(registry, query, options, limit=21).statement, DIALECTS[dialect])
    path = GOLDEN / f"{case}.{dialect}.sql"
    if os.environ.get("MSO_UPDATE_GOLDEN"):
        path.write_text(sql + "\n")
    assert path.exists(), f"no golden file {path.name}: run with MSO_UPDATE_GOLDEN=1 and review it"
    assert sql + "\n" == path.read_text()
