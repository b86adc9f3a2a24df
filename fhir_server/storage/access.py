"""The interface the repository needs from the access policy it is given (DESIGN.md, Access).

The repository applies the policy on every path (reads, searches, writes) but does not know the
rules: :class:`AccessRules` is what it calls, implemented by
:class:`fhir_server.auth.policy.AccessPolicy`, which sits above the repository and imports it,
never the other way round. :class:`AccessUnit` is the part of a unit of work (``Tx``) the
policy uses in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection

from fhir_server.auth.scopes import Permission
from fhir_server.storage.records import StoredResource

# A search access filter: a condition on a ``resource`` alias (see search.compile.CompileOptions)
SearchFilter = Callable[[Any], Any]


class AccessUnit(Protocol):
    """What the policy reads from a unit of work: who acts, its connection (every write of the
    unit stored), and current rows."""

    caller: Any

    @property
    def conn(self) -> Connection:
        """The unit's connection."""
        ...

    def current(
        self, res_type: str, res_id: str, *, for_update: bool = False
    ) -> StoredResource | None:
        """The current row of a resource, or ``None``."""
        ...


class AccessIndexer(Protocol):
    """Keeps the policy's membership rows (``access_scope``, ``case_access``) with every write,
    as :mod:`fhir_server.storage.indexer` keeps the search rows."""

    def rows_for(self, unit: AccessUnit, stored: StoredResource, *, created: bool) -> Any:
        """The rows to store for ``stored`` (opaque to the repository), decided at the write."""
        ...

    def write(self, conn: Connection, writes: Sequence[Any]) -> None:
        """Store the rows of :meth:`rows_for` of written resources, in write order, once their
        search index rows are stored."""
        ...

    def after_write(self, unit: AccessUnit, stored: StoredResource) -> None:
        """Update what is derived from ``stored`` beyond its own rows (the case projection)."""
        ...


class AccessRules(Protocol):
    """Who may see and touch what: the checks and SQL filters the repository applies."""

    @property
    def index(self) -> AccessIndexer:
        """The membership rows the rules read, kept on every write."""
        ...

    def search_filter(self, caller: Any) -> SearchFilter | None:
        """The condition searches apply for ``caller`` (``None``: no restriction)."""
        ...

    def require(self, caller: Any, res_type: str, permission: Permission) -> None:
        """403 unless ``caller`` may use ``permission`` on ``res_type`` at all."""
        ...

    def can_see(
        self, conn: Connection, caller: Any, stored: StoredResource, permission: Permission
    ) -> bool:
        """True when ``caller`` may see ``stored``."""
        ...

    def require_visible(
        self, unit: AccessUnit, stored: StoredResource, permission: Permission, *, after: bool
    ) -> None:
        """403 when the unit's caller may not write ``stored`` (before or after the write)."""
        ...
