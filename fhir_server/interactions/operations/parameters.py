"""The shape of an operation's Parameters body (http://hl7.org/fhir/R4/parameters.html).

:func:`check_parameters` runs once for every operation, before its handler, so that a handler
reading ``parameter`` may rely on JSON types: ``parameter`` (and each ``part``) is a list of
objects with a string ``name``; a primitive ``value[x]`` is a JSON string, number or boolean and
a complex one an object; ``resource`` is an object. Anything else is a 400 (``MSO-OP-004``)
naming the path of the bad element, never its content.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.outcome import FhirError

BAD_PARAMETERS = "MSO-OP-004"

# R4 primitive types, as they appear after ``value`` in ``value[x]`` (capitalised).
_PRIMITIVES = frozenset(
    {
        "Base64Binary", "Boolean", "Canonical", "Code", "Date", "DateTime", "Decimal", "Id",
        "Instant", "Integer", "Markdown", "Oid", "PositiveInt", "String", "Time", "UnsignedInt",
        "Uri", "Url", "Uuid",
    }
)  # fmt: skip


def check_parameters(body: Any) -> None:
    """400 unless ``body``, when it is a Parameters resource, is well formed (see module)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return
    _check_list(body.get("parameter"), "Parameters.parameter")


def _check_list(items: Any, path: str) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        raise _bad(path, "an array")
    for index, item in enumerate(items):
        _check_parameter(item, f"{path}[{index}]")


def _check_parameter(item: Any, path: str) -> None:
    if not isinstance(item, dict):
        raise _bad(path, "an object")
    if not isinstance(item.get("name"), str) or not item["name"]:
        raise _bad(f"{path}.name", "a non-empty string")
    for key, value in item.items():
        if key.startswith("value") and len(key) > len("value"):
            primitive = key[len("value") :] in _PRIMITIVES
            fits = not isinstance(value, dict | list) if primitive else isinstance(value, dict)
            if not fits:
                raise _bad(f"{path}.{key}", "a primitive" if primitive else "an object")
    if "resource" in item and not isinstance(item["resource"], dict):
        raise _bad(f"{path}.resource", "a resource")
    _check_list(item.get("part"), f"{path}.part")


def _bad(path: str, expected: str) -> FhirError:
    return FhirError(
        400, "structure", f"{path} must be {expected}", code=BAD_PARAMETERS, expression=[path]
    )
