"""``_summary`` and ``_elements`` (http://hl7.org/fhir/R4/search.html#summary, #elements).

The element lists come from the R4 StructureDefinitions (``isSummary``, ``min > 0``) and are
stored in ``summary-elements.json`` next to this module. Subsetted resources carry the
``SUBSETTED`` tag (http://terminology.hl7.org/CodeSystem/v3-ObservationValue).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
_ALWAYS = {"resourceType", "id", "meta"}


@cache
def _elements() -> dict[str, dict[str, list[str]]]:
    return orjson.loads(Path(__file__).with_name("summary-elements.json").read_bytes())


def _keep(key: str, names: set[str]) -> bool:
    if key in names or key in _ALWAYS:
        return True
    if key.startswith("_"):
        return _keep(key[1:], names)
    for name in names:
        if (
            name.endswith("[x]")
            and key.startswith(name[:-3])
            and key[len(name) - 3 : len(name) - 2].isupper()
        ):
            return True
    return False


def _subset(resource: dict[str, Any], names: set[str]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if _keep(k, names)}
    meta = dict(out.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("code") == "SUBSETTED" for t in tags):
        tags.append(SUBSETTED)
    meta["tag"] = tags
    out["meta"] = meta
    return out


def apply(
    resource: dict[str, Any], summary: str | None, elements: list[str] | None
) -> dict[str, Any]:
    """``resource`` reduced per ``_summary`` (true | text | data) or ``_elements``."""
    rt = resource.get("resourceType", "")
    info = _elements().get(rt, {"summary": [], "mandatory": []})
    if summary == "true":
        return _subset(resource, set(info["summary"]))
    if summary == "text":
        return _subset(resource, {"text", *info["mandatory"]})
    if summary == "data":
        out = {k: v for k, v in resource.items() if k != "text"}
        return _subset(out, set(out))
    if elements:
        names = {e.split(".", 1)[-1] if e.startswith(rt + ".") else e for e in elements}
        return _subset(resource, names | set(info["mandatory"]))
    return resource
