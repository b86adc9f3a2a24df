"""The MSO access policy: the one place that decides what a caller may see and touch.

DESIGN.md (Access): every request is allowed by the intersection of its token's SMART scopes and
the MSO rules —

* requesters see their organization's cases and the patients in them;
* a provider sees the cases assigned to it (losing them when it rejects or is reassigned) and
  those patients' compartments, except what carries the ``withheld-from-provider`` security
  label (the identified original of a study shared de-identified);
* admins see everything except chat content;
* patients see their own compartment;
* directory and conformance resources (organizations, practitioners, profiles, terminology …)
  are readable by every authenticated caller.

The rule is applied inside the repository (through
:class:`fhir_server.storage.access.AccessRules`): :meth:`AccessPolicy.visible` is a SQL condition
on a ``resource`` row that the repository ANDs into reads, searches (matches, ``_include``,
``_revinclude``, chains, ``_has``, totals), ``_history``, conditional interactions and
``$everything``, so no path can return what it excludes. Writes are allowed when the caller
may see the resource before the write and will still see it after: nobody can create or move a
resource out of their own reach (a requester cannot file a case for another organization).

What a resource belongs to is kept in ``access_scope`` / ``case_access``
(:mod:`fhir_server.storage.access_schema`) by :mod:`.access_index` and :mod:`.case_projection`
(:attr:`AccessPolicy.index`), in the same transaction as every write.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    exists,
    false,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.auth.access_index import USER_REF_TYPE, AccessIndex, owner_key
from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.resource_kinds import is_chat, is_notification
from fhir_server.auth.scopes import Permission, ResourceScope
from fhir_server.fhir.outcome import FhirError
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.access import AccessUnit
from fhir_server.storage.access_schema import ScopeKind, access_scope, case_access
from fhir_server.storage.engine import driver_params
from fhir_server.storage.records import StoredResource
from fhir_server.storage.schema import resource

# Directory, conformance and terminology resources: shared reference data of the platform.
OPEN_TYPES = frozenset(
    {
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Location",
        "HealthcareService",
        "Endpoint",
        "CapabilityStatement",
        "StructureDefinition",
        "SearchParameter",
        "OperationDefinition",
        "CompartmentDefinition",
        "ImplementationGuide",
        "Questionnaire",
        "CodeSystem",
        "ValueSet",
        "ConceptMap",
        "NamingSystem",
        "ChargeItemDefinition",
        "ActivityDefinition",
        "PlanDefinition",
    }
)
# A master patient index: a conditional create of these types matches across organizations.
# A requester filing a case for a person another organization registered gets that Patient
# (its id only: it becomes visible to them once a case of theirs names it) instead of a
# duplicate record of the same person.
PLATFORM_WIDE_IDENTITY_TYPES = frozenset({"Patient"})


def matches_beyond_reach(caller: Any, res_type: str, params: list[tuple[str, str]]) -> bool:
    """True when ``If-None-Exist`` criteria of ``caller`` may also match resources the caller
    cannot see: a platform-wide identity type, criteria that are only identifiers with their
    system (never a name or a birth date), and a caller who does not already see everything."""
    if not isinstance(caller, Principal) or caller.acts_for_platform:
        return False
    return res_type in PLATFORM_WIDE_IDENTITY_TYPES and all(
        name == "identifier" and "|" in value and all(value.split("|", 1)) and "," not in value
        for name, value in params
    )


# Only admins and system clients read the audit trail.
AUDIT_TYPES = frozenset({"AuditEvent"})
# What a requesting organization is billed is not the provider's business: a provider reads
# its ChargeItems, never the Invoice or the payment.
PROVIDER_HIDDEN_TYPES = frozenset({"Invoice", "PaymentNotice", "PaymentReconciliation"})
# Billing is written by the server (on Done) and by administrators (payments), nobody else.
ADMIN_WRITTEN_TYPES = frozenset(
    {"ChargeItem", "Invoice", "PaymentNotice", "PaymentReconciliation", "ChargeItemDefinition"}
)
# The audit trail and provenance are append-only through the API.
IMMUTABLE_TYPES = frozenset({"AuditEvent", "Provenance"})
# A provider keeps no access to a case it rejected.
_LOST_STATUSES = ("rejected",)

_PERMISSION_TEXT = {
    Permission.CREATE: "create",
    Permission.READ: "read",
    Permission.UPDATE: "update",
    Permission.DELETE: "delete",
    Permission.SEARCH: "search",
}

ConditionOn = Callable[[Any], ColumnElement[bool]]


def forbidden(message: str, code: str = "MSO-AUTH-403") -> FhirError:
    """A 403 OperationOutcome."""
    return FhirError(403, "forbidden", message, code=code)


def require_platform(caller: Any, action: str, code: str) -> None:
    """403 unless ``caller`` is an admin or an organization-less system client (or the server
    itself): ``action`` completes "Only administrators …"."""
    if isinstance(caller, Principal) and not caller.acts_for_platform:
        raise forbidden(f"Only administrators {action}", code)


class AccessPolicy:
    """Visibility conditions and permission checks; :attr:`index` keeps the rows they read."""

    def __init__(self, registry: SearchRegistry) -> None:
        self.registry = registry
        self.index = AccessIndex(registry)
        self._filters: dict[tuple[Any, int], tuple[Any, ColumnElement[bool]]] = {}
        self._statements: dict[tuple[Any, Permission], Select[Any]] = {}

    # -- visibility ------------------------------------------------------------------------

    def visible(
        self, caller: Principal, r: Any, permission: Permission = Permission.READ
    ) -> ColumnElement[bool]:
        """SQL: the ``resource`` row ``r`` may be seen by ``caller`` (MSO rules AND scopes)."""
        return and_(self._mso_rule(caller, r), self._scope_rule(caller, r, permission))

    def search_filter(self, caller: Any) -> ConditionOn | None:
        """The search access filter (compile seam) for ``caller``; ``None`` for internal work.

        The condition for one caller and alias is built once and reused (SQL expressions are
        immutable): building it is a tenth of a search's CPU, and the compiler asks for it on
        the same module-level alias on every search.
        """
        if not isinstance(caller, Principal):
            return None
        return _SearchFilter(self, caller, _visibility_key(caller))

    def _search_condition(self, caller: Principal, key: Hashable, r: Any) -> ColumnElement[bool]:
        cached = self._filters.get((key, id(r)))
        if cached is not None and cached[0] is r:
            return cached[1]
        built = self.visible(caller, r, Permission.SEARCH)
        if len(self._filters) >= _FILTER_CACHE_MAX:
            self._filters.clear()
        self._filters[(key, id(r))] = (r, built)  # r kept alive: its id stays its own
        return built

    def is_visible(
        self, conn: Connection, caller: Any, pid: int, permission: Permission = Permission.READ
    ) -> bool:
        """True when ``caller`` may see the resource row ``pid`` (always for internal work)."""
        return pid in self.visible_pids(conn, caller, [pid], permission)

    def visible_pids(
        self,
        conn: Connection,
        caller: Any,
        pids: Sequence[int],
        permission: Permission = Permission.READ,
    ) -> set[int]:
        """Those of the resource rows ``pids`` that ``caller`` may see: :meth:`is_visible` for
        many rows in one query, for paths that check a stream of resources for many callers
        (Subscription notifications). The statement is built and compiled once per caller's
        visibility and run on the DB-API cursor: building and compiling the access condition
        costs several times the query."""
        if not isinstance(caller, Principal):
            return set(pids)
        if not pids:
            return set()
        statement = self._visible_statement(caller, permission)
        sql, params = driver_params(statement, conn.dialect, {"pids": list(pids)})
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        try:
            cursor.execute(sql, params)
            return {int(row[0]) for row in cursor.fetchall()}
        finally:
            cursor.close()

    def _visible_statement(self, caller: Principal, permission: Permission) -> Select[Any]:
        key = (_visibility_key(caller), permission)
        found = self._statements.get(key)
        if found is None:
            r = resource.alias("r")
            found = select(r.c.pid).where(
                r.c.pid.in_(bindparam("pids", expanding=True)),
                self.visible(caller, r, permission),
            )
            if len(self._statements) >= _FILTER_CACHE_MAX:
                self._statements.clear()
            self._statements[key] = found
        return found

    def can_see(
        self, conn: Connection, caller: Any, stored: StoredResource, permission: Permission
    ) -> bool:
        """True when ``caller`` may see ``stored`` (a row already loaded).

        For an admin or organization-less system client with a plain scope only chat is
        hidden, and whether a version is chat follows from its content: no query needed. But
        not a Binary's: a raw upload becomes chat content when a message attaches it (its
        next version names the message as security context), and from then on its earlier
        versions are chat content too, which only its access rows tell.
        """
        if not isinstance(caller, Principal):
            return True
        if (
            stored.content is not None
            and stored.res_type != "Binary"
            and self._sees_all_but_chat(caller, stored.res_type, permission)
        ):
            return not is_chat(stored.res_type, stored.resource)
        return self.is_visible(conn, caller, stored.pid, permission)

    def _mso_rule(self, caller: Principal, r: Any) -> ColumnElement[bool]:
        if caller.acts_for_platform:
            return not_(_has_scope(r, ScopeKind.CHAT))
        audit_hidden = r.c.res_type.not_in(AUDIT_TYPES)
        direct = self._direct(caller)
        return and_(audit_hidden, or_(direct(r), _via(direct, r)))

    def _direct(self, caller: Principal) -> ConditionOn:
        """Visibility by the resource's own memberships (no VIA), for a non-admin caller."""
        owners = [owner_key(caller)]
        addressed = _addressed_to(caller)

        def addressed_or(r: Any, *memberships: ColumnElement[bool]) -> ColumnElement[bool]:
            # A notification is for its recipients only, whatever else it belongs to.
            return or_(
                addressed(r),
                and_(not_(_has_scope(r, ScopeKind.RECIPIENT)), or_(*memberships)),
            )

        if caller.role is Role.PATIENT:
            patient = caller.patient or ""
            own_cases = select(case_access.c.case_id).where(
                case_access.c.requester_ref == f"Patient/{patient}"
            )

            def patient_rule(r: Any) -> ColumnElement[bool]:
                return addressed_or(
                    r,
                    r.c.res_type.in_(OPEN_TYPES),
                    and_(
                        _has_scope(r, ScopeKind.PATIENT, [patient]),
                        not_(_has_scope(r, ScopeKind.CHAT)),
                    ),
                    _has_scope(r, ScopeKind.CASE, own_cases),
                    _has_scope(r, ScopeKind.OWNER, owners),
                )

            return patient_rule
        ca = case_access.c
        if caller.role is Role.PROVIDER:
            mine = and_(
                ca.provider_role == (caller.practitioner_role or ""),
                or_(ca.status.is_(None), ca.status.not_in(_LOST_STATUSES)),
            )
        elif caller.organization:
            owners.append(f"org:{caller.organization}")
            mine = ca.requester_org == caller.organization
        else:
            mine = ca.requester_ref == (caller.fhir_user or "")
        cases = select(ca.case_id).where(mine)
        patients = select(ca.patient_id).where(mine, ca.patient_id.is_not(None))

        provider = caller.role is Role.PROVIDER
        hidden = PROVIDER_HIDDEN_TYPES if provider else frozenset()

        def rule(r: Any) -> ColumnElement[bool]:
            mine = addressed_or(
                r,
                r.c.res_type.in_(OPEN_TYPES),
                _has_scope(r, ScopeKind.CASE, cases),
                and_(
                    not_(_has_scope(r, ScopeKind.CASE)),
                    or_(
                        _has_scope(r, ScopeKind.PATIENT, patients),
                        _has_scope(r, ScopeKind.OWNER, owners),
                    ),
                ),
            )
            if provider:
                # the original of a study shared de-identified stays with the requester side
                return and_(
                    r.c.res_type.not_in(hidden), not_(_has_scope(r, ScopeKind.WITHHELD)), mine
                )
            return and_(r.c.res_type.not_in(hidden), mine) if hidden else mine

        return rule

    def _scope_rule(self, caller: Principal, r: Any, permission: Permission) -> ColumnElement[bool]:
        """SQL: some granted scope covers ``r`` for ``permission`` (context and restriction)."""
        wanted = {permission}
        if permission in (Permission.READ, Permission.SEARCH):
            wanted = {Permission.READ, Permission.SEARCH}
        parts: list[ColumnElement[bool]] = []
        for scope in caller.scopes.resource_scopes:
            if not scope.permissions & wanted:
                continue
            conds: list[ColumnElement[bool]] = []
            if scope.resource_type != "*":
                conds.append(r.c.res_type == scope.resource_type)
            if scope.context == "patient":
                conds.append(self._patient_context(caller, r))
            if scope.restriction:
                conds.append(self._restriction(scope, r))
            if not conds:
                return true()
            parts.append(and_(*conds))
        return or_(*parts) if parts else false()

    def _patient_context(self, caller: Principal, r: Any) -> ColumnElement[bool]:
        """A ``patient/`` scope reaches only the launch patient's compartment."""
        if not caller.patient:
            return false()
        patient = [caller.patient]
        return or_(
            r.c.res_type.in_(OPEN_TYPES),
            _has_scope(r, ScopeKind.PATIENT, patient),
            _via(lambda t: _has_scope(t, ScopeKind.PATIENT, patient), r),
        )

    def _restriction(self, scope: ResourceScope, r: Any) -> ColumnElement[bool]:
        """A SMART v2 restriction (``?category=…``): the resource matches that search."""
        from fhir_server.search.compile import CompileOptions, base_conditions
        from fhir_server.search.query import parse_query

        if scope.resource_type == "*":
            return false()  # a restriction needs a type to be interpreted against
        query = parse_query(self.registry, (scope.resource_type,), list(scope.restriction))
        if query.issues:
            return false()  # an uninterpretable restriction grants nothing
        t = resource.alias()
        matches = select(t.c.pid).where(*base_conditions(self.registry, query, CompileOptions(), t))
        return r.c.pid.in_(matches)

    def _sees_all_but_chat(self, caller: Principal, res_type: str, permission: Permission) -> bool:
        """True when only the chat rule can hide ``res_type`` from ``caller``: an admin or an
        organization-less system client holding an unrestricted, non-patient scope for it."""
        if not caller.acts_for_platform:
            return False
        return any(
            not s.restriction and s.context != "patient"
            for s in caller.scopes.grants(res_type, permission)
        )

    def sees_every(self, caller: Any, res_type: str, permission: Permission) -> bool:
        """True when nothing of ``res_type`` outside chat is hidden from ``caller`` (internal
        work, admins, organization-less system clients with a plain scope): adapters that
        front another store (the DICOMweb bridge) then need not filter its answers."""
        if not isinstance(caller, Principal):
            return True
        return self._sees_all_but_chat(caller, res_type, permission)

    # -- permission checks -----------------------------------------------------------------

    def require(self, caller: Any, res_type: str, permission: Permission) -> None:
        """403 unless the caller's scopes (and role) allow ``permission`` on ``res_type``."""
        if not isinstance(caller, Principal):
            return
        if not caller.scopes.grants(res_type, permission):
            raise forbidden(
                f"The access token's scopes do not allow {_PERMISSION_TEXT[permission]} "
                f"on {res_type}",
                "MSO-AUTH-401",
            )
        if res_type in AUDIT_TYPES and not caller.acts_for_platform:
            raise forbidden(f"Only administrators may access {res_type}", "MSO-AUTH-402")
        if (
            permission in (Permission.CREATE, Permission.UPDATE, Permission.DELETE)
            and res_type in ADMIN_WRITTEN_TYPES
            and not caller.acts_for_platform
        ):
            raise forbidden(f"{res_type} is written by the server and administrators only")
        if permission in (Permission.UPDATE, Permission.DELETE) and res_type in IMMUTABLE_TYPES:
            raise FhirError(
                405,
                "not-supported",
                f"{res_type} records cannot be changed or deleted",
                code="MSO-AUTH-405",
            )

    def require_visible(
        self, unit: AccessUnit, stored: StoredResource, permission: Permission, *, after: bool
    ) -> None:
        """403 when the caller may not write ``stored`` (before: its current version; after:
        the version just written, which must stay within the caller's reach)."""
        caller = unit.caller
        if not isinstance(caller, Principal):
            return
        if (
            not caller.acts_for_platform
            and stored.content is not None
            and is_notification(stored.res_type, stored.resource)
        ):
            raise forbidden("Notifications are written by the server", "MSO-AUTH-406")
        # for those who see everything but chat, whether a version is chat follows from its
        # content: no query (inside a transaction Bundle a query would also store the rows
        # its entries held back so far)
        if stored.content is not None and self._sees_all_but_chat(
            caller, stored.res_type, permission
        ):
            if not is_chat(stored.res_type, stored.resource):
                return
        elif self.is_visible(unit.conn, caller, stored.pid, permission):
            return
        if after:
            raise forbidden(
                f"{stored.reference} would be outside what this user may access "
                "(check its patient, case and requester)",
                "MSO-AUTH-404",
            )
        raise forbidden(f"Not allowed to change {stored.reference}", "MSO-AUTH-403")


def _addressed_to(caller: Principal) -> ConditionOn:
    """SQL on ``r``: a notification addressed to the caller (FHIR identity or user name)."""
    identities = [(USER_REF_TYPE, caller.subject)]
    if caller.fhir_user and caller.fhir_user.count("/") == 1:
        ttype, tid = caller.fhir_user.split("/")
        identities.append((ttype, tid))

    def condition(r: Any) -> ColumnElement[bool]:
        s = access_scope.alias()
        return exists(
            select(literal(1))
            .select_from(s)
            .where(
                s.c.pid == r.c.pid,
                s.c.kind == int(ScopeKind.RECIPIENT),
                or_(*(and_(s.c.ref_type == t, s.c.ref_id == i) for t, i in identities)),
            )
        )

    return condition


_FILTER_CACHE_MAX = 2048


class _SearchFilter:
    """A caller's search access filter (a :data:`ConditionOn`). ``cache_key`` is what the SQL
    it returns depends on besides the alias, so that a statement compiled with it can be reused
    for the same key (see :mod:`fhir_server.search.shapes`)."""

    __slots__ = ("_caller", "_policy", "cache_key")

    def __init__(self, policy: AccessPolicy, caller: Principal, key: Hashable) -> None:
        self._policy = policy
        self._caller = caller
        self.cache_key = key

    def __call__(self, r: Any) -> ColumnElement[bool]:
        return self._policy._search_condition(self._caller, self.cache_key, r)


def _visibility_key(caller: Principal) -> tuple[Any, ...]:
    """What a caller's visibility depends on (not the token id, address or client)."""
    return (
        caller.role,
        caller.subject,
        caller.fhir_user,
        caller.practitioner_role,
        caller.organization,
        caller.patient,
        caller.scopes,
    )


def _via(condition: ConditionOn, r: Any) -> ColumnElement[bool]:
    """SQL: ``r`` is visible through a VIA row whose target satisfies ``condition``."""
    target = resource.alias("via_target")
    via_scope = access_scope.alias("via_scope")
    return exists(
        select(literal(1))
        .select_from(
            via_scope.join(
                target,
                and_(
                    target.c.res_type == via_scope.c.ref_type,
                    target.c.res_id == via_scope.c.ref_id,
                ),
            )
        )
        .where(via_scope.c.pid == r.c.pid, via_scope.c.kind == ScopeKind.VIA, condition(target))
    )


def not_chat(r: Any) -> ColumnElement[bool]:
    """SQL: ``r`` is neither chat nor about chat (a Provenance or Binary visible through a
    chat message: who wrote to whom, when). Paths that hand data out in bulk (the bulk
    export) add it to the caller's own filter: chat never leaves the platform, whoever asks."""
    return not_(
        or_(
            _has_scope(r, ScopeKind.CHAT),
            _via(lambda target: _has_scope(target, ScopeKind.CHAT), r),
        )
    )


def _has_scope(r: Any, kind: ScopeKind, refs: Any = None) -> ColumnElement[bool]:
    """SQL: ``r`` has an ``access_scope`` row of ``kind`` (with ``ref_id`` in ``refs``)."""
    s = access_scope.alias()
    conds = [s.c.pid == r.c.pid, s.c.kind == int(kind)]
    if refs is not None:
        conds.append(s.c.ref_id.in_(refs))
    return exists(select(literal(1)).select_from(s).where(*conds))


__all__ = [
    "AUDIT_TYPES",
    "IMMUTABLE_TYPES",
    "OPEN_TYPES",
    "AccessPolicy",
    "ScopeKind",
    "forbidden",
    "is_chat",
    "is_notification",
    "not_chat",
    "owner_key",
]
