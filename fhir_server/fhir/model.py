"""The FHIR R4 type model: what each element of each type is, built once from the HL7 definitions.

One answer, shared by validation (:mod:`fhir_server.fhir.validation`) and patch
(:mod:`fhir_server.fhir.patch`), to "what is element X of type T": its cardinality
(http://hl7.org/fhir/R4/elementdefinition.html ``min``/``max``), its types, the variants of a
choice element (``value[x]``, http://hl7.org/fhir/R4/formats.html#choice), the JSON keys it takes
(http://hl7.org/fhir/R4/json.html: ``valueQuantity``, ``_birthDate``), the codes of a required
binding and a Reference's target types; and whether a type is a primitive, a complex type or a
resource, and what it derives from (``baseDefinition``: ``Age`` is a ``Quantity``).

The source is ``r4/elements.json``, which :mod:`fhir_server.fhir.build_definitions` derives from
HL7's StructureDefinitions and ``fhir.schema.json``. A *type key* names a set of child elements:
a type (``Patient``, ``HumanName``) or an element with its own children (``Patient.contact``,
``Questionnaire.item``). Each key's table is compiled on first use and kept for the process;
every lookup after that is a dict access (validation runs on every write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_server.fhir.definitions import load_json, resource_types

PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2
"""The three kinds of value a JSON key holds (:attr:`Slot.kind`)."""

ABSTRACT_RESOURCES = frozenset({"Resource", "DomainResource"})


@dataclass(frozen=True, slots=True)
class Primitive:
    """A primitive type: its JSON type, its regex (``fhir.schema.json``) and numeric range."""

    name: str
    kind: str  # JSON type: "string", "number" or "boolean"
    json: type | tuple[type, ...]
    regex: re.Pattern[str] | None
    low: int | None
    high: int | None


@dataclass(eq=False, slots=True)
class Element:
    """One child element of a type key (``Patient.deceased[x]``, ``HumanName.given``)."""

    owner: str  # the type key it belongs to
    name: str  # without [x]
    min: int
    max: int | None  # None: unbounded
    many: bool  # max other than "1": an array in JSON
    choice: bool
    types: tuple[str, ...]  # FHIR type codes; empty for a contentReference
    ref: str | None  # contentReference target (a type key), e.g. Questionnaire.item
    keys: tuple[str, ...]  # every JSON key that makes the element present
    codes: frozenset[str] | None  # required binding
    targets: frozenset[str] | None  # Reference target types; None: any


@dataclass(frozen=True, slots=True)
class Slot:
    """What one JSON key of an object means (``deceasedBoolean``, ``_given``, ``contact``)."""

    element: Element
    type_code: str  # the FHIR type of the value: boolean, HumanName, BackboneElement, Resource
    kind: int  # PRIMITIVE, COMPLEX or RESOURCE
    target: str | None  # COMPLEX: the type key of the value; RESOURCE: required type or None
    primitive: Primitive | None  # PRIMITIVE, and the ``_x`` companion of a primitive
    underscore: bool  # the ``_x`` companion (an Element object) of primitive ``x``
    expr: str  # FHIRPath step to the value: ``name`` or ``name.ofType(Type)``
    contained: bool  # ``contained`` of a resource (dom-2 applies)


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """The compiled table of one type key."""

    key: str
    slots: dict[str, Slot]  # by JSON key
    elements: dict[str, Element]  # by element name (without [x])
    required: tuple[Element, ...]  # min >= 1
    is_resource: bool


class TypeModel:
    """The R4 type model (one per process: :func:`model`)."""

    def __init__(self) -> None:
        data = load_json("elements.json")
        self._groups: dict[str, dict[str, dict[str, Any]]] = data["types"]
        self._bases: dict[str, str] = data["bases"]
        self.resource_types = resource_types()
        self.primitives = {
            name: _compile_primitive(name, info) for name, info in data["primitives"].items()
        }
        self._types: dict[str, TypeInfo] = {}
        # "Quantity" and "Boolean" (as in valueQuantity / valueBoolean) -> their type names
        self._suffixes = {_capitalize(name): name for name in (*self._bases, *self._groups)}

    # types -----------------------------------------------------------------------------------

    def kind(self, type_name: str) -> int | None:
        """PRIMITIVE, COMPLEX or RESOURCE for a type name or type key; None when unknown."""
        if type_name in self.primitives:
            return PRIMITIVE
        if type_name in self.resource_types or type_name in ABSTRACT_RESOURCES:
            return RESOURCE
        if type_name in self._groups:
            return COMPLEX
        return None

    def is_primitive(self, type_name: str) -> bool:
        """True for the 20 primitive types (``string``, ``dateTime`` …)."""
        return type_name in self.primitives

    def is_resource(self, type_name: str) -> bool:
        """True for a concrete resource type and for ``Resource`` / ``DomainResource``."""
        return type_name in self.resource_types or type_name in ABSTRACT_RESOURCES

    def base(self, type_name: str) -> str | None:
        """The type ``type_name`` specializes (``Age`` -> ``Quantity``); None for the roots."""
        return self._bases.get(type_name)

    def is_a(self, type_name: str, wanted: str) -> bool:
        """FHIRPath ``is``: ``type_name`` is ``wanted`` or derives from it (``FHIR.`` allowed)."""
        wanted = wanted.removeprefix("FHIR.")
        current: str | None = type_name
        while current is not None:
            if current == wanted:
                return True
            current = self._bases.get(current)
        return False

    def type_of_suffix(self, suffix: str) -> str | None:
        """The type a choice suffix names: ``Boolean`` -> ``boolean``, ``Quantity`` -> itself."""
        return self._suffixes.get(suffix)

    # elements --------------------------------------------------------------------------------

    def info(self, key: str) -> TypeInfo | None:
        """The compiled table of a type key (``Patient``, ``Patient.contact``); None if unknown."""
        info = self._types.get(key)
        if info is None:
            if key not in self._groups:
                return None
            info = self._types[key] = self._compile(key)
        return info

    def element(self, key: str, name: str) -> Element | None:
        """Element ``name`` of type key ``key`` (``deceased`` or ``deceased[x]``); None if none."""
        info = self.info(key)
        return info.elements.get(name.removesuffix("[x]")) if info else None

    def slot(self, key: str, json_key: str) -> Slot | None:
        """What JSON key ``json_key`` (``deceasedBoolean``, ``_given``) holds in ``key``."""
        info = self.info(key)
        return info.slots.get(json_key) if info else None

    def choice_types(self, key: str, name: str) -> tuple[str, ...]:
        """The types of choice element ``name[x]`` of ``key``; empty when it is no choice."""
        element = self.element(key, name)
        return element.types if element is not None and element.choice else ()

    def _compile(self, key: str) -> TypeInfo:
        slots: dict[str, Slot] = {}
        elements: dict[str, Element] = {}
        owner_is_resource = key in self.resource_types
        for name, spec in self._groups[key].items():
            choice = name.endswith("[x]")
            base = name[:-3] if choice else name
            max_text: str = spec["max"]
            codes, targets = spec.get("codes"), spec.get("targets")
            element = Element(
                owner=key,
                name=base,
                min=spec["min"],
                max=None if max_text == "*" else int(max_text),
                many=max_text != "1",
                choice=choice,
                types=tuple(spec.get("types", ())),
                ref=spec.get("ref"),
                keys=(),
                codes=frozenset(codes) if codes else None,
                targets=frozenset(targets) if targets else None,
            )
            keys: list[str] = []
            if element.ref is not None:
                slots[base] = Slot(
                    element, "BackboneElement", COMPLEX, element.ref, None, False, base, False
                )
                keys.append(base)
            for type_code in element.types:
                json_key = base + _capitalize(type_code) if choice else base
                expr = f"{base}.ofType({type_code})" if choice else base
                keys.append(json_key)
                primitive = self.primitives.get(type_code)
                if primitive is not None:
                    slots[json_key] = Slot(
                        element, type_code, PRIMITIVE, None, primitive, False, expr, False
                    )
                    slots["_" + json_key] = Slot(
                        element, type_code, COMPLEX, "Element", primitive, True, expr, False
                    )
                    keys.append("_" + json_key)
                elif self.is_resource(type_code):
                    expected = None if type_code in ABSTRACT_RESOURCES else type_code
                    contained = base == "contained" and owner_is_resource
                    slots[json_key] = Slot(
                        element, type_code, RESOURCE, expected, None, False, expr, contained
                    )
                else:
                    group = f"{key}.{base}"
                    target = group if group in self._groups else type_code
                    slots[json_key] = Slot(
                        element, type_code, COMPLEX, target, None, False, expr, False
                    )
            element.keys = tuple(keys)
            elements[base] = element
        required = tuple(e for e in elements.values() if e.min > 0)
        return TypeInfo(key, slots, elements, required, owner_is_resource)


def _capitalize(name: str) -> str:
    return name[:1].upper() + name[1:]


def _compile_primitive(name: str, info: dict[str, Any]) -> Primitive:
    kind = info["json"]
    json_type: type | tuple[type, ...] = {"boolean": bool, "number": (int, float)}.get(kind, str)
    # FHIR's regexes are XML Schema regexes, where \s is only space, tab, CR and LF: ASCII mode
    # keeps a non-breaking space (found even in HL7's own terminology content) a valid character.
    regex = re.compile(info["regex"], re.ASCII) if "regex" in info else None
    return Primitive(name, kind, json_type, regex, info.get("min"), info.get("max"))


@cache
def model() -> TypeModel:
    """The process's R4 type model (built on first call)."""
    return TypeModel()
