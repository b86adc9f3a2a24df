"""Composite search parameters: http://hl7.org/fhir/R4/search.html#composite.

Each element the composite expression selects (e.g. an Observation, or each
Observation.component) gets its ordinal ``grp``; each component's rows are written to its own
type's table under the identity ``<code>$<n>`` with that ``grp``. A value ``a$b`` then matches
when rows for every component exist with the same ``(pid, grp)`` — a join compiled in
:mod:`fhir_server.search.compile`.
"""

from __future__ import annotations

from fhir_server.search.hashing import hash64
from fhir_server.search.registry import SearchParam
from fhir_server.search.types.base import split_escaped

MODIFIERS = ("missing",)
MAX_GROUPS = 32000


def component_identity(identity: int, index: int) -> int:
    """hash_identity of the rows of component ``index``."""
    return hash64(str(identity), f"${index}")


def split_value(param: SearchParam, value: str) -> list[str]:
    """``code$value`` -> one escaped value per component."""
    return split_escaped(value, "$")
