"""Value parsing and predicates of each parameter type (http://hl7.org/fhir/R4/search.html)."""

from __future__ import annotations

import pytest

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.registry import SearchRegistry
from fhir_server.search.types import date, number, quantity, token, uri
from fhir_server.search.types.base import (
    ValueContext,
    evaluate,
    split_escaped,
    split_prefix,
    unescape,
)


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


def test_escaping() -> None:
    assert split_escaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert unescape(r"a\,b\$c\|d\\e") == "a,b$c|d\\e"
    assert token.parse(r"http://s|a\|b") == ("http://s", "a|b", True)
    assert token.parse("|x") == ("", "x", True)


def test_prefixes() -> None:
    assert split_prefix("ge2020") == ("ge", "2020")
    assert split_prefix("2020") == ("eq", "2020")
    assert split_prefix("eq") == ("eq", "eq")


def test_date_precision() -> None:
    low, high = date.date_range("2020")
    assert date.date_range("2020-01-01")[0] == low
    assert date.date_range("2020-12-31T23:59:59.999Z")[1] == high
    assert date.date_range("2020-02")[1] - date.date_range("2020-02")[0] == 29 * 86400000 - 1
    assert date.date_range("2020-01-01T10:00+02:00")[0] == date.date_range("2020-01-01T08:00Z")[0]
    with pytest.raises(ValueError):
        date.date_range("2020-1-1")


@pytest.mark.parametrize(
    ("prefix", "target", "expected"),
    [
        ("eq", "2020-06-15", True),
        ("eq", "2019-12-31", False),
        ("ne", "2019-12-31", True),
        ("gt", "2021-01-01", True),
        ("gt", "2020-06-15", False),
        ("lt", "2019-06-01", True),
        ("ge", "2020-03-01", True),
        ("le", "2020-03-01", True),
        ("le", "2021-03-01", False),
        ("sa", "2021-01-01", True),
        ("sa", "2020-12-31", False),
        ("eb", "2019-12-31", True),
        ("ap", "2020-06-15", True),
    ],
)
def test_date_prefixes(prefix: str, target: str, expected: bool) -> None:
    low, high = date.date_range("2020")
    t_low, t_high = date.date_range(target)
    pred = date.range_predicate(prefix, low, high, date.now_ms())
    assert evaluate(pred, {"low": t_low, "high": t_high}) is expected


def test_number_precision() -> None:
    assert number.parse_number("100") == (100.0, 99.5, 100.5)
    assert number.parse_number("1e2")[1:] == (50.0, 150.0)
    pred = number.value_predicate("eq", *number.parse_number("100"))
    assert evaluate(pred, {"value": 100.4}) and not evaluate(pred, {"value": 100.5})
    assert evaluate(number.value_predicate("ap", *number.parse_number("100")), {"value": 109})


def test_quantity_forms(registry: SearchRegistry) -> None:
    param = registry.get("Observation", "value-quantity")
    ident = param.identity("Observation")
    vc = ValueContext()
    row = quantity.extract(
        param, ident, [_node({"value": 5.4, "system": "http://u", "code": "mg"})]
    )[0][1]
    for value, hit in [
        ("5.4", True),
        ("gt5|http://u|mg", True),
        ("5.4||mg", True),
        ("5.4|http://x|mg", False),
        ("lt5", False),
    ]:
        assert evaluate(quantity.predicate(param, ident, None, value, vc), row) is hit, value
    with pytest.raises(FhirError):
        quantity.predicate(param, ident, None, "abc", vc)


def test_uri_above_below(registry: SearchRegistry) -> None:
    assert uri.ancestors("http://a.org/fhir/ValueSet/x") == [
        "http://a.org/fhir/ValueSet/x",
        "http://a.org/fhir/ValueSet",
        "http://a.org/fhir",
    ]


def _node(value):
    from fhir_server.search.fhirpath import Node

    return Node(value, None, "")
