"""The repository: the one place that opens database transactions and writes resources.

Versioning follows http://hl7.org/fhir/R4/http.html#versioning: every write makes a new
``meta.versionId`` (1, 2, …) and ``meta.lastUpdated``; every version is kept in
``resource_history``. Concurrent writers of one resource are serialized by a row lock
(``SELECT … FOR UPDATE`` on PostgreSQL, the database write lock on SQLite) and each write is
conditioned on the version it read, so no update is ever lost silently.

Work happens in a :class:`Tx` (one database transaction) obtained from :meth:`Repository.unit`;
transaction Bundles run every entry in a single ``Tx``. The ``Tx`` is the unit of work: it
coordinates each write (validate, hooks, access checks, the dialect's
:class:`~fhir_server.storage.writers.ResourceWriter`, the search index rows of
:mod:`.indexer` and the access rows of the injected policy's indexer, deferred checks, commit
events) and holds back rows while batching (:mod:`.held_writes`). The access policy is given
as :class:`~fhir_server.storage.access.AccessRules`; the repository never imports it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.exc import OperationalError

from fhir_server.auth.scopes import Permission
from fhir_server.fhir.outcome import FhirError, gone, not_found
from fhir_server.hooks import HookEvent, HookPoint, Hooks
from fhir_server.storage import indexer, search_exec, searching
from fhir_server.storage.access import AccessRules
from fhir_server.storage.engine import (
    AUTOCOMMIT_OPTION,
    WRITE_OPTION,
    build_engine,
    fetch_on_its_own,
    fetch_rows,
    fetch_unprepared,
)
from fhir_server.storage.held_writes import HeldRows, HeldWrites
from fhir_server.storage.records import (
    CURRENT_COLUMNS,
    HISTORY_COLUMNS,
    ID_PATTERN,
    StoredResource,
    as_utc,
    check_id,
    check_version,
    format_instant,
    new_id,
    stored_from_row,
    utc_now,
)
from fhir_server.storage.schema import binary_content, resource, resource_history
from fhir_server.storage.writers import ConcurrentCreate, writer_for

if TYPE_CHECKING:
    from sqlalchemy.sql import Executable

    from fhir_server.search.query import SearchQuery
    from fhir_server.search.registry import SearchRegistry

__all__ = [
    "ID_PATTERN",
    "ConcurrentCreate",
    "Repository",
    "StoredResource",
    "Tx",
    "as_utc",
    "check_id",
    "check_version",
    "format_instant",
    "new_id",
    "utc_now",
]


Validator = Callable[[dict[str, Any]], None]


class Repository:
    """Entry point to the store: hands out units of work and carries what they share."""

    def __init__(
        self,
        engine: Engine,
        *,
        registry: SearchRegistry,
        hooks: Hooks | None = None,
        validator: Validator | None = None,
        policy: AccessRules | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.hooks = hooks or Hooks()
        self.validator = validator
        self.policy = policy
        self.postgres = engine.dialect.name == "postgresql"
        self.writer = writer_for(engine.dialect.name, registry)
        self._generic: Engine | None = None
        self._generic_lock = threading.Lock()

    def generic_plan_fetch(
        self, statement: Executable, values: dict[str, Any] | None
    ) -> Sequence[Sequence[Any]]:
        """PostgreSQL: the rows of ``statement`` with ``values``, run in autocommit on a
        connection whose statements are planned once per connection for any values (a pool of
        its own, opened on first use). Only for statements with one good plan whatever their
        values: see ``search.compile.index_driven_criterion``.

        A statement of a search shape (``values`` given, see ``search.shapes``) goes to the
        DB-API cursor as SQL compiled once (``driver_params``): on the page of an identifier
        search SQLAlchemy's per-execution work (parameter and result processing, a Connection
        around the pooled one) had cost more CPU than the query itself. A statement carrying
        its own values (``None``: a later page) is compiled each time, expanding lists and all.
        """
        generic = self._generic
        if generic is None:
            with self._generic_lock:
                if self._generic is None:
                    self._generic = build_engine(
                        self.engine.url.render_as_string(hide_password=False),
                        pool_size=self.engine.pool.size(),  # type: ignore[attr-defined]
                        generic_plans=True,
                    )
                generic = self._generic
        if values is None:
            with generic.connect() as conn:
                conn.execution_options(**{AUTOCOMMIT_OPTION: True})
                return conn.execute(statement).all()
        return fetch_on_its_own(generic, statement, values)

    def dispose(self) -> None:
        """Close the pooled connections (application shutdown)."""
        self.engine.dispose()
        if self._generic is not None:
            self._generic.dispose()

    def search_access_filter(self, caller: Any) -> Any:
        """The access condition searches apply for ``caller`` (``None``: no restriction)."""
        return self.policy.search_filter(caller) if self.policy is not None else None

    @contextmanager
    def unit(
        self, *, write: bool = False, caller: Any = None, snapshot: bool = True
    ) -> Iterator[Tx]:
        """Open one database transaction; commit when the block ends, roll back on error.

        ``after_commit`` hooks queued by the work run once the commit succeeded. A read that
        issues a single statement needs no snapshot: ``snapshot=False`` runs it in autocommit
        mode, saving the BEGIN and COMMIT round trips on the hottest path.
        """
        if not write and not snapshot:
            # Its connection is taken from the pool on first use: a search page served by the
            # generic-plan pool (generic_plan_fetch) needs none.
            tx = Tx(self, None, caller=caller)
            try:
                yield tx
                tx.run_deferred()
            finally:
                tx.release()
        else:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(**{WRITE_OPTION: True})
                tx = Tx(self, conn, caller=caller)
                with conn.begin():
                    yield tx
                    tx.run_deferred()
        for event in tx.committed_events:
            self.hooks.fire(event)

    def write(self, work: Callable[[Tx], Any], *, caller: Any = None, retries: int = 3) -> Any:
        """Run ``work`` in a write transaction, retrying on serialization failures and deadlocks."""
        for attempt in range(retries + 1):
            try:
                with self.unit(write=True, caller=caller) as tx:
                    return work(tx)
            except OperationalError as exc:
                if attempt == retries or not _is_retryable(exc):
                    raise
            except ConcurrentCreate as exc:
                if attempt == retries:
                    raise FhirError(409, "conflict", str(exc), code="MSO-REST-409") from exc
        raise AssertionError("unreachable")

    def read_only(
        self, work: Callable[[Tx], Any], *, caller: Any = None, snapshot: bool = True
    ) -> Any:
        """Run ``work`` in a read transaction (``snapshot=False``: autocommit, one statement)."""
        with self.unit(write=False, caller=caller, snapshot=snapshot) as tx:
            return work(tx)


def _is_retryable(exc: OperationalError) -> bool:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return sqlstate in {"40001", "40P01"} or "database is locked" in str(exc)


class Tx:
    """A unit of work in one database transaction. Not thread-safe; used by one request."""

    def __init__(self, repo: Repository, conn: Connection | None, *, caller: Any = None) -> None:
        self.repo = repo
        self._conn = conn  # None: an autocommit read unit, connected on first use
        self.caller = caller
        self.committed_events: list[HookEvent] = []
        self.error_context: Callable[[FhirError], FhirError] | None = None
        self.unit_state: dict[str, Any] = {}  # what hooks gather over the unit (see defer)
        self._deferred: deque[tuple[Callable[[], None], Callable[[FhirError], FhirError] | None]]
        self._deferred = deque()
        self._at_commit: dict[str, Callable[[], None]] = {}
        self._lazy = conn is None  # the unit's connection is this Tx's to open and release
        self._held = HeldWrites()

    @property
    def conn(self) -> Connection:
        """The unit's connection, with every write of the unit stored (an autocommit read unit
        takes it from the pool now). Whoever reads through it sees the index and access rows
        of the resources written so far, those :meth:`batched_writes` held back included."""
        if self._held.holds_anything:
            self.flush_writes()
        return self._connection()

    @property
    def _db(self) -> Connection:
        """The connection with every resource row of the unit stored: for statements that read
        or write only resource rows (the index and access rows may still be held back)."""
        if self._held.holds_versions:
            self._flush_versions()
        return self._connection()

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is None:
            conn = self._conn = self.repo.engine.connect()
            conn.execution_options(**{AUTOCOMMIT_OPTION: True})
        return conn

    @contextmanager
    def batched_writes(self, expected: int = 0) -> Iterator[None]:
        """Hold back the rows of the resources written in the block (about ``expected`` of
        them), and store them together: when anything reads through :attr:`conn` (a search,
        an access check, a hook) or :attr:`_db`, and at the end of the block.

        For transaction Bundles: their entries' rows go to the database in a few statements
        instead of two or three per entry. On PostgreSQL a first version's pid is drawn from the
        sequence beforehand; a resource created concurrently under the same id is found when
        the rows are stored, and the unit is run again (:class:`ConcurrentCreate`), as a lost
        race of a single create-on-update would be. A new version of an existing resource is
        held back too: its row is locked since it was read (``FOR UPDATE``), so no other writer
        can move it meanwhile.
        """
        held = self._held
        held.active, held.expected = True, expected
        try:
            yield
        finally:
            held.active = False
        self.flush_writes()

    def flush_writes(self) -> None:
        """Store the resource rows, the index rows, then the access rows held back."""
        if self._held.holds_versions:
            self._flush_versions()
        held = self._held.take_rows()
        if not held:
            return
        conn = self._connection()
        indexer.write_rows(conn, [h.index for h in held if h.index is not None])
        policy = self.repo.policy
        if policy is not None:
            policy.index.write(conn, [h.scopes for h in held if h.scopes is not None])

    def _flush_versions(self) -> None:
        """Store the resource rows held back (PostgreSQL): first versions in one statement,
        later versions in another (see the writer)."""
        versions, moves = self._held.take_versions()
        conn = self._connection()
        writer = self.repo.writer
        if versions:
            writer.insert_versions(conn, versions)
        if moves:
            writer.move_versions(conn, moves)

    @property
    def _holding_versions(self) -> bool:
        """True when this write's resource rows are to be held back (a batch on PostgreSQL)."""
        return self._held.active and self.repo.writer.holds_versions

    def prefetch_current(self, keys: Sequence[tuple[str, str]]) -> int:
        """Read and lock the current rows of the resources ``(type, id)`` a transaction is about
        to update, in one statement per type; :meth:`current` ``for_update`` takes them from
        here. Rows are locked in id order, as concurrent transactions lock them too. Returns
        how many of them do not exist (the unit will create them).

        A resource absent now may still be created by another writer before this unit stores
        its own: that is found when it does (see :meth:`update` and :class:`ConcurrentCreate`).
        """
        absent = 0
        by_type: dict[str, set[str]] = {}
        for res_type, res_id in keys:
            by_type.setdefault(res_type, set()).add(res_id)
        for res_type, ids in by_type.items():
            values = {"c_type": res_type, "c_ids": sorted(ids)}
            if self.repo.postgres:
                rows = fetch_rows(self._db, _CURRENT_MANY_FOR_UPDATE, values, prepare=False)
            else:
                rows = self._db.execute(_CURRENT_MANY_FOR_UPDATE, values).all()
            found = {row.res_id: stored_from_row(row) for row in rows}
            for res_id in ids:
                self._held.prefetched[(res_type, res_id)] = found.get(res_id)
            absent += len(ids) - len(found)
        return absent

    @property
    def autocommit(self) -> bool:
        """True for an autocommit read unit (``Repository.unit(snapshot=False)``): each
        statement sees its own snapshot, and a search page may run on the generic-plan pool."""
        return self._lazy

    def release(self) -> None:
        """Return a connection taken on first use to the pool (autocommit: nothing to end)."""
        if self._conn is not None and self._lazy:
            self._conn.close()
            self._conn = None

    # -- checks at the end of the unit ------------------------------------------------------

    def defer(self, check: Callable[[], None]) -> None:
        """Run ``check`` once the unit's work is done, before it commits.

        For rules that span resources written together (a case document needs its case and its
        Binary): a transaction Bundle may hold them in any order, so they are checked when
        all of its entries are written. A :class:`FhirError` from ``check`` rolls the unit
        back; it is reported through the :attr:`error_context` current when it was deferred
        (the transaction names the entry that way).
        """
        self._deferred.append((check, self.error_context))

    def at_commit(self, key: str, work: Callable[[], None]) -> None:
        """Run ``work`` once, after the unit's deferred checks and every write they made, just
        before it commits (a second call with the same ``key`` is ignored): for bookkeeping
        that must see all of the unit's writes at once (the change feed)."""
        self._at_commit.setdefault(key, work)

    def run_deferred(self) -> None:
        """Run the deferred checks in order (checks may defer more), store what is still
        held back, then the :meth:`at_commit` work: the unit is about to commit."""
        while self._deferred:
            check, context = self._deferred.popleft()
            try:
                check()
            except FhirError as exc:
                if context is None:
                    raise
                raise context(exc) from exc
        self.flush_writes()
        while self._at_commit:
            self._at_commit.pop(next(iter(self._at_commit)))()

    # -- reads ------------------------------------------------------------------------------

    def current(
        self, res_type: str, res_id: str, *, for_update: bool = False
    ) -> StoredResource | None:
        """The current row of a resource (deleted or not), or ``None`` if it never existed."""
        if for_update and self._held.prefetched:
            key = (res_type, res_id)
            if key in self._held.prefetched:
                return self._held.prefetched.pop(key)
        values = {"c_type": res_type, "c_id": res_id}
        if for_update and self.repo.postgres:
            # a write's lookup, planned afresh each time (see fetch_unprepared)
            row = fetch_unprepared(self._db, _CURRENT_FOR_UPDATE, values)
        else:
            row = self._db.execute(_CURRENT, values).first()
        return stored_from_row(row) if row else None

    def read(self, res_type: str, res_id: str) -> StoredResource:
        """The current version; 404 if unknown (or not visible to the caller), 410 if deleted."""
        self._require(res_type, Permission.READ)
        self._fire_read(res_type, res_id)
        found = self.current(res_type, res_id)
        if found is None or not self.visible(found):
            raise not_found(res_type, res_id)
        if found.deleted:
            raise gone(res_type, res_id, found.version)
        return found

    def vread(self, res_type: str, res_id: str, version: int) -> StoredResource:
        """One version; 404 if that version does not exist, 410 if it is a deletion."""
        self._require(res_type, Permission.READ)
        self._fire_read(res_type, res_id)
        stmt = (
            select(*HISTORY_COLUMNS)
            .select_from(resource_history.join(resource, resource.c.pid == resource_history.c.pid))
            .where(
                resource.c.res_type == res_type,
                resource.c.res_id == res_id,
                resource_history.c.version == version,
            )
        )
        row = self._db.execute(stmt).first()
        if row is None:
            raise FhirError(
                404,
                "not-found",
                f"Version {version} of {res_type}/{res_id} is not known",
                code="MSO-REST-405",
            )
        found = stored_from_row(row)
        if not self.visible(found):
            raise not_found(res_type, res_id)
        if found.deleted:
            raise gone(res_type, res_id, version)
        return found

    def load(self, pids: list[int]) -> list[StoredResource]:
        """Current, non-deleted resources by pid, in the order of ``pids``."""
        if not pids:
            return []
        rows = self._db.execute(
            select(*CURRENT_COLUMNS).where(resource.c.pid.in_(pids), resource.c.deleted.is_(False))
        ).all()
        by_pid = {row.pid: stored_from_row(row) for row in rows}
        return [by_pid[p] for p in pids if p in by_pid]

    def find(
        self, res_type: str, params: list[tuple[str, str]], *, limit: int | None = None
    ) -> list[StoredResource]:
        """Current resources matching search criteria (for conditional interactions).

        Criteria are applied strictly: an unknown parameter is a 400, never silently ignored,
        since ignoring one would widen a conditional update or delete.
        """
        if not params:
            raise FhirError(
                412,
                "invalid",
                "Conditional interaction without search criteria",
                code="MSO-REST-412",
            )
        self.fire_search(res_type, params)
        pids = search_exec.find_pids(
            self.conn,
            self.repo.registry,
            res_type,
            params,
            limit=limit,
            access_filter=self.repo.search_access_filter(self.caller),
        )
        return self.load(pids)

    def search(
        self,
        types: str | Sequence[str],
        params: Sequence[tuple[str, str]] | SearchQuery = (),
        *,
        count: int | None = None,
        cursor: str | None = None,
        strict: bool = False,
        where: Sequence[searching.Condition] = (),
        compartment: tuple[str, str] | None = None,
        base_url: str | None = None,
        include_limit: int = searching.INCLUDE_LIMIT,
        check: bool = True,
    ) -> searching.SearchPage:
        """One page of ``types`` resources matching ``params`` as the caller may see them, with
        their includes, total and paging cursors: see :func:`.searching.search`."""
        return searching.search(
            self, types, params, count=count, cursor=cursor, strict=strict, where=where,
            compartment=compartment, base_url=base_url, include_limit=include_limit, check=check,
        )  # fmt: skip

    def iter_search(
        self,
        types: str | Sequence[str],
        params: Sequence[tuple[str, str]] | SearchQuery = (),
        *,
        batch: int = 1000,
        max_bytes: int | None = None,
        where: Sequence[searching.Condition] = (),
        compartment: tuple[str, str | Sequence[str] | None] | None = None,
        base_url: str | None = None,
        check: bool = True,
    ) -> Iterator[StoredResource]:
        """Every match the caller may see, in pid order, fetched ``batch`` at a time and at
        most ``max_bytes`` of content at once (bulk export): see
        :func:`.searching.iter_search`."""
        return searching.iter_search(
            self, types, params, batch=batch, max_bytes=max_bytes, where=where,
            compartment=compartment, base_url=base_url, check=check,
        )  # fmt: skip

    def lock_criteria(self, res_type: str, params: list[tuple[str, str]]) -> None:
        """Serialize conditional creates/updates on the same criteria (PostgreSQL advisory lock).

        Without it two concurrent ``If-None-Exist`` creates could both see no match and both
        create. SQLite needs nothing: its write transactions are already serialized.
        """
        if self.repo.postgres:
            key = res_type + "?" + "&".join(f"{k}={v}" for k, v in sorted(params))
            self._db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})

    # -- writes -----------------------------------------------------------------------------

    def create(
        self, body: dict[str, Any], *, res_id: str | None = None, method: str = "POST"
    ) -> StoredResource:
        """Store a new resource with a server id (or ``res_id`` for create-on-update)."""
        res_type = body["resourceType"]
        self._require(res_type, Permission.CREATE)
        self._validate(body)
        self._fire(HookPoint.BEFORE_CREATE, res_type, res_id, body)
        res_id = res_id or new_id()
        now = utc_now()
        content = _stamp(body, res_id, 1, now)
        values = {
            "res_type": res_type,
            "res_id": res_id,
            "version": 1,
            "last_updated": now,
            "deleted": False,
            "content": content,
        }
        writer = self.repo.writer
        index_stored = False
        if self._holding_versions:
            pid = self._held.hold_first(
                values, method, lambda count: writer.draw_pids(self._connection(), count)
            )
        else:
            found = writer.insert_first(self._db, values, method, body)
            if found is None:
                raise _IdTaken()
            pid, index_stored = found, writer.chains_index
        stored = StoredResource(pid, res_type, res_id, 1, now, False, content, method, body)
        self._after_write(
            stored, method, HookPoint.AFTER_CREATE, previous=None, index_stored=index_stored
        )
        return stored

    def update(
        self,
        res_type: str,
        res_id: str,
        body: dict[str, Any],
        *,
        if_match: int | None = None,
        method: str = "PUT",
    ) -> tuple[StoredResource, bool]:
        """Replace a resource (or create it with this id). Returns ``(stored, created)``."""
        check_id(res_id)
        for _ in range(3):
            current = self.current(res_type, res_id, for_update=True)
            if current is None:
                if if_match is not None:
                    raise not_found(res_type, res_id)
                try:
                    return self.create(body, res_id=res_id, method="PUT"), True
                except _IdTaken:
                    continue
            return self._update_existing(current, body, if_match=if_match, method=method)
        raise FhirError(
            409,
            "conflict",
            f"{res_type}/{res_id} is being created concurrently",
            code="MSO-REST-409",
        )

    def _update_existing(
        self, current: StoredResource, body: dict[str, Any], *, if_match: int | None, method: str
    ) -> tuple[StoredResource, bool]:
        check_version(current, if_match)
        self._require(current.res_type, Permission.UPDATE)
        self._require_visible(current, Permission.UPDATE, after=False)
        previous = None if current.deleted else current.resource
        self._validate(body)
        point = HookPoint.BEFORE_UPDATE if previous is not None else HookPoint.BEFORE_CREATE
        self._fire(point, current.res_type, current.res_id, body, previous=previous)
        version = current.version + 1
        now = max(utc_now(), current.last_updated)
        content = _stamp(body, current.res_id, version, now)
        index_stored = self._bump(current, version, now, content, method, body)
        stored = StoredResource(
            current.pid,
            current.res_type,
            current.res_id,
            version,
            now,
            False,
            content,
            method,
            body,
        )
        after = HookPoint.AFTER_UPDATE if previous is not None else HookPoint.AFTER_CREATE
        self._after_write(stored, method, after, previous=previous, index_stored=index_stored)
        return stored, previous is None

    def delete(
        self, res_type: str, res_id: str, *, if_match: int | None = None
    ) -> StoredResource | None:
        """Soft-delete: a new version marked deleted, index rows dropped.

        Returns the deletion version, or ``None`` when there was nothing to delete (unknown or
        already deleted: delete is idempotent).
        """
        current = self.current(res_type, res_id, for_update=True)
        if current is None:
            if if_match is not None:
                raise not_found(res_type, res_id)
            return None
        self._require(res_type, Permission.DELETE)
        self._require_visible(current, Permission.DELETE, after=False)
        if current.deleted:
            check_version(current, if_match)
            return None
        check_version(current, if_match)
        previous = current.resource
        self._fire(HookPoint.BEFORE_DELETE, res_type, res_id, None, previous=previous)
        version = current.version + 1
        now = max(utc_now(), current.last_updated)
        stored = StoredResource(current.pid, res_type, res_id, version, now, True, None, "DELETE")
        if not self._bump(current, version, now, None, "DELETE", None):
            indexer.write_index(self.conn, self.repo.registry, stored.pid, res_type, None)
        self._fire(HookPoint.AFTER_DELETE, res_type, res_id, None, previous=previous)
        self._queue_commit_event(res_type, res_id, None, previous)
        return stored

    def attach_blob(
        self, stored: StoredResource, *, sha256: str, size: int, content_type: str
    ) -> None:
        """Record that a Binary version's content lives in the blob store."""
        self._db.execute(
            insert(binary_content).values(
                pid=stored.pid,
                version=stored.version,
                sha256=sha256,
                size=size,
                content_type=content_type,
            )
        )

    def blob_of(self, stored: StoredResource) -> Any:
        """The blob row (sha256, size, content_type) of a Binary version, or ``None`` if inline."""
        return self._db.execute(
            select(
                binary_content.c.sha256, binary_content.c.size, binary_content.c.content_type
            ).where(binary_content.c.pid == stored.pid, binary_content.c.version == stored.version)
        ).first()

    # -- history ----------------------------------------------------------------------------

    def history(
        self,
        *,
        res_type: str | None = None,
        res_id: str | None = None,
        since: datetime | None = None,
        at: datetime | None = None,
        before: tuple[datetime, int, int] | None = None,
        snapshot: datetime | None = None,
        limit: int,
    ) -> list[StoredResource]:
        """Versions newest first, paged by keyset.

        ``before`` is the (last_updated, pid, version) of the last entry of the previous page;
        ``snapshot`` caps the listing at the instant the first page was made, so that versions
        written while a client pages do not shift or duplicate entries.
        """
        h = resource_history.c
        if res_type:
            self._require(res_type, Permission.READ if res_id else Permission.SEARCH)
        conditions = _history_filter(res_type, res_id, since, snapshot)
        access = self.history_filter()
        if access is not None:
            conditions.append(access)
        if at is not None:
            # _at: per resource, the version current at that instant (the newest not after it).
            newer = resource_history.alias("newer")
            conditions.append(h.last_updated <= at)
            conditions.append(
                ~select(newer.c.pid)
                .where(
                    newer.c.pid == h.pid, newer.c.version > h.version, newer.c.last_updated <= at
                )
                .exists()
            )
        if before is not None:
            lu, pid, version = before
            conditions.append(
                or_(
                    h.last_updated < lu,
                    and_(h.last_updated == lu, h.pid < pid),
                    and_(h.last_updated == lu, h.pid == pid, h.version < version),
                )
            )
        stmt = (
            select(*HISTORY_COLUMNS)
            .where(*conditions)
            .order_by(h.last_updated.desc(), h.pid.desc(), h.version.desc())
            .limit(limit)
        )
        return [stored_from_row(row) for row in self.conn.execute(stmt)]

    def history_count(
        self,
        *,
        res_type: str | None = None,
        res_id: str | None = None,
        since: datetime | None = None,
        snapshot: datetime | None = None,
    ) -> int:
        """How many versions :meth:`history` would list over all pages."""
        stmt = select(func.count()).select_from(resource_history)
        stmt = stmt.where(*_history_filter(res_type, res_id, since, snapshot))
        access = self.history_filter()
        if access is not None:
            stmt = stmt.where(access)
        return int(self.conn.execute(stmt).scalar_one())

    def exists_any(self, res_type: str, res_id: str) -> bool:
        """True if the resource ever existed (deleted or not) and the caller may see it."""
        found = self.current(res_type, res_id)
        return found is not None and self.visible(found)

    # -- access policy ----------------------------------------------------------------------

    @contextmanager
    def internal(self) -> Iterator[Tx]:
        """Work done by the server itself (a Provenance, a case number …) inside a caller's
        transaction: not subject to the caller's scopes and access rules."""
        saved, self.caller = self.caller, None
        try:
            yield self
        finally:
            self.caller = saved

    def visible(self, stored: StoredResource, permission: Permission = Permission.READ) -> bool:
        """True when the caller may see ``stored`` (always for internal work)."""
        policy = self.repo.policy
        if policy is None or self.caller is None:
            return True
        return policy.can_see(self.conn, self.caller, stored, permission)

    def history_filter(self) -> Any:
        """SQL condition on ``resource_history`` rows: their resource is visible to the caller."""
        access = self.repo.search_access_filter(self.caller)
        if access is None:
            return None
        r = resource.alias("hr")
        return resource_history.c.pid.in_(select(r.c.pid).where(access(r)))

    def _require(self, res_type: str, permission: Permission) -> None:
        if self.repo.policy is not None and self.caller is not None:
            self.repo.policy.require(self.caller, res_type, permission)

    def _require_visible(
        self, stored: StoredResource, permission: Permission, *, after: bool
    ) -> None:
        if self.repo.policy is not None and self.caller is not None:
            self.repo.policy.require_visible(self, stored, permission, after=after)

    def _check_reach(self, stored: StoredResource, permission: Permission, caller: Any) -> None:
        """403 unless ``caller`` (who wrote ``stored``) may still see it."""
        saved, self.caller = self.caller, caller
        try:
            self._require_visible(stored, permission, after=True)
        finally:
            self.caller = saved

    # -- internals --------------------------------------------------------------------------

    def _validate(self, body: dict[str, Any]) -> None:
        if self.repo.validator is not None:
            self.repo.validator(body)

    def _after_write(
        self,
        stored: StoredResource,
        method: str,
        point: HookPoint,
        *,
        previous: dict[str, Any] | None,
        index_stored: bool = False,
    ) -> None:
        """After the resource row: its index and access rows (held back while batching), the
        case projection, the reach check at the end of the unit, hooks and commit events."""
        policy = self.repo.policy
        scopes = None
        if policy is not None:
            scopes = policy.index.rows_for(self, stored, created=stored.version == 1)
        index = None
        if not index_stored:
            index = indexer.index_write(self.repo.registry, stored.pid, stored.resource)
        if index is not None or scopes is not None:
            self._held.rows.append(HeldRows(index, scopes))
        if not self._held.active:
            self.flush_writes()
        if policy is not None:
            policy.index.after_write(self, stored)
            permission = Permission.UPDATE if previous is not None else Permission.CREATE
            if self.caller is not None:
                # judged on the unit's final state: a transaction may write the case that
                # brings this resource within the caller's reach after it
                self.defer(partial(self._check_reach, stored, permission, self.caller))
        self._fire(point, stored.res_type, stored.res_id, stored.resource, previous=previous)
        self._queue_commit_event(stored.res_type, stored.res_id, stored.resource, previous)

    def _bump(
        self,
        current: StoredResource,
        version: int,
        now: datetime,
        content: bytes | None,
        method: str,
        body: dict[str, Any] | None,
    ) -> bool:
        """Move the row to ``version`` (``None``: deleted) and record the version in the history;
        409 if another writer did first. Returns whether the writer also replaced the index
        rows by those of ``body`` (dropped them for a deletion)."""
        self._held.prefetched.pop((current.res_type, current.res_id), None)  # now stale
        values = {
            "b_pid": current.pid,
            "b_version": current.version,
            "version": version,
            "last_updated": now,
            "deleted": content is None,
            "content": content,
        }
        if self._holding_versions:
            self._held.hold_move(values, method)
            return False
        writer = self.repo.writer
        if not writer.move(self._db, current, values, method, body):
            raise FhirError(
                409,
                "conflict",
                f"{current.reference} was changed by another request; retry with its new version",
                code="MSO-REST-409",
            )
        return writer.chains_index

    def _fire(
        self,
        point: HookPoint,
        res_type: str,
        res_id: str | None,
        body: dict[str, Any] | None,
        *,
        previous: dict[str, Any] | None = None,
    ) -> None:
        hooks = self.repo.hooks
        if hooks.has(point):
            hooks.fire(HookEvent(point, res_type, res_id, body, previous, self, self.caller))

    def _fire_read(self, res_type: str, res_id: str) -> None:
        self._fire(HookPoint.BEFORE_READ, res_type, res_id, None)

    def fire_search(self, res_type: str, params: list[tuple[str, str]]) -> None:
        """Check the caller may search ``res_type`` ('' for several types), run the hooks."""
        if res_type:
            self._require(res_type, Permission.SEARCH)
        hooks = self.repo.hooks
        if hooks.has(HookPoint.BEFORE_SEARCH):
            hooks.fire(
                HookEvent(
                    HookPoint.BEFORE_SEARCH, res_type, tx=self, caller=self.caller, params=params
                )
            )

    def _queue_commit_event(
        self,
        res_type: str,
        res_id: str,
        body: dict[str, Any] | None,
        previous: dict[str, Any] | None,
    ) -> None:
        if self.repo.hooks.has(HookPoint.AFTER_COMMIT):
            self.committed_events.append(
                HookEvent(
                    HookPoint.AFTER_COMMIT, res_type, res_id, body, previous, None, self.caller
                )
            )


def _history_filter(
    res_type: str | None, res_id: str | None, since: datetime | None, snapshot: datetime | None
) -> list[Any]:
    """The WHERE conditions selecting a history listing (all optional)."""
    h = resource_history.c
    conditions: list[Any] = []
    if res_type is not None:
        conditions.append(h.res_type == res_type)
    if res_id is not None:
        conditions.append(h.res_id == res_id)
    if since is not None:
        conditions.append(h.last_updated >= since)
    if snapshot is not None:
        conditions.append(h.last_updated <= snapshot)
    return conditions


class _IdTaken(Exception):
    """A create-on-update lost the race for its id."""


def _stamp(body: dict[str, Any], res_id: str, version: int, now: datetime) -> bytes:
    """Set id and meta.versionId/lastUpdated on ``body`` and serialize it."""
    body["id"] = res_id
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = format_instant(now)
    body["meta"] = meta
    return orjson.dumps(body)


# Statements built once: executing a constant statement hits SQLAlchemy's compiled cache
# without rebuilding and hashing a new statement object on every read.
_CURRENT = select(*CURRENT_COLUMNS).where(
    resource.c.res_type == bindparam("c_type"), resource.c.res_id == bindparam("c_id")
)
_CURRENT_FOR_UPDATE = _CURRENT.with_for_update()
_CURRENT_MANY_FOR_UPDATE = (
    select(*CURRENT_COLUMNS)
    .where(
        resource.c.res_type == bindparam("c_type"),
        resource.c.res_id.in_(bindparam("c_ids", expanding=True)),
    )
    .order_by(resource.c.res_id)
    .with_for_update()
)
