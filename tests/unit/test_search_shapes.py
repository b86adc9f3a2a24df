"""Page statements reused per query shape (fhir_server.search.shapes).

A reused statement run with the new values must be exactly the statement compiled from scratch
(compared as SQL with the values inlined, per dialect), every SQL-changing difference must give
a new shape, and what cannot be reused must compile as before.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import literal_column
from sqlalchemy.dialects import postgresql, sqlite

from fhir_server.fhir.outcome import FhirError
from fhir_server.search import shapes
from fhir_server.search.compile import CompileOptions, Position, compile_search, explain
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry

DIALECTS = [sqlite.dialect(), postgresql.dialect()]


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


class KeyedFilter:
    """An access filter that names its cache key, like the policy's."""

    def __init__(self, key: Any) -> None:
        self.cache_key = key

    def __call__(self, r: Any) -> Any:
        return r.c.res_id != literal_column(f"'{self.cache_key}'")


def _page(
    registry: SearchRegistry, rtype: str, params: list[tuple[str, str]], **kw: Any
) -> tuple[Any, Any]:
    query = parse_query(registry, (rtype,), params)
    assert not query.issues
    options = kw.pop("options", None) or CompileOptions(now_ms=1_700_000_000_000)
    return shapes.page_statement(
        registry, query, options, limit=21, position=kw.get("position"), max_pid=None,
        columns=("content",),
    )  # fmt: skip


def _fresh_sql(registry: SearchRegistry, rtype: str, params: list[tuple[str, str]], dialect: Any):
    query = parse_query(registry, (rtype,), params)
    options = CompileOptions(now_ms=1_700_000_000_000)
    compiled = compile_search(registry, query, options, limit=21, columns=("content",))
    return explain(compiled.statement, dialect)


SAME_SHAPE = [
    ("Patient", [("identifier", "urn:mrn|42")], [("identifier", "urn:mrn|43")]),
    ("Patient", [("name", "mul")], [("name", "sch")]),
    ("Patient", [("name:contains", "ll")], [("name:contains", "a_%\\")]),
    ("Patient", [("_id", "a,b")], [("_id", "c,d")]),
    (
        "Patient",
        [("gender", "female"), ("birthdate", "ge1980")],
        [
            ("gender", "male"),
            ("birthdate", "ge1990-05"),
        ],
    ),
    (
        "Observation",
        [("date", "2021-03-04"), ("_sort", "-date")],
        [
            ("date", "2022-11-30"),
            ("_sort", "-date"),
        ],
    ),
    (
        "Observation",
        [("value-quantity", "gt5.4|http://unitsofmeasure.org|mg")],
        [
            ("value-quantity", "gt7|http://unitsofmeasure.org|kg"),
        ],
    ),
    (
        "Observation",
        [("code:not", "http://loinc.org|8867-4")],
        [
            ("code:not", "http://loinc.org|1234-5"),
        ],
    ),
    ("Observation", [("subject", "Patient/1")], [("subject", "Patient/2")]),
    ("Patient", [("_content", "fever")], [("_content", "cough")]),
]


@pytest.mark.parametrize(("rtype", "first", "second"), SAME_SHAPE)
def test_a_reused_statement_is_the_one_compiled_from_scratch(
    registry: SearchRegistry, rtype: str, first: list, second: list
) -> None:
    compiled_1, params_1 = _page(registry, rtype, first)
    compiled_2, params_2 = _page(registry, rtype, second)
    assert compiled_2 is compiled_1, "same shape, same statement"
    assert params_1 is not None and params_2 is not None and params_1 != params_2
    for dialect in DIALECTS:
        for params, values in ((params_1, first), (params_2, second)):
            ours = explain(compiled_1.statement.params(params), dialect)
            assert ours == _fresh_sql(registry, rtype, values, dialect)


DIFFERENT_SHAPES = [
    ("Patient", [("identifier", "urn:mrn|42")], [("identifier", "42")]),
    ("Patient", [("identifier", "urn:mrn|42")], [("identifier", "urn:mrn|42,urn:mrn|43")]),
    ("Patient", [("name", "mul")], [("name:exact", "mul")]),
    ("Patient", [("name", "mul")], [("family", "mul")]),
    ("Patient", [("birthdate", "ge1980")], [("birthdate", "lt1980")]),
    ("Patient", [("birthdate", "1980")], [("birthdate", "ne1980")]),
    ("Patient", [("gender", "female")], [("gender:not", "female")]),
    ("Patient", [("name", "mul")], [("name", "mul"), ("_sort", "birthdate")]),
    ("Patient", [("name", "mul")], [("name", "mul"), ("_count", "5")]),
    ("Observation", [("code", "8867-4")], [("code", "http://loinc.org|")]),
]


@pytest.mark.parametrize(("rtype", "first", "second"), DIFFERENT_SHAPES)
def test_what_changes_the_sql_changes_the_shape(
    registry: SearchRegistry, rtype: str, first: list, second: list
) -> None:
    options = CompileOptions(now_ms=1_700_000_000_000)

    def key(params: list[tuple[str, str]]) -> Any:
        query = parse_query(registry, (rtype,), params)
        count = (query.count or 20) + 1
        shape = shapes.shape_of(query, options, count, ())
        assert shape is not None
        return shape[0]

    assert key(first) != key(second)


def test_the_access_filter_key_is_part_of_the_shape(registry: SearchRegistry) -> None:
    def run(filter_key: str, mrn: str) -> tuple[Any, Any]:
        options = CompileOptions(access_filter=KeyedFilter(filter_key))
        return _page(registry, "Patient", [("identifier", mrn)], options=options)

    first, _ = run("org-a", "urn:mrn|1")
    again, _ = run("org-a", "urn:mrn|2")
    other, _ = run("org-b", "urn:mrn|1")
    assert again is first and other is not first
    assert "org-b" in explain(other.statement, sqlite.dialect())


@pytest.mark.parametrize(
    "params",
    [
        [("subject:Patient.name", "anna")],
        [("_has:Observation:has-member:code", "8867-4")],
        [("code-value-quantity", "8867-4$gt70")],
        [("_lastUpdated", "ge2020")],
        [("code:missing", "true")],
    ],
)
def test_other_searches_compile_as_before(registry: SearchRegistry, params: list) -> None:
    compiled, bound = _page(registry, "Observation", params)
    assert bound is None
    for dialect in DIALECTS:
        assert explain(compiled.statement, dialect) == _fresh_sql(
            registry, "Observation", params, dialect
        )


def test_later_pages_and_keyless_filters_compile_as_before(registry: SearchRegistry) -> None:
    _, bound = _page(registry, "Patient", [("name", "mul")], position=Position([], 10))
    assert bound is None
    options = CompileOptions(access_filter=lambda r: r.c.res_id != "x")
    _, bound = _page(registry, "Patient", [("name", "mul")], options=options)
    assert bound is None


def test_a_malformed_value_is_the_same_400(registry: SearchRegistry) -> None:
    known = "http://hl7.org/fhir/ValueSet/observation-category"
    options = CompileOptions(expand_valueset=lambda url: [("s", "c")] if url == known else None)
    _page(registry, "Observation", [("category:in", known)], options=options)
    with pytest.raises(FhirError) as err:
        _page(registry, "Observation", [("category:in", "http://nope")], options=options)
    assert err.value.status == 400
    assert err.value.expression == ["category"]


def test_verification_catches_a_wrong_reuse(
    registry: SearchRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With verification on, a statement reused under a key that missed a difference fails."""
    monkeypatch.setattr(shapes, "VERIFY", True)
    _page(registry, "Patient", [("gender", "female")])
    real = shapes.shape_of

    def forgetful(*args: Any) -> Any:
        key, values = real(*args)
        return (key[0], key[1], tuple(p[:1] for p in key[2]), *key[3:]), values

    monkeypatch.setattr(shapes, "shape_of", forgetful)
    _page(registry, "Patient", [("gender", "female")])  # cached under the forgetful key
    with pytest.raises(AssertionError, match="differs"):
        _page(registry, "Patient", [("gender:not", "female")])
