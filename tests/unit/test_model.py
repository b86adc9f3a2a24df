"""The shared R4 type model (fhir_server.fhir.model) that validation and patch both use."""

from __future__ import annotations

import time

from fhir_server.fhir.model import COMPLEX, PRIMITIVE, RESOURCE, model


def test_element_cardinality_and_types() -> None:
    types = model()
    name = types.element("Patient", "name")
    assert name is not None
    assert (name.min, name.max, name.many, name.types) == (0, None, True, ("HumanName",))
    birth = types.element("Patient", "birthDate")
    assert birth is not None and (birth.max, birth.many, birth.types) == (1, False, ("date",))
    status = types.element("Observation", "status")
    assert status is not None and status.min == 1 and "final" in (status.codes or ())
    assert types.element("Patient", "nothing") is None
    assert types.element("NoSuchType", "name") is None


def test_choice_elements_and_their_json_keys() -> None:
    types = model()
    assert types.choice_types("Patient", "deceased") == ("boolean", "dateTime")
    assert types.choice_types("Patient", "deceased[x]") == ("boolean", "dateTime")
    assert types.choice_types("Patient", "name") == ()
    slot = types.slot("Patient", "deceasedDateTime")
    assert slot is not None and slot.element.name == "deceased" and slot.type_code == "dateTime"
    assert slot.expr == "deceased.ofType(dateTime)"
    companion = types.slot("Patient", "_birthDate")
    assert companion is not None and companion.underscore and companion.target == "Element"
    assert "Quantity" in types.choice_types("Observation", "value")


def test_backbone_elements_and_content_references() -> None:
    types = model()
    contact = types.slot("Patient", "contact")
    assert contact is not None and contact.kind == COMPLEX and contact.target == "Patient.contact"
    assert types.element("Patient.contact", "relationship") is not None
    nested = types.slot("Questionnaire.item", "item")
    assert nested is not None and nested.target == "Questionnaire.item"
    contained = types.slot("Patient", "contained")
    assert contained is not None and contained.kind == RESOURCE and contained.contained
    entry = types.slot("Bundle.entry", "resource")
    assert entry is not None and entry.kind == RESOURCE and entry.target is None


def test_kinds_and_base_types() -> None:
    types = model()
    assert types.kind("string") == PRIMITIVE and types.is_primitive("dateTime")
    assert types.kind("HumanName") == COMPLEX and types.kind("Patient.contact") == COMPLEX
    assert types.kind("Patient") == RESOURCE and types.is_resource("DomainResource")
    assert types.kind("Nope") is None
    assert types.base("Patient") == "DomainResource"
    assert types.is_a("Age", "Quantity") and types.is_a("Patient", "Resource")
    assert types.is_a("code", "string") and not types.is_a("string", "code")
    assert types.type_of_suffix("Boolean") == "boolean"
    assert types.type_of_suffix("Quantity") == "Quantity"


def test_built_once_and_lookups_are_cheap() -> None:
    assert model() is model()
    types = model()
    types.slot("Patient", "name")
    start = time.perf_counter()
    for _ in range(10_000):
        types.slot("Patient", "name")
    assert (time.perf_counter() - start) / 10_000 < 20e-6  # a dict lookup, generously bounded
