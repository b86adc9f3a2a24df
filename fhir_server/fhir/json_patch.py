"""JSON Patch (RFC 6902, https://www.rfc-editor.org/rfc/rfc6902) applied to a FHIR resource.

http://hl7.org/fhir/R4/http.html#patch with ``Content-Type: application/json-patch+json``. The
``jsonpatch`` / ``jsonpointer`` libraries do the work, one operation at a time; their exception
texts quote the document (``member 'name' not found in {'resourceType': 'Patient', …}``), so none
of them is passed on: every failure becomes a :class:`FhirError` of our own whose message names
the operation's index, its op, its path (and ``from``) and what went wrong, with a stable code
(see :mod:`fhir_server.fhir.patch`) — never a value of the resource or of the patch.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer

from fhir_server.fhir.outcome import FhirError
from fhir_server.fhir.patch_identity import identity

MALFORMED = "MSO-PATCH-001"
TEST_FAILED = "MSO-PATCH-002"
BAD_PATH = "MSO-PATCH-003"
IDENTITY = "MSO-PATCH-004"
_DIFFERENT = "the value at the path is not the value the test expects"


_JSON_PATCH_MEMBERS: dict[str, tuple[str, ...]] = {
    "add": ("value",),
    "remove": (),
    "replace": ("value",),
    "move": ("from",),
    "copy": ("from",),
    "test": ("value",),
}


def apply_json_patch(resource: dict[str, Any], operations: Any) -> dict[str, Any]:
    """Apply an RFC 6902 JSON Patch document to a copy of ``resource`` and return the copy.

    Operations are applied one at a time (with the ``jsonpatch`` library) so that a failure names
    the operation's index and path. ``test`` compares JSON values strictly (``true`` is not
    ``1``). Raises :class:`FhirError` MSO-PATCH-001/002/003/004 (see :mod:`fhir_server.fhir.patch`);
    its text never quotes a value.
    """
    ops = _validated_json_patch(operations)
    before = identity(resource)
    doc: Any = copy.deepcopy(resource)
    for i, op in enumerate(ops):
        try:
            doc = jsonpatch.JsonPatch([copy.deepcopy(op)]).apply(doc, in_place=True)
            if op["op"] == "test" and not _json_equal(
                jsonpointer.resolve_pointer(doc, op["path"]), op["value"]
            ):
                raise _json_patch_error(i, op, 422, "processing", TEST_FAILED, _DIFFERENT)
        except jsonpatch.JsonPatchTestFailed:
            # The library's text quotes both values: ours says only that they differ.
            raise _json_patch_error(i, op, 422, "processing", TEST_FAILED, _DIFFERENT) from None
        except jsonpatch.InvalidJsonPatch:
            detail = "not a valid JSON Patch operation"
            raise _json_patch_error(i, op, 400, "invalid", MALFORMED, detail) from None
        except jsonpatch.JsonPatchConflict:
            detail = "the operation conflicts with the document (e.g. a move into its own child)"
            raise _json_patch_error(i, op, 422, "processing", BAD_PATH, detail) from None
        except (
            jsonpatch.JsonPatchException,
            jsonpointer.JsonPointerException,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
        ):
            detail = "the path does not exist in the resource or is not a valid JSON pointer"
            raise _json_patch_error(i, op, 422, "processing", BAD_PATH, detail) from None
        if identity(doc) != before:
            raise _json_patch_error(
                i, op, 422, "invariant", IDENTITY, "a patch may not change resourceType or id"
            )
    return doc


def _validated_json_patch(operations: Any) -> list[dict[str, Any]]:
    """Check the shape of a JSON Patch document (MSO-PATCH-001) before applying anything."""
    if not isinstance(operations, list):
        raise FhirError(
            400,
            "invalid",
            "A JSON Patch body must be a JSON array of operation objects",
            code=MALFORMED,
        )
    for i, op in enumerate(operations):
        if not isinstance(op, dict):
            raise _json_patch_error(i, {}, 400, "invalid", MALFORMED, "not a JSON object")
        name = op.get("op")
        if not isinstance(name, str) or name not in _JSON_PATCH_MEMBERS:
            raise _json_patch_error(
                i,
                op,
                400,
                "invalid",
                MALFORMED,
                "'op' must be one of " + ", ".join(_JSON_PATCH_MEMBERS),
            )
        if not isinstance(op.get("path"), str):
            raise _json_patch_error(i, op, 400, "invalid", MALFORMED, "missing string 'path'")
        for member in _JSON_PATCH_MEMBERS[name]:
            if member not in op:
                raise _json_patch_error(
                    i, op, 400, "invalid", MALFORMED, f"{name!r} requires {member!r}"
                )
        if "from" in _JSON_PATCH_MEMBERS[name] and not isinstance(op["from"], str):
            raise _json_patch_error(i, op, 400, "invalid", MALFORMED, "'from' must be a string")
    return operations


def _json_patch_error(
    index: int, op: dict[str, Any], status: int, issue_code: str, code: str, detail: str
) -> FhirError:
    """The error of operation ``index``: its op, path and ``from`` (pointers, not values)."""
    path = op.get("path")
    name = op.get("op")
    where = f"JSON Patch operation {index}"
    if isinstance(name, str) and name in _JSON_PATCH_MEMBERS:
        parts = [str(name)]
        if isinstance(path, str):
            parts.append(repr(path))
        if isinstance(op.get("from"), str):
            parts.append(f"from {op['from']!r}")
        where += f" ({' '.join(parts)})"
    expression = [f"/{index}"] + ([path] if isinstance(path, str) else [])
    return FhirError(status, issue_code, f"{where}: {detail}", code=code, expression=expression)


def _json_equal(a: Any, b: Any) -> bool:
    """RFC 6902 equality: same JSON type and value (numbers compare numerically)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
