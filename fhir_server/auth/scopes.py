"""SMART App Launch scopes, v1 and v2 (http://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html).

Resource scopes have the shape ``<context>/<type>.<permissions>[?<restriction>]``:

* context: ``patient`` (limited to the launch patient's compartment), ``user`` (whatever the
  user may see), ``system`` (a backend client acting for itself);
* type: a resource type or ``*``;
* permissions: v1 ``read`` / ``write`` / ``*``, or v2 any ordered subset of ``cruds``;
* restriction (v2 only): a search query such as ``category=laboratory`` that every resource the
  scope grants must match.

Everything else (``openid``, ``fhirUser``, ``profile``, ``launch``, ``launch/patient``,
``offline_access`` …) is kept as a plain scope. A request is allowed by the union of the resource
scopes that cover its type and permission; :meth:`ScopeSet.grants` returns them so that the
access policy can apply their context and restriction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl

from fhir_server.fhir.definitions import resource_types


class Permission(StrEnum):
    """SMART v2 permissions."""

    CREATE = "c"
    READ = "r"
    UPDATE = "u"
    DELETE = "d"
    SEARCH = "s"


V1_PERMISSIONS = {
    "read": frozenset({Permission.READ, Permission.SEARCH}),
    "write": frozenset({Permission.CREATE, Permission.UPDATE, Permission.DELETE}),
    "*": frozenset(Permission),
}
CONTEXTS = ("patient", "user", "system")
NON_RESOURCE_SCOPES = frozenset(
    {
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
    }
)
_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perms>[a-z*]+)"
    r"(?:\?(?P<query>.+))?$"
)
_V2_ORDER = "cruds"


class ScopeError(ValueError):
    """A scope string that is not a valid SMART scope."""


@dataclass(frozen=True, slots=True)
class ResourceScope:
    """One resource scope: context, type (``*`` for all), permissions and v2 restriction."""

    context: str
    resource_type: str
    permissions: frozenset[Permission]
    restriction: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def covers(self, resource_type: str, permission: Permission) -> bool:
        """True when this scope grants ``permission`` on ``resource_type``."""
        return permission in self.permissions and self.resource_type in ("*", resource_type)


def parse_scope(text: str) -> ResourceScope | str:
    """Parse one scope: a :class:`ResourceScope`, or the string itself for other scopes.

    Raises :class:`ScopeError` for a resource scope that is malformed (unknown type, bad
    permission letters, a restriction on a v1 scope).
    """
    match = _RESOURCE_SCOPE.match(text)
    if match is None:
        if "/" in text and text.split("/", 1)[0] in CONTEXTS:
            raise ScopeError(f"'{text}' is not a valid SMART resource scope")
        return text
    rtype, perms, query = match["type"], match["perms"], match["query"]
    if rtype != "*" and rtype not in resource_types():
        raise ScopeError(f"'{text}': unknown resource type '{rtype}'")
    if perms in V1_PERMISSIONS:
        if query:
            raise ScopeError(f"'{text}': only SMART v2 scopes may carry a restriction")
        permissions = V1_PERMISSIONS[perms]
    else:
        positions = [_V2_ORDER.find(c) for c in perms]
        if -1 in positions or positions != sorted(set(positions)):
            raise ScopeError(f"'{text}': permissions must be an ordered subset of 'cruds'")
        permissions = frozenset(Permission(c) for c in perms)
    restriction = tuple(parse_qsl(query, keep_blank_values=True)) if query else ()
    return ResourceScope(match["context"], rtype, permissions, restriction, text)


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The scopes of a token: resource scopes plus the other (OpenID, launch…) scopes."""

    resource_scopes: tuple[ResourceScope, ...] = ()
    other: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None, *, strict: bool = True) -> ScopeSet:
        """Parse a space-separated scope string (``strict=False`` drops invalid scopes)."""
        resources: list[ResourceScope] = []
        other: set[str] = set()
        for item in (text or "").split():
            try:
                parsed = parse_scope(item)
            except ScopeError:
                if strict:
                    raise
                continue
            if isinstance(parsed, ResourceScope):
                if parsed not in resources:
                    resources.append(parsed)
            else:
                other.add(parsed)
        return cls(tuple(resources), frozenset(other))

    def __str__(self) -> str:
        return " ".join([s.text for s in self.resource_scopes] + sorted(self.other))

    def has(self, scope: str) -> bool:
        """True when the plain (non-resource) scope ``scope`` was granted."""
        return scope in self.other

    def grants(self, resource_type: str, permission: Permission) -> list[ResourceScope]:
        """The resource scopes that grant ``permission`` on ``resource_type`` (empty: denied)."""
        return [s for s in self.resource_scopes if s.covers(resource_type, permission)]

    def types_for(self, permission: Permission) -> set[str] | None:
        """Types some scope grants ``permission`` on; ``None`` when a ``*`` scope grants all."""
        types: set[str] = set()
        for scope in self.resource_scopes:
            if permission in scope.permissions:
                if scope.resource_type == "*":
                    return None
                types.add(scope.resource_type)
        return types

    def narrowed_to(self, requested: ScopeSet) -> ScopeSet:
        """The part of ``requested`` these (allowed) scopes cover, for down-scoping a grant.

        A requested resource scope is kept when one allowed scope of the same context covers
        its type and all its permissions (an allowed restriction must be repeated exactly).
        """
        kept = tuple(
            r
            for r in requested.resource_scopes
            if any(
                a.context == r.context
                and a.resource_type in ("*", r.resource_type)
                and r.permissions <= a.permissions
                and (not a.restriction or a.restriction == r.restriction)
                for a in self.resource_scopes
            )
        )
        return ScopeSet(kept, requested.other & self.other)
