"""Query parsing: modifiers, chains, _has, result parameters and issues (search.html#2.21.1)."""

from __future__ import annotations

import pytest

from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


def test_chain_and_has(registry: SearchRegistry) -> None:
    q = parse_query(
        registry,
        ("Observation",),
        [("subject:Patient.name", "anna"), ("_has:AuditEvent:entity:agent", "Practitioner/1")],
    )
    assert not q.issues
    chain = q.clauses[0]
    assert chain.target_types == ("Patient",) and chain.chain.code == "name"
    assert q.clauses[1].has.type == "AuditEvent"


def test_multi_level_chain(registry: SearchRegistry) -> None:
    q = parse_query(registry, ("Observation",), [("subject:Patient.organization.name", "acme")])
    assert not q.issues
    assert q.clauses[0].chain.chain.code == "name"


def test_or_values_and_escaping(registry: SearchRegistry) -> None:
    q = parse_query(registry, ("Patient",), [("name", r"a\,b,c")])
    assert q.clauses[0].values == [r"a\,b", "c"]


@pytest.mark.parametrize(
    "param",
    [
        ("bogus", "1"),
        ("name:foo", "x"),
        ("birthdate:exact", "2020"),
        ("_count", "x"),
        ("_sort", "nope"),
        ("_include", "Patient:name"),
        ("gender:missing", "maybe"),
        ("_summary", "bad"),
        ("_total", "all"),
    ],
)
def test_problems_are_reported(registry: SearchRegistry, param: tuple[str, str]) -> None:
    q = parse_query(registry, ("Patient",), [param])
    assert q.issues and q.issues[0].name == param[0]


def test_result_parameters(registry: SearchRegistry) -> None:
    q = parse_query(
        registry,
        ("Patient",),
        [
            ("_sort", "-birthdate,name"),
            ("_count", "5"),
            ("_revinclude:iterate", "Observation:subject"),
            ("_summary", "true"),
            ("_total", "accurate"),
            ("_elements", "name,gender"),
        ],
    )
    assert not q.issues
    assert [(k.code, k.descending) for k in q.sort] == [("birthdate", True), ("name", False)]
    assert q.count == 5 and q.includes[0].reverse and q.includes[0].iterate
    assert q.summary == "true" and q.total == "accurate" and q.elements == ["name", "gender"]


@pytest.mark.parametrize(
    "expr", ['name zz "x"', "name eq", "(name eq x", "nope eq 1", "name gt x", "gender co x"]
)
def test_bad_filters_are_issues(registry: SearchRegistry, expr: str) -> None:
    q = parse_query(registry, ("Patient",), [("_filter", expr)])
    assert q.issues and q.issues[0].name == "_filter" and q.issues[0].code == "MSO-SEARCH-002"


def test_filter_tree(registry: SearchRegistry) -> None:
    q = parse_query(registry, ("Patient",), [("_filter", 'not (name co "a b" and gender eq male)')])
    assert not q.issues
    tree = q.clauses[0].filter
    assert tree.op == "not" and tree.children[0].op == "and"
    assert tree.children[0].children[0].modifier == "contains"
