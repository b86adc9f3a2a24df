"""The MSO access policy: the one place that decides what a caller may see and touch.

DESIGN.md (Access): every request is allowed by the intersection of its token's SMART scopes and
the MSO rules —

* requesters see their organization's cases and the patients in them;
* a provider sees the cases assigned to it (losing them when it rejects or is reassigned) and
  those patients' compartments;
* admins see everything except chat content;
* patients see their own compartment;
* directory and conformance resources (organizations, practitioners, profiles, terminology …)
  are readable by every authenticated caller.

The rule is applied inside the repository: :meth:`AccessPolicy.visible` is a SQL condition on a
``resource`` row that the repository ANDs into reads, searches (matches, ``_include``,
``_revinclude``, chains, ``_has``, totals), ``_history``, conditional interactions and
``$everything``, so no path can return what it excludes. Writes are allowed when the caller
may see the resource before the write and will still see it after: nobody can create or move a
resource out of their own reach (a requester cannot file a case for another organization).

What a resource belongs to is kept in ``access_scope`` / ``case_access``
(:mod:`fhir_server.storage.access_schema`), rewritten by :meth:`AccessPolicy.on_write` in the
same transaction as every write.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    false,
    insert,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import Permission, ResourceScope
from fhir_server.fhir.definitions import load_json
from fhir_server.fhir.outcome import FhirError
from fhir_server.storage.access_schema import access_scope, case_access
from fhir_server.storage.engine import execute_constant
from fhir_server.storage.index_schema import idx_reference
from fhir_server.storage.schema import resource
from fhir_server.workflow.codes import (
    COMMUNICATION_CATEGORY_SYSTEM,
    COMMUNICATION_NOTIFICATION,
    TASK_CODE_CASE,
    TASK_CODE_SYSTEM,
    USERNAME_SYSTEM,
)

if TYPE_CHECKING:
    from fhir_server.search.registry import SearchRegistry
    from fhir_server.storage.repository import StoredResource, Tx


@dataclass(frozen=True)
class ScopeWrite:
    """The access rows one write adds beyond those its references give (see
    :meth:`AccessPolicy.scope_write`)."""

    pid: int
    res_type: str
    listed: list[dict[str, Any]]
    replace: bool  # not a creation: the previous rows (but the owner's) go first


class ScopeKind(IntEnum):
    """Kinds of ``access_scope`` rows (see :mod:`fhir_server.storage.access_schema`)."""

    PATIENT = 1
    CASE = 2
    OWNER = 3
    CHAT = 4
    VIA = 5
    RECIPIENT = 6


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
# RECIPIENT rows naming a user account rather than a FHIR identity.
_USER = "user"


def forbidden(message: str, code: str = "MSO-AUTH-403") -> FhirError:
    """A 403 OperationOutcome."""
    return FhirError(403, "forbidden", message, code=code)


def require_platform(caller: Any, action: str, code: str) -> None:
    """403 unless ``caller`` is an admin or an organization-less system client (or the server
    itself): ``action`` completes "Only administrators …"."""
    if isinstance(caller, Principal) and not caller.acts_for_platform:
        raise forbidden(f"Only administrators {action}", code)


class AccessPolicy:
    """Scope maintenance on write, visibility conditions and permission checks."""

    def __init__(self, registry: SearchRegistry) -> None:
        self.registry = registry
        self._filters: dict[tuple[Any, int], tuple[Any, ColumnElement[bool]]] = {}

    # -- what a resource belongs to (maintained on every write) ------------------------------

    @cached_property
    def _compartment_identities(self) -> dict[str, list[int]]:
        """Per type, the hash identities of the reference parameters linking it to a Patient."""
        definition = load_json("compartmentdefinition-patient.json")
        out: dict[str, list[int]] = {}
        for entry in definition.get("resource", ()):
            rtype = entry["code"]
            ids = [
                param.identity(rtype)
                for code in entry.get("param", ())
                if (param := self.registry.get(rtype, code)) is not None
                and param.type == "reference"
            ]
            if ids:
                out[rtype] = ids
        return out

    def on_write(self, tx: Tx, stored: StoredResource, *, created: bool) -> None:
        """Rewrite the access rows of ``stored`` now (its index rows are already written):
        :meth:`scope_write`, :meth:`write_scopes` and :meth:`index_case` in one call."""
        self.write_scopes(tx.conn, [self.scope_write(tx, stored, created=created)])
        self.index_case(tx, stored)

    def scope_write(self, tx: Tx, stored: StoredResource, *, created: bool) -> ScopeWrite:
        """The ``access_scope`` rows ``stored`` needs beyond those its references give, decided
        at the write (who writes it is the caller of that moment). Owner rows are written once,
        at creation."""
        pid, rtype, body = stored.pid, stored.res_type, stored.resource
        rows: list[dict[str, Any]] = []
        if rtype == "Patient":
            rows.append(_row(pid, ScopeKind.PATIENT, "Patient", stored.res_id))
        if rtype == "ServiceRequest":
            rows.append(_row(pid, ScopeKind.CASE, "ServiceRequest", stored.res_id))
        if is_chat(rtype, body):
            rows.append(_row(pid, ScopeKind.CHAT, None, ""))
        if is_notification(rtype, body):
            for recipient in body.get("recipient") or ():
                ref = (recipient or {}).get("reference") or ""
                ident = (recipient or {}).get("identifier") or {}
                if ref.count("/") == 1:
                    ttype, tid = ref.split("/")
                    rows.append(_row(pid, ScopeKind.RECIPIENT, ttype, tid))
                elif ident.get("system") == USERNAME_SYSTEM and ident.get("value"):
                    rows.append(_row(pid, ScopeKind.RECIPIENT, _USER, ident["value"]))
        if rtype == "Binary":
            target = (body.get("securityContext") or {}).get("reference") or ""
            if "/" in target:
                ttype, tid = target.split("/")[-2:]
                rows.append(_row(pid, ScopeKind.VIA, ttype, tid))
        if rtype == "Provenance":
            for target in body.get("target") or ():
                ref = (target or {}).get("reference") or ""
                if "/" in ref:
                    ttype, tid = ref.split("/_history/")[0].split("/")[-2:]
                    rows.append(_row(pid, ScopeKind.VIA, ttype, tid))
        caller = tx.caller
        if created and isinstance(caller, Principal):
            rows.append(_row(pid, ScopeKind.OWNER, None, owner_key(caller)))
        return ScopeWrite(pid, rtype, rows, replace=not created)

    def write_scopes(self, conn: Connection, writes: Sequence[ScopeWrite]) -> None:
        """Rewrite the ``access_scope`` rows of written resources, in write order, once their
        index rows are stored (compartment and case memberships are read from them).

        A resource referencing a Task belongs to that Task's cases, read from the Task's own
        rows: so the resources after a Task are written in a later statement than it. Without
        a Task among them, a whole transaction Bundle's rows take a statement per type.
        """
        run: list[ScopeWrite] = []
        for write in writes:
            run.append(write)
            if write.res_type == "Task":
                self._write_scope_run(conn, run)
                run = []
        self._write_scope_run(conn, run)

    def _write_scope_run(self, conn: Connection, run: list[ScopeWrite]) -> None:
        if len(run) == 1:
            write = run[0]
            if write.replace:
                conn.execute(_DELETE_SCOPES, {"scope_pid": write.pid})
            self._insert_scopes(conn, write.pid, write.res_type, write.listed)
            return
        if not run:
            return
        replaced = [w.pid for w in run if w.replace]
        if replaced:
            conn.execute(_DELETE_SCOPES_OF, {"scope_pids": replaced})
        by_type: dict[str, list[int]] = {}
        for write in run:
            by_type.setdefault(write.res_type, []).append(write.pid)
        for rtype, pids in by_type.items():
            execute_constant(conn, self._scope_statement(rtype, 0, many=True), {"scope_pids": pids})
        _insert_listed(conn, [row for w in run for row in w.listed])

    def index_case(self, tx: Tx, stored: StoredResource) -> None:
        """Keep ``case_access`` current from a case (ServiceRequest) or its workflow Task."""
        if stored.res_type == "ServiceRequest":
            self._index_case(tx, stored)
        elif stored.res_type == "Task":
            self._index_case_task(tx, stored.resource)

    def _insert_scopes(
        self, conn: Connection, pid: int, rtype: str, rows: list[dict[str, Any]]
    ) -> None:
        """PATIENT rows from the compartment references, CASE rows from case references, and
        ``rows``: one statement for the usual few rows (a write's round trips add up)."""
        if len(rows) > _LISTED_MAX:  # a Provenance of a whole transaction, a broadcast …
            conn.execute(self._scope_statement(rtype, 0), {"scope_pid": pid})
            _insert_listed(conn, rows)
            return
        params: dict[str, Any] = {"scope_pid": pid}
        for i, row in enumerate(rows):
            params.update({f"s{i}_{column}": value for column, value in row.items()})
        execute_constant(conn, self._scope_statement(rtype, len(rows)), params)

    @functools.cache  # noqa: B019  (one policy per process; few types and row counts)
    def _scope_statement(self, rtype: str, listed: int, *, many: bool = False) -> Any:
        """One ``INSERT … SELECT … UNION ALL …`` per type and number of listed rows (bound as
        ``s<i>_<column>``), built once (hot write path). ``many``: for the resources whose
        pids are bound as the list ``scope_pids``."""
        ref = idx_reference.c
        if many:
            pids = bindparam("scope_pids", expanding=True)

            def of_written(column: Any) -> Any:
                return column.in_(pids)
        else:
            pid = bindparam("scope_pid")

            def of_written(column: Any) -> Any:
                return column == pid

        parts: list[Any] = []
        identities = self._compartment_identities.get(rtype)
        if identities:
            parts.append(
                select(ref.pid, literal(int(ScopeKind.PATIENT)), literal("Patient"), ref.target_id)
                .where(
                    of_written(ref.pid),
                    ref.target_type == "Patient",
                    ref.target_id.is_not(None),
                    # constants in the SQL: an expanding IN list is re-rendered per execution
                    ref.hash_identity.in_([literal_column(str(int(i))) for i in identities]),
                )
                .distinct()
            )
        parts.append(
            select(ref.pid, literal(int(ScopeKind.CASE)), literal("ServiceRequest"), ref.target_id)
            .where(
                of_written(ref.pid),
                ref.target_type == "ServiceRequest",
                ref.target_id.is_not(None),
            )
            .distinct()
        )
        # A resource referencing a Task (a case issue partOf the case Task, a Provenance of
        # it …) belongs to that Task's cases.
        parent = resource.alias("parent")
        scope = access_scope.alias("parent_scope")
        parts.append(
            select(ref.pid, literal(int(ScopeKind.CASE)), literal("ServiceRequest"), scope.c.ref_id)
            .select_from(
                idx_reference.join(
                    parent,
                    and_(parent.c.res_type == ref.target_type, parent.c.res_id == ref.target_id),
                ).join(scope, scope.c.pid == parent.c.pid)
            )
            .where(
                of_written(ref.pid),
                ref.target_type == "Task",
                parent.c.pid != ref.pid,
                scope.c.kind == ScopeKind.CASE,
            )
            .distinct()
        )
        columns = ("pid", "kind", "ref_type", "ref_id")
        parts.extend(
            select(*(bindparam(f"s{i}_{c}", type_=access_scope.c[c].type) for c in columns))
            for i in range(listed)
        )
        return _scope_from_select(union_all(*parts))

    def _index_case(self, tx: Tx, stored: StoredResource) -> None:
        body = stored.resource
        requester = (body.get("requester") or {}).get("reference")
        caller = tx.caller
        org = self._organization_of(tx, requester)
        if org is None and isinstance(caller, Principal) and caller.role is Role.REQUESTER:
            org = caller.organization
        performer = next(
            (
                ref.split("/")[-1]
                for p in body.get("performer") or ()
                if (ref := (p or {}).get("reference") or "").startswith("PractitionerRole/")
            ),
            None,
        )
        values: dict[str, Any] = {
            "patient_id": _id_of((body.get("subject") or {}).get("reference"), "Patient"),
            "requester_ref": requester,
        }
        if org is not None:
            values["requester_org"] = org
        if performer is not None:
            values["provider_role"] = performer
        _upsert_case(tx.conn, stored.res_id, values)

    def _index_case_task(self, tx: Tx, body: dict[str, Any]) -> None:
        """A case's workflow Task (code ``case``) carries its assignment (owner) and status."""
        if not _has_code(body.get("code"), TASK_CODE_CASE, TASK_CODE_SYSTEM) or body.get("partOf"):
            return
        case_id = _id_of((body.get("focus") or {}).get("reference"), "ServiceRequest")
        if case_id is None:
            case_id = next(
                (
                    cid
                    for b in body.get("basedOn") or ()
                    if (cid := _id_of((b or {}).get("reference"), "ServiceRequest"))
                ),
                None,
            )
        if case_id is None:
            return
        owner = _id_of((body.get("owner") or {}).get("reference"), "PractitionerRole")
        _upsert_case(tx.conn, case_id, {"provider_role": owner, "status": body.get("status")})

    def _organization_of(self, tx: Tx, reference: str | None) -> str | None:
        if not reference or "/" not in reference:
            return None
        rtype, rid = reference.split("/")[-2:]
        if rtype == "Organization":
            return rid
        if rtype == "PractitionerRole":
            role = tx.current("PractitionerRole", rid)
            if role is not None and not role.deleted:
                org = (role.resource.get("organization") or {}).get("reference")
                return _id_of(org, "Organization")
        return None

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
        if not isinstance(caller, Principal):
            return True
        r = resource.alias("r")
        stmt = select(literal(1)).where(r.c.pid == pid, self.visible(caller, r, permission))
        return conn.execute(stmt).first() is not None

    def can_see(
        self, conn: Connection, caller: Any, stored: StoredResource, permission: Permission
    ) -> bool:
        """True when ``caller`` may see ``stored`` (a row already loaded).

        For an admin or organization-less system client with a plain scope only chat is
        hidden, and whether a version is chat follows from its content: no query needed.
        """
        if not isinstance(caller, Principal):
            return True
        if stored.content is not None and self._sees_all_but_chat(
            caller, stored.res_type, permission
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

        hidden = PROVIDER_HIDDEN_TYPES if caller.role is Role.PROVIDER else frozenset()

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
        self, tx: Tx, stored: StoredResource, permission: Permission, *, after: bool
    ) -> None:
        """403 when the caller may not write ``stored`` (before: its current version; after:
        the version just written, which must stay within the caller's reach)."""
        caller = tx.caller
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
        elif self.is_visible(tx.conn, caller, stored.pid, permission):
            return
        if after:
            raise forbidden(
                f"{stored.reference} would be outside what this user may access "
                "(check its patient, case and requester)",
                "MSO-AUTH-404",
            )
        raise forbidden(f"Not allowed to change {stored.reference}", "MSO-AUTH-403")


def is_notification(res_type: str, body: dict[str, Any]) -> bool:
    """An in-app notification: a Communication of the MSO category ``notification``."""
    if res_type != "Communication":
        return False
    return any(
        (c or {}).get("system") == COMMUNICATION_CATEGORY_SYSTEM
        and (c or {}).get("code") == COMMUNICATION_NOTIFICATION
        for concept in body.get("category") or ()
        for c in (concept or {}).get("coding") or ()
    )


def _addressed_to(caller: Principal) -> ConditionOn:
    """SQL on ``r``: a notification addressed to the caller (FHIR identity or user name)."""
    identities = [(_USER, caller.subject)]
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


def is_chat(res_type: str, body: dict[str, Any]) -> bool:
    """Chat content: a Communication about a case (basedOn its ServiceRequest), or a Binary
    attached to a Communication (securityContext). Admins never see it."""
    if res_type == "Communication":
        return _references(body.get("basedOn"), "ServiceRequest")
    if res_type == "Binary":
        return (
            _id_of((body.get("securityContext") or {}).get("reference"), "Communication")
            is not None
        )
    return False


_DELETE_SCOPES = delete(access_scope).where(
    access_scope.c.pid == bindparam("scope_pid"), access_scope.c.kind != int(ScopeKind.OWNER)
)


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


_DELETE_SCOPES_OF = delete(access_scope).where(
    access_scope.c.pid.in_(bindparam("scope_pids", expanding=True)),
    access_scope.c.kind != int(ScopeKind.OWNER),
)
_INSERT_SCOPE = insert(access_scope)
_PG_INSERT_SCOPE_ROWS = (
    "INSERT INTO access_scope (pid, kind, ref_type, ref_id) SELECT pid, kind, ref_type, ref_id"
    " FROM json_populate_recordset(NULL::access_scope, %s)"
)
_LISTED_MAX = 8  # access rows of a write listed in its scope statement (more: executemany)


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


def owner_key(caller: Principal) -> str:
    """The OWNER key recorded on what ``caller`` creates."""
    if caller.role is Role.REQUESTER and caller.organization:
        return f"org:{caller.organization}"
    return f"user:{caller.subject}"


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


def _insert_listed(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert ``access_scope`` rows (on PostgreSQL one statement, the rows as one JSON array)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_PG_INSERT_SCOPE_ROWS, (orjson.dumps(rows).decode(),))
    else:
        conn.execute(_INSERT_SCOPE, rows)


def _row(pid: int, kind: ScopeKind, ref_type: str | None, ref_id: str) -> dict[str, Any]:
    return {"pid": pid, "kind": int(kind), "ref_type": ref_type, "ref_id": ref_id}


def _has_scope(r: Any, kind: ScopeKind, refs: Any = None) -> ColumnElement[bool]:
    """SQL: ``r`` has an ``access_scope`` row of ``kind`` (with ``ref_id`` in ``refs``)."""
    s = access_scope.alias()
    conds = [s.c.pid == r.c.pid, s.c.kind == int(kind)]
    if refs is not None:
        conds.append(s.c.ref_id.in_(refs))
    return exists(select(literal(1)).select_from(s).where(*conds))


def _scope_from_select(sel: Any) -> Any:
    return insert(access_scope).from_select(["pid", "kind", "ref_type", "ref_id"], sel)


def _references(refs: Any, rtype: str) -> bool:
    return any(_id_of((ref or {}).get("reference"), rtype) for ref in refs or ())


def _id_of(reference: str | None, rtype: str) -> str | None:
    """The id in a ``Type/id`` (or absolute / versioned) reference of type ``rtype``."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].split("/")
    if len(parts) >= 2 and parts[-2] == rtype:
        return parts[-1]
    return None


def _has_code(concept: Any, code: str, system: str) -> bool:
    return any(
        (c or {}).get("code") == code and (c or {}).get("system") == system
        for c in (concept or {}).get("coding") or ()
    )


def _upsert_case(conn: Connection, case_id: str, values: dict[str, Any]) -> None:
    """Insert or update the ``case_access`` row of ``case_id`` (only the given columns)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(case_access).values(case_id=case_id, **values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[case_access.c.case_id],
        set_={k: stmt.excluded[k] for k in values},
    )
    conn.execute(stmt)


__all__ = [
    "AUDIT_TYPES",
    "IMMUTABLE_TYPES",
    "OPEN_TYPES",
    "AccessPolicy",
    "ScopeKind",
    "forbidden",
    "owner_key",
]
