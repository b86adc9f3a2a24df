"""``_text`` and ``_content``: http://hl7.org/fhir/R4/search.html#text and #content.

Best effort full text: the narrative (tags stripped) and every string of the resource are
stored normalized in ``idx_text`` (one row each); a search value matches when each of its
words occurs in that text (words joined by spaces; ``OR`` via commas as usual). ``near``
(Location) is not supported.
"""

from __future__ import annotations

import re
from typing import Any

from fhir_server.search.hashing import normalize
from fhir_server.search.types.base import (
    All,
    Cmp,
    Contains,
    IndexRows,
    Pred,
    unescape,
)

TABLE = "idx_text"
KIND_TEXT = 1
KIND_CONTENT = 2
CODES = {"_text": KIND_TEXT, "_content": KIND_CONTENT}
_TAG = re.compile(r"<[^>]+>")
MAX_TEXT = 20000


def _full_norm(text: str) -> str:
    out = []
    for start in range(0, min(len(text), MAX_TEXT), 180):
        out.append(normalize(text[start : start + 180]))
    return " ".join(out)


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("text", "meta", "id", "resourceType", "url", "system", "reference"):
                if key == "text" and isinstance(item, str):
                    out.append(item)
                continue
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


def extract(resource: dict[str, Any]) -> IndexRows:
    """The ``_text`` and ``_content`` rows of a resource."""
    rows: IndexRows = []
    div = (resource.get("text") or {}).get("div")
    if isinstance(div, str) and div:
        rows.append((TABLE, {"kind": KIND_TEXT, "text_norm": _full_norm(_TAG.sub(" ", div))}))
    strings: list[str] = []
    _strings(resource, strings)
    content = " ".join(s for s in strings if s)
    if content:
        rows.append((TABLE, {"kind": KIND_CONTENT, "text_norm": _full_norm(content)}))
    return rows


def predicate(code: str, value: str) -> Pred:
    """Every word of ``value`` occurs in the text of kind ``code``."""
    words = normalize(unescape(value)).split()
    return All((Cmp("kind", "=", CODES[code]), *(Contains("text_norm", w) for w in words)))
