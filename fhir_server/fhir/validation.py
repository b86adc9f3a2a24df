"""Structural validation of FHIR R4 resources in JSON form.

Implements the structural part of http://hl7.org/fhir/R4/validation.html for the JSON format of
http://hl7.org/fhir/R4/json.html: the resource type, the elements each type defines (no unknown
properties), JSON types and primitive formats, cardinality (``min``/``max``, array versus single
value), choice elements (``value[x]``: at most one variant), codes of required bindings,
primitive extensions (``_birthDate``, ``_given`` aligned with ``given``), contained resources,
``Bundle.entry.resource`` and ``Parameters.parameter.resource`` validated as their own type, and
the form of ``Reference.reference`` (http://hl7.org/fhir/R4/references.html).

The check is a walk over the shared type model (:mod:`fhir_server.fhir.model`, from
``r4/elements.json``, which ``build_definitions`` derives from the HL7 StructureDefinitions and
``fhir.schema.json``; primitive regexes and required-binding codes are the schema's). Each type's
table of JSON keys is compiled once and cached there. It was chosen over
running ``jsonschema`` on ``fhir.schema.json`` because it also covers what the schema does not
say (required primitives such as ``Observation.status``, ``_x``/``x`` alignment, references,
nested resources as their own type), gives FHIRPath locations, and is several times faster.
Not checked: invariants (FHIRPath constraints) other than dom-2 and ext-1, profiles, slicing,
extensible/preferred bindings, terminology, and whether a referenced resource exists.

Every problem found becomes one :class:`~fhir_server.fhir.outcome.Issue` (severity ``error``)
whose text names the element and what is wrong with it, never the offending value (it may be
patient data), with the FHIRPath of the offending element in ``expression``
(``Patient.name[0].given[1]``, ``Observation.value.ofType(Quantity).unit``,
``Bundle.entry[2].resource.ofType(Patient).gender``,
``Patient.contained[0].ofType(Organization).name``) and a stable error code:

============  ===============  =============================================================
code          IssueType        meaning
============  ===============  =============================================================
MSO-VAL-001   structure        unknown element (also: the code of the raised ``FhirError``)
MSO-VAL-002   value            wrong JSON type, or a primitive not matching its format
MSO-VAL-003   required         a required element (``min`` >= 1) is missing
MSO-VAL-004   structure        cardinality: array where a single value belongs or the reverse,
                               more values than ``max``, ``_x`` not aligned with ``x``
MSO-VAL-005   value            malformed reference, unknown ``#local`` id, or a reference to a
                               resource type the element does not allow
MSO-VAL-006   structure        missing, unknown (not one of the R4 types) or unexpected
                               ``resourceType``
MSO-VAL-007   code-invalid     a code outside the required binding's value set
MSO-VAL-008   structure        more than one variant of a choice element (``value[x]``)
MSO-VAL-009   structure        ``null``, empty string, empty object or empty array
MSO-VAL-010   invariant        dom-2 (contained resource containing resources) or ext-1
                               (extension with both or neither of value and extensions)
MSO-VAL-011   too-costly       too many problems (the first ``MAX_ISSUES`` are reported) or
                               nesting too deep to check
============  ===============  =============================================================
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_server.fhir.model import COMPLEX, PRIMITIVE, Element, Slot, TypeInfo, TypeModel, model
from fhir_server.fhir.outcome import FhirError, Issue

MAX_ISSUES = 500
"""Stop collecting after this many problems (one more issue says so)."""

UNKNOWN_ELEMENT = "MSO-VAL-001"
VALIDATION_FAILED = UNKNOWN_ELEMENT  # the code of the FhirError as a whole
BAD_VALUE = "MSO-VAL-002"
MISSING_REQUIRED = "MSO-VAL-003"
CARDINALITY = "MSO-VAL-004"
BAD_REFERENCE = "MSO-VAL-005"
BAD_RESOURCE_TYPE = "MSO-VAL-006"
BAD_CODE = "MSO-VAL-007"
CHOICE_CONFLICT = "MSO-VAL-008"
EMPTY_VALUE = "MSO-VAL-009"
INVARIANT = "MSO-VAL-010"
TOO_COSTLY = "MSO-VAL-011"

_DATE_TYPES = frozenset({"date", "dateTime", "instant"})
_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number"}


class _TooMany(Exception):
    """Raised inside the walk once MAX_ISSUES problems are collected."""


@dataclass(slots=True)
class _Scope:
    """The resource whose ``#id`` references are being resolved."""

    contained: dict[str, str]  # contained id -> resourceType
    in_contained: bool


class _Definitions:
    """The shared type model plus the reference forms, derived once per process."""

    def __init__(self, types: TypeModel) -> None:
        self.model = types
        self.resource_types = types.resource_types
        id_regex = types.primitives["id"].regex
        assert id_regex is not None
        id_pattern = id_regex.pattern.removeprefix("^").removesuffix("$")
        self.relative_ref = re.compile(rf"([A-Za-z]+)/({id_pattern})(?:/_history/({id_pattern}))?")
        self.local_ref = re.compile(rf"#(?:{id_pattern})?")
        self.uuid = types.primitives["uuid"].regex
        self.oid = types.primitives["oid"].regex

    def shape(self, key: str) -> TypeInfo:
        info = self.model.info(key)
        assert info is not None, key
        return info


@cache
def _definitions() -> _Definitions:
    return _Definitions(model())


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), "number" if isinstance(value, float) else "value")


def _valid_calendar_date(text: str) -> bool:
    if len(text) < 10:
        return True
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    return day <= calendar.monthrange(year, month)[1]


class _Walk:
    """One validation run: walks a resource and collects issues."""

    def __init__(self, defs: _Definitions) -> None:
        self.defs = defs
        self.issues: list[Issue] = []

    def add(self, code: str, error_code: str, path: str, message: str) -> None:
        if len(self.issues) >= MAX_ISSUES:
            raise _TooMany
        self.issues.append(Issue("error", code, message, [path], error_code))

    # resources -----------------------------------------------------------------------------

    def resource(
        self, value: Any, prefix: str | None, expected: str | None, scope: _Scope | None
    ) -> None:
        where = prefix or "Resource"
        if not isinstance(value, dict):
            self.add(
                "structure",
                BAD_VALUE,
                where,
                f"A resource must be a JSON object, not {_json_name(value)}",
            )
            return
        resource_type = value.get("resourceType")
        type_path = f"{prefix}.resourceType" if prefix else "resourceType"
        if resource_type is None:
            self.add("structure", BAD_RESOURCE_TYPE, type_path, "The resource has no resourceType")
            return
        if not isinstance(resource_type, str) or resource_type not in self.defs.resource_types:
            self.add(
                "structure",
                BAD_RESOURCE_TYPE,
                type_path,
                "Unknown resourceType: not an R4 resource type",
            )
            return
        if expected is not None and resource_type != expected:
            self.add(
                "structure",
                BAD_RESOURCE_TYPE,
                type_path,
                f"Expected a {expected} resource here, got {resource_type}",
            )
            return
        path = f"{prefix}.ofType({resource_type})" if prefix else resource_type
        if scope is None:
            scope = _Scope(self._contained_ids(value.get("contained")), False)
        elif "contained" in value:
            self.add(
                "invariant",
                INVARIANT,
                f"{path}.contained",
                "A contained resource cannot contain resources (dom-2)",
            )
        self.object(value, self.defs.shape(resource_type), path, scope)

    @staticmethod
    def _contained_ids(contained: Any) -> dict[str, str]:
        ids: dict[str, str] = {}
        if isinstance(contained, list):
            for item in contained:
                if isinstance(item, dict):
                    local_id, rtype = item.get("id"), item.get("resourceType")
                    if isinstance(local_id, str) and isinstance(rtype, str):
                        ids[local_id] = rtype
        return ids

    # objects -------------------------------------------------------------------------------

    def object(self, obj: dict[str, Any], shape: TypeInfo, path: str, scope: _Scope) -> None:
        if not obj:
            self.add("structure", EMPTY_VALUE, path, "Empty objects are not allowed")
            return
        slots = shape.slots
        choices: dict[int, str] | None = None
        for key, value in obj.items():
            slot = slots.get(key)
            if slot is None:
                if key == "resourceType" and shape.is_resource:
                    continue
                self.add(
                    "structure",
                    UNKNOWN_ELEMENT,
                    f"{path}.{key}",
                    f"Unknown element '{key}' in {shape.key}",
                )
                continue
            element = slot.element
            if element.choice:
                if choices is None:
                    choices = {}
                seen = choices.setdefault(id(element), slot.type_code)
                if seen != slot.type_code:
                    self.add(
                        "structure",
                        CHOICE_CONFLICT,
                        f"{path}.{element.name}",
                        f"Only one type of {element.name}[x] is allowed; found {seen} and "
                        f"{slot.type_code}",
                    )
                    continue
            if slot.underscore:
                self.primitive_extension(obj, key, value, slot, path, scope)
            elif element.many:
                self.array(obj, key, value, slot, path, scope)
            elif isinstance(value, list):
                self.add(
                    "structure",
                    CARDINALITY,
                    f"{path}.{slot.expr}",
                    f"{element.name} takes a single value, not an array",
                )
            else:
                self.item(value, slot, f"{path}.{slot.expr}", scope)
        for element in shape.required:
            count = 0
            for json_key in element.keys:
                present = obj.get(json_key)
                if present is not None:
                    count = max(count, len(present) if isinstance(present, list) else 1)
            if count < element.min:
                if count == 0:
                    message = f"Missing required element '{element.name}' in {shape.key}"
                else:
                    message = f"{element.name} needs at least {element.min} values, has {count}"
                self.add("required", MISSING_REQUIRED, f"{path}.{element.name}", message)
        if shape.key == "Extension":
            self.extension_invariant(obj, path)

    def extension_invariant(self, obj: dict[str, Any], path: str) -> None:
        has_value = any(k.startswith("value") or k.startswith("_value") for k in obj)
        if has_value == ("extension" in obj):
            self.add(
                "invariant",
                INVARIANT,
                path,
                "An extension must have a value or nested extensions, exactly one of them (ext-1)",
            )

    def array(
        self,
        obj: dict[str, Any],
        key: str,
        value: Any,
        slot: Slot,
        path: str,
        scope: _Scope,
    ) -> None:
        element = slot.element
        base = f"{path}.{slot.expr}"
        if not isinstance(value, list):
            self.add("structure", CARDINALITY, base, f"{element.name} must be an array")
            return
        if not value:
            self.add("structure", EMPTY_VALUE, base, "Empty arrays are not allowed")
            return
        if element.max is not None and len(value) > element.max:
            self.add(
                "structure",
                CARDINALITY,
                base,
                f"{element.name} allows at most {element.max} values, has {len(value)}",
            )
        companion = obj.get("_" + key) if slot.kind == PRIMITIVE else None
        for index, item in enumerate(value):
            if item is None:
                if (
                    isinstance(companion, list)
                    and index < len(companion)
                    and companion[index] is not None
                ):
                    continue
                self.add("structure", EMPTY_VALUE, f"{base}[{index}]", "null is not allowed here")
                continue
            self.item(item, slot, f"{base}[{index}]", scope)

    def primitive_extension(
        self,
        obj: dict[str, Any],
        key: str,
        value: Any,
        slot: Slot,
        path: str,
        scope: _Scope,
    ) -> None:
        base = f"{path}.{slot.expr}"
        element_shape = self.defs.shape("Element")
        if not slot.element.many:
            if isinstance(value, dict):
                self.object(value, element_shape, base, scope)
            elif isinstance(value, list):
                self.add(
                    "structure", CARDINALITY, base, f"{key} takes a single object, not an array"
                )
            else:
                self.add(
                    "structure",
                    BAD_VALUE,
                    base,
                    f"{key} must be an object, not {_json_name(value)}",
                )
            return
        if not isinstance(value, list):
            self.add("structure", CARDINALITY, base, f"{key} must be an array")
            return
        values = obj.get(key[1:])
        if values is not None and isinstance(values, list) and len(values) != len(value):
            self.add(
                "structure",
                CARDINALITY,
                base,
                f"{key} has {len(value)} entries but {key[1:]} has {len(values)}; they must align",
            )
        for index, item in enumerate(value):
            if item is None:
                if values is None:
                    self.add(
                        "structure", EMPTY_VALUE, f"{base}[{index}]", "null is not allowed here"
                    )
            elif isinstance(item, dict):
                self.object(item, element_shape, f"{base}[{index}]", scope)
            else:
                self.add(
                    "structure",
                    BAD_VALUE,
                    f"{base}[{index}]",
                    f"{key} entries must be objects or null, not {_json_name(item)}",
                )

    # values --------------------------------------------------------------------------------

    def item(self, value: Any, slot: Slot, path: str, scope: _Scope) -> None:
        kind = slot.kind
        if kind == PRIMITIVE:
            self.primitive(value, slot, path)
        elif kind == COMPLEX:
            if isinstance(value, dict):
                self.object(value, self.defs.shape(slot.target or slot.type_code), path, scope)
                if slot.type_code == "Reference":
                    self.reference(value, slot.element, path, scope)
            elif value is None:
                self.add("structure", EMPTY_VALUE, path, "null is not allowed here")
            else:
                self.add(
                    "structure",
                    BAD_VALUE,
                    path,
                    f"{slot.element.name} must be a {slot.type_code} object, "
                    f"not {_json_name(value)}",
                )
        elif slot.contained:
            if scope.in_contained:
                self.add(
                    "invariant",
                    INVARIANT,
                    path,
                    "A contained resource cannot contain resources (dom-2)",
                )
                return
            self.resource(value, path, slot.target, _Scope(scope.contained, True))
        else:
            self.resource(value, path, slot.target, None)

    def primitive(self, value: Any, slot: Slot, path: str) -> None:
        primitive = slot.primitive
        assert primitive is not None
        if value is None:
            self.add("structure", EMPTY_VALUE, path, "null is not allowed here")
            return
        if not isinstance(value, primitive.json) or (
            isinstance(value, bool) and primitive.json is not bool
        ):
            self.add(
                "value",
                BAD_VALUE,
                path,
                f"{slot.element.name} is a {primitive.name}: expected a JSON {primitive.kind}, "
                f"got {_json_name(value)}",
            )
            return
        if primitive.json is bool:
            return
        text = value if isinstance(value, str) else str(value)
        if not text:
            self.add("structure", EMPTY_VALUE, path, "Empty strings are not allowed")
            return
        if primitive.regex is not None and primitive.regex.fullmatch(text) is None:
            self.add(
                "value", BAD_VALUE, path, f"{slot.element.name} is not a valid {primitive.name}"
            )
            return
        if (primitive.low is not None and value < primitive.low) or (
            primitive.high is not None and value > primitive.high
        ):
            self.add(
                "value",
                BAD_VALUE,
                path,
                f"{slot.element.name} is out of range for {primitive.name}",
            )
            return
        if primitive.name in _DATE_TYPES and not _valid_calendar_date(text):
            self.add("value", BAD_VALUE, path, f"{slot.element.name} is not a calendar date")
            return
        codes = slot.element.codes
        if codes is not None and value not in codes:
            allowed = ", ".join(sorted(codes)[:12]) + (", ..." if len(codes) > 12 else "")
            self.add(
                "code-invalid",
                BAD_CODE,
                path,
                f"{slot.element.name} is not one of its codes ({allowed})",
            )

    def reference(self, value: dict[str, Any], element: Element, path: str, scope: _Scope) -> None:
        ref = value.get("reference")
        if not isinstance(ref, str) or not ref:
            return
        where = f"{path}.reference"
        defs = self.defs
        target_type: str | None = None
        if ref.startswith("#"):
            if defs.local_ref.fullmatch(ref) is None:
                self.add("value", BAD_REFERENCE, where, "Malformed local reference")
                return
            local = ref[1:]
            if not local:
                if not scope.in_contained:
                    self.add(
                        "value",
                        BAD_REFERENCE,
                        where,
                        "'#' refers to the containing resource; only valid inside a contained one",
                    )
                return
            target_type = scope.contained.get(local)
            if target_type is None:
                self.add(
                    "value",
                    BAD_REFERENCE,
                    where,
                    "The local reference does not match the id of a contained resource",
                )
                return
        elif ref.startswith("urn:uuid:"):
            if defs.uuid is not None and defs.uuid.fullmatch(ref) is None:
                self.add("value", BAD_REFERENCE, where, "The reference is not a valid urn:uuid")
            return
        elif ref.startswith("urn:oid:"):
            if defs.oid is not None and defs.oid.fullmatch(ref) is None:
                self.add("value", BAD_REFERENCE, where, "The reference is not a valid urn:oid")
            return
        elif ref.startswith(("http://", "https://")):
            if _ABSOLUTE_URL.fullmatch(ref) is None:
                self.add("value", BAD_REFERENCE, where, "The reference is not a valid URL")
            return
        elif "?" in ref:
            target_type, _, query = ref.partition("?")
            if target_type not in defs.resource_types or not query or any(c.isspace() for c in ref):
                self.add(
                    "value",
                    BAD_REFERENCE,
                    where,
                    "The reference is not a valid conditional reference (Type?search)",
                )
                return
        else:
            match = defs.relative_ref.fullmatch(ref)
            if match is None or match.group(1) not in defs.resource_types:
                self.add(
                    "value",
                    BAD_REFERENCE,
                    where,
                    "The reference is not valid: expected Type/id, an absolute URL, "
                    "urn:uuid:, urn:oid:, #local-id or Type?search",
                )
                return
            target_type = match.group(1)
        targets = element.targets
        if targets is not None and target_type not in targets:
            self.add(
                "value",
                BAD_REFERENCE,
                where,
                f"{element.name} cannot refer to a {target_type}; allowed: "
                + ", ".join(sorted(targets)),
            )


_ABSOLUTE_URL = re.compile(r"https?://[^\s/?#]+[^\s]*")


def validation_issues(resource: dict[str, Any]) -> list[Issue]:
    """Every structural problem of ``resource`` as OperationOutcome issues (empty when valid).

    ``resource`` is parsed FHIR JSON (a dict with ``resourceType``); contained resources,
    ``Bundle.entry.resource`` and ``Parameters.parameter.resource`` are checked as their own type.
    """
    walk = _Walk(_definitions())
    try:
        walk.resource(resource, None, None, None)
    except _TooMany:
        walk.issues.append(
            Issue(
                "error",
                "too-costly",
                f"More than {MAX_ISSUES} problems; only the first {MAX_ISSUES} are reported",
                None,
                TOO_COSTLY,
            )
        )
    except RecursionError:
        walk.issues.append(
            Issue(
                "error",
                "too-costly",
                "The resource is nested too deeply to validate",
                None,
                TOO_COSTLY,
            )
        )
    return walk.issues


def validate_resource(resource: dict[str, Any]) -> None:
    """Raise a 400 :class:`FhirError` listing every problem when ``resource`` is not valid R4."""
    issues = validation_issues(resource)
    if not issues:
        return
    first = issues[0]
    location = f"{first.expression[0]}: " if first.expression else ""
    more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
    raise FhirError(
        400,
        "invalid",
        f"The resource is not valid FHIR R4: {location}{first.diagnostics}{more}",
        code=VALIDATION_FAILED,
        issues=issues,
    )
