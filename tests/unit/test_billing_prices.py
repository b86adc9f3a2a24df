"""Prices from ChargeItemDefinitions (fhir_server.workflow.billing), and the shipped definitions."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from fhir_server import codes
from fhir_server.conformance import read_resources
from fhir_server.fhir.outcome import FhirError
from fhir_server.workflow.billing import (
    applies,
    case_extension,
    case_of,
    money,
    price_from_definition,
    specialties_of,
)


def _definitions() -> list[dict[str, Any]]:
    return [r.resource for r in read_resources() if r.res_type == "ChargeItemDefinition"]


def _sr(priority: str | None = None, specialty: str = "cardiology") -> dict[str, Any]:
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "code": codes.concept(codes.SPECIALTY_SYSTEM, specialty),
    }
    if priority:
        sr["priority"] = priority
    return sr


def _group(expression: str | None, *components: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = {"priceComponent": list(components)}
    if expression:
        group["applicability"] = [{"language": "text/fhirpath", "expression": expression}]
    return group


def _definition(*groups: dict[str, Any]) -> dict[str, Any]:
    return {"url": "https://x/cid", "version": "1", "propertyGroup": list(groups)}


def test_shipped_definitions_cover_each_specialty_once() -> None:
    definitions = _definitions()
    urls = {d["url"] for d in definitions}
    assert codes.CHARGE_DEFINITION_DEFAULT in urls
    listed = Counter(
        coding["code"]
        for d in definitions
        for ctx in d.get("useContext", ())
        if ctx["code"] == {"system": codes.USAGE_CONTEXT_TYPE_SYSTEM, "code": "focus"}
        for coding in ctx["valueCodeableConcept"]["coding"]
        if coding["system"] == codes.SPECIALTY_SYSTEM
    )
    assert listed and max(listed.values()) == 1
    specialty_cs = next(r.resource for r in read_resources() if r.url == codes.SPECIALTY_SYSTEM)

    def walk(concepts: list[dict[str, Any]]) -> set[str]:
        return {c["code"] for c in concepts} | {
            code for c in concepts for code in walk(c.get("concept", []))
        }

    assert set(listed) <= walk(specialty_cs["concept"])


@pytest.mark.parametrize("priority", [None, "routine", "urgent", "asap", "stat"])
def test_every_shipped_definition_prices_every_priority(priority: str | None) -> None:
    for definition in _definitions():
        price = price_from_definition(definition, _sr(priority), "EUR")
        assert price.total > 0
        assert price.definition == f"{definition['url']}|{definition['version']}"
        assert [c["type"] for c in price.components] == ["base"]


def test_priority_raises_the_price() -> None:
    for definition in _definitions():
        totals = [
            price_from_definition(definition, _sr(p), "EUR").total
            for p in ("routine", "urgent", "asap", "stat")
        ]
        assert totals == sorted(totals) and len(set(totals)) == 4


def test_components_add_and_subtract() -> None:
    definition = _definition(
        _group(None, {"type": "base", "amount": {"value": 100}}),
        _group(
            "ServiceRequest.priority = 'urgent'",
            {"type": "surcharge", "factor": 0.5},
            {"type": "informational", "amount": {"value": 999}},
        ),
        _group(None, {"type": "discount", "amount": {"value": 10.5, "currency": "EUR"}}),
        _group(None, {"type": "base", "amount": {"value": 1000, "currency": "USD"}}),
    )
    assert price_from_definition(definition, _sr(), "EUR").total == Decimal("89.5")
    urgent = price_from_definition(definition, _sr("urgent"), "EUR")
    assert urgent.total == Decimal("139.5")
    assert [c["type"] for c in urgent.components] == ["base", "discount", "surcharge"]
    assert urgent.components[-1] == {
        "type": "surcharge",
        "amount": {"value": 50, "currency": "EUR"},
        "factor": 0.5,
    }
    # amounts without a currency are in the configured one; the USD base adds to it
    assert price_from_definition(definition, _sr(), "USD").total == Decimal(1100)


def test_no_base_price_is_an_error() -> None:
    base = {"type": "base", "amount": {"value": 1}}
    definition = _definition(_group("ServiceRequest.priority = 'stat'", base))
    with pytest.raises(FhirError) as exc:
        price_from_definition(definition, _sr("routine"), "EUR")
    assert exc.value.code == "MSO-BILL-002"


def test_applicability_languages_and_errors() -> None:
    assert applies({}, _sr())
    assert not applies({"applicability": [{"language": "text/cql", "expression": "true"}]}, _sr())
    assert not applies(_group("ServiceRequest.priority.foo(", {}), _sr("urgent"))
    assert applies(_group("ServiceRequest.priority.empty()"), _sr())


def test_specialties_of_case_then_provider() -> None:
    provider = {"specialty": [codes.concept(codes.SPECIALTY_SYSTEM, "oncology"),
                              codes.concept("http://other", "x")]}  # fmt: skip
    assert specialties_of(_sr(specialty="cardiology"), provider) == ["cardiology", "oncology"]
    assert specialties_of({"code": {"text": "?"}}, None) == []


def test_money_and_case_extension() -> None:
    assert money(Decimal("560"), "EUR") == {"value": 560, "currency": "EUR"}
    assert money(Decimal("12.50"), "EUR") == {"value": 12.5, "currency": "EUR"}
    assert case_of({"extension": [case_extension("c1")]}) == "c1"
    assert case_of({}) is None
