"""The patch interaction's pure core: JSON Patch and FHIRPath Patch.

Implements the body handling of http://hl7.org/fhir/R4/http.html#patch — RFC 6902 JSON Patch
(``application/json-patch+json``) and FHIRPath Patch (http://hl7.org/fhir/R4/fhirpatch.html, a
``Parameters`` resource sent as ``application/fhir+json``). Everything here is transport- and
storage-free: a resource dict and a parsed body go in, a new resource dict comes out (the input is
never mutated), and every failure is a :class:`FhirError` with a stable code:

=============  ======  =========================================================================
Code           Status  Meaning
=============  ======  =========================================================================
MSO-PATCH-001  400     JSON Patch body is not a JSON array of well-formed operation objects
MSO-PATCH-002  422     a JSON Patch ``test`` operation failed
MSO-PATCH-003  422     JSON Patch path does not exist, is not a valid pointer, or conflicts
MSO-PATCH-004  422     an operation would change the resource's ``resourceType`` or ``id``
MSO-PATCH-011  400     FHIRPath Patch body is not a well-formed ``Parameters`` patch (including a
                       path that is not valid FHIRPath or a ``where()`` criterion that fails)
MSO-PATCH-012  422     a path selects no element where one is required, or more than one
MSO-PATCH-013  422     ``index`` / ``source`` / ``destination`` outside the list
MSO-PATCH-014  400     a path uses FHIRPath outside the supported subset (see patch_paths)
MSO-PATCH-015  422     the selected element cannot take the operation: ``add`` to an element
                       that already has a (non-repeating) value or to a primitive, ``insert`` /
                       ``move`` on something that is not a list, an element name the type does
                       not define, a value of the wrong kind (complex vs primitive), or
                       ``delete`` / ``replace`` of the resource itself
MSO-PATCH-415  415     the media type is neither JSON Patch nor FHIR JSON
=============  ======  =========================================================================

Each error's ``expression`` names where it happened: ``["/<i>", "<pointer>"]`` for JSON Patch
(a pointer to the operation inside the patch document, then its ``path``) and
``["Parameters.parameter[<i>]", "<path>"]`` for FHIRPath Patch.

The work is split by format: :mod:`fhir_server.fhir.json_patch` (RFC 6902),
:mod:`fhir_server.fhir.fhirpath_patch` (operations and values) with
:mod:`fhir_server.fhir.patch_paths` (where a path points), both over the shared R4 type model
:mod:`fhir_server.fhir.model`. No error text quotes a value of the resource or of the patch:
only operation indexes, ops, paths and codes.
"""

from __future__ import annotations

from typing import Any

from fhir_server.fhir.fhirpath_patch import apply_fhirpath_patch
from fhir_server.fhir.json_patch import apply_json_patch
from fhir_server.fhir.jsonio import loads
from fhir_server.fhir.outcome import FhirError

__all__ = [
    "FHIR_JSON_MEDIA_TYPE",
    "JSON_MEDIA_TYPE",
    "JSON_PATCH_MEDIA_TYPE",
    "apply_fhirpath_patch",
    "apply_json_patch",
    "apply_patch",
]

JSON_PATCH_MEDIA_TYPE = "application/json-patch+json"
FHIR_JSON_MEDIA_TYPE = "application/fhir+json"
JSON_MEDIA_TYPE = "application/json"

# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def apply_patch(resource: dict[str, Any], body: Any, content_type: str) -> dict[str, Any]:
    """Apply a patch body to ``resource`` according to the request's ``Content-Type``.

    ``application/json-patch+json`` is JSON Patch; ``application/fhir+json`` is FHIRPath Patch,
    as is ``application/json`` when the body is a ``Parameters`` resource. ``body`` is the parsed
    JSON (raw bytes are parsed here). Any other media type is a 415 (MSO-PATCH-415).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in (JSON_PATCH_MEDIA_TYPE, FHIR_JSON_MEDIA_TYPE, JSON_MEDIA_TYPE):
        raise _unsupported_media(content_type)
    if isinstance(body, bytes | bytearray | memoryview):
        body = loads(bytes(body))
    if media == JSON_PATCH_MEDIA_TYPE:
        return apply_json_patch(resource, body)
    if media == FHIR_JSON_MEDIA_TYPE:
        return apply_fhirpath_patch(resource, body)
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        return apply_fhirpath_patch(resource, body)
    raise _unsupported_media(
        content_type,
        "an application/json patch body must be a FHIRPath Patch Parameters resource; "
        f"send JSON Patch as {JSON_PATCH_MEDIA_TYPE}",
    )


def _unsupported_media(content_type: str, detail: str | None = None) -> FhirError:
    message = (
        f"Unsupported patch media type {content_type!r}: use {JSON_PATCH_MEDIA_TYPE} (JSON Patch) "
        f"or {FHIR_JSON_MEDIA_TYPE} (FHIRPath Patch)"
    )
    if detail:
        message = f"{message}; {detail}"
    return FhirError(415, "not-supported", message, code="MSO-PATCH-415")
