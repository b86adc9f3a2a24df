"""What no patch may change: a resource's ``resourceType`` and ``id``.

http://hl7.org/fhir/R4/http.html#patch: the patched resource is the same resource, so both patch
formats (:mod:`fhir_server.fhir.json_patch`, :mod:`fhir_server.fhir.fhirpath_patch`) compare this
before and after each operation (MSO-PATCH-004).
"""

from __future__ import annotations

from typing import Any


def identity(doc: Any) -> tuple[Any, ...]:
    """The resourceType and the id (including whether it is present) of ``doc``."""
    if not isinstance(doc, dict):
        return (type(doc).__name__,)
    return ("object", doc.get("resourceType"), "id" in doc, doc.get("id"))
