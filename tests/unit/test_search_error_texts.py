"""Search parameter errors name the parameter and the problem, never the value (issue 14).

A search value may be patient data (a name, a birth date, an identifier value).
"""

from __future__ import annotations

import pytest

from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("birthdate", "SECRET"),
        ("birthdate", "ge1999-99-SECRET"),
        ("identifier", "a|b|SECRET"),
        ("identifier:of-type", "SECRET"),
        ("_lastUpdated", "SECRET"),
        ("_count", "SECRET"),
        ("_total", "SECRET"),
        ("_include", "SECRET"),
        ("_filter", "given eq x SECRET"),
        ("_filter", "given SECRET x"),
        ("_filter", "SECRET"),
        ("general-practitioner:Patient", "Practitioner/SECRET"),
    ],
)
def test_issue_texts_do_not_quote_the_value(
    registry: SearchRegistry, name: str, value: str
) -> None:
    q = parse_query(registry, ("Patient",), [(name, value)])
    assert q.issues, "the value should be rejected"
    for issue in q.issues:
        assert "SECRET" not in repr(issue)
        assert issue.code.startswith("MSO-SEARCH-")
