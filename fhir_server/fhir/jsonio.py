"""FHIR JSON in and out, through orjson.

http://hl7.org/fhir/R4/json.html: UTF-8 JSON objects; numbers keep their decimal precision only
as far as a float does, which is what every Python FHIR library does too.
"""

from __future__ import annotations

from typing import Any

import orjson

from fhir_server.fhir.outcome import FhirError


def loads(data: bytes | str) -> Any:
    """Parse JSON, raising a 400 :class:`FhirError` on malformed input."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson's message is position-only today, but the exception carries the whole body:
        # the outcome says where, from numbers, and the cause is not chained into tracebacks.
        raise FhirError(
            400,
            "structure",
            f"Request body is not valid JSON (line {exc.lineno}, column {exc.colno})",
            code="MSO-FHIR-001",
        ) from None


def dumps(value: Any, *, pretty: bool = False) -> bytes:
    """Serialize to compact (or indented) UTF-8 JSON bytes."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 if pretty else 0)


def parse_resource(data: bytes | str) -> dict[str, Any]:
    """Parse a request body that must hold one FHIR resource (a JSON object with resourceType)."""
    value = loads(data)
    if not isinstance(value, dict):
        raise FhirError(400, "structure", "Request body must be a JSON object", code="MSO-FHIR-002")
    if not isinstance(value.get("resourceType"), str):
        raise FhirError(
            400,
            "required",
            "Resource has no resourceType",
            code="MSO-FHIR-003",
            expression=["resourceType"],
        )
    return value
