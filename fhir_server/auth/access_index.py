"""The access rows: what each resource belongs to, kept in ``access_scope`` on every write.

As :mod:`fhir_server.storage.indexer` keeps the search rows of a resource, this module keeps
its memberships (:mod:`fhir_server.storage.access_schema`): the patient compartments and cases
it is in, read from its search reference rows in the same statement that writes them; and the
rows only its content or its writer give (chat, notification recipients, the Binary or
Provenance it is visible through, who created it). The rules of :mod:`.policy` read them; the
case projection (:mod:`.case_projection`) is updated after them. The repository calls
:class:`AccessIndex` through :class:`fhir_server.storage.access.AccessIndexer`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    insert,
    literal,
    literal_column,
    select,
    union_all,
)

from fhir_server.auth.case_projection import project_case
from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.resource_kinds import is_chat, is_notification
from fhir_server.codes import USERNAME_SYSTEM, is_withheld_from_provider
from fhir_server.fhir.definitions import load_json
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage.access import AccessUnit
from fhir_server.storage.access_schema import ScopeKind, access_scope
from fhir_server.storage.engine import execute_constant
from fhir_server.storage.index_schema import idx_reference
from fhir_server.storage.records import StoredResource
from fhir_server.storage.schema import resource

# RECIPIENT rows naming a user account rather than a FHIR identity.
USER_REF_TYPE = "user"


@dataclass(frozen=True)
class ScopeWrite:
    """The access rows one write adds beyond those its references give (see
    :meth:`AccessIndex.rows_for`)."""

    pid: int
    res_type: str
    listed: list[dict[str, Any]]
    replace: bool  # not a creation: the previous rows (but the owner's) go first


def owner_key(caller: Principal) -> str:
    """The OWNER key recorded on what ``caller`` creates."""
    if caller.role is Role.REQUESTER and caller.organization:
        return f"org:{caller.organization}"
    return f"user:{caller.subject}"


class AccessIndex:
    """Writes the ``access_scope`` rows of written resources and the case projection."""

    def __init__(self, registry: SearchRegistry) -> None:
        self.registry = registry

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

    def on_write(self, unit: AccessUnit, stored: StoredResource, *, created: bool) -> None:
        """Rewrite the access rows of ``stored`` now (its index rows are already written):
        :meth:`rows_for`, :meth:`write` and :meth:`after_write` in one call."""
        self.write(unit.conn, [self.rows_for(unit, stored, created=created)])
        self.after_write(unit, stored)

    def after_write(self, unit: AccessUnit, stored: StoredResource) -> None:
        """Keep the case projection current (a case's ServiceRequest or workflow Task)."""
        project_case(unit, stored)

    def rows_for(self, unit: AccessUnit, stored: StoredResource, *, created: bool) -> ScopeWrite:
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
                    rows.append(_row(pid, ScopeKind.RECIPIENT, USER_REF_TYPE, ident["value"]))
        if is_withheld_from_provider(body):
            rows.append(_row(pid, ScopeKind.WITHHELD, None, ""))
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
        caller = unit.caller
        if created and isinstance(caller, Principal):
            rows.append(_row(pid, ScopeKind.OWNER, None, owner_key(caller)))
        return ScopeWrite(pid, rtype, rows, replace=not created)

    def write(self, conn: Connection, writes: Sequence[ScopeWrite]) -> None:
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

    @functools.cache  # noqa: B019  (one index per process; few types and row counts)
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


_DELETE_SCOPES = delete(access_scope).where(
    access_scope.c.pid == bindparam("scope_pid"), access_scope.c.kind != int(ScopeKind.OWNER)
)
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


def _scope_from_select(sel: Any) -> Any:
    return insert(access_scope).from_select(["pid", "kind", "ref_type", "ref_id"], sel)
