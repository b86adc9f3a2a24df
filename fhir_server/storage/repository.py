"""The repository: the one place that opens database transactions and writes resources.

Versioning follows http://hl7.org/fhir/R4/http.html#versioning: every write makes a new
``meta.versionId`` (1, 2, …) and ``meta.lastUpdated``; every version is kept in
``resource_history``. Concurrent writers of one resource are serialized by a row lock
(``SELECT … FOR UPDATE`` on PostgreSQL, the database write lock on SQLite) and each write is
conditioned on the version it read, so no update is ever lost silently.

Work happens in a :class:`Tx` (one database transaction) obtained from :meth:`Repository.unit`;
transaction Bundles run every entry in a single ``Tx``.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError

from fhir_server.auth.scopes import Permission
from fhir_server.fhir.outcome import FhirError, gone, not_found
from fhir_server.hooks import HookEvent, HookPoint, Hooks
from fhir_server.storage import indexer, search_exec
from fhir_server.storage.engine import (
    AUTOCOMMIT_OPTION,
    WRITE_OPTION,
    build_engine,
    fetch_on_its_own,
    fetch_rows,
    fetch_unprepared,
)
from fhir_server.storage.schema import binary_content, resource, resource_history

if TYPE_CHECKING:
    from sqlalchemy.sql import Executable

    from fhir_server.auth.policy import AccessPolicy, ScopeWrite
    from fhir_server.search.extract import RowsByTable
    from fhir_server.search.registry import SearchRegistry

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def utc_now() -> datetime:
    """Now in UTC, truncated to milliseconds (what ``meta.lastUpdated`` shows is what is stored)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC (a naive datetime, as SQLite returns them, is taken as UTC)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def format_instant(value: datetime) -> str:
    """Render a datetime as a FHIR instant with milliseconds, e.g. ``2026-01-02T03:04:05.678Z``."""
    v = as_utc(value)  # formatted by hand: strftime is a hot spot on every request
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        f".{v.microsecond // 1000:03d}Z"
    )


def new_id() -> str:
    """A server-assigned logical id."""
    return str(uuid.uuid4())


def check_id(resource_id: str) -> None:
    """Refuse ids that are not valid FHIR ids (``[A-Za-z0-9\\-.]{1,64}``)."""
    if not ID_PATTERN.match(resource_id):
        raise FhirError(
            400,
            "value",
            f"'{resource_id}' is not a valid FHIR id",
            code="MSO-REST-002",
            expression=["id"],
        )


@dataclass(slots=True)
class StoredResource:
    """One stored version of a resource; ``content`` is its JSON (``None`` when deleted)."""

    pid: int
    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    deleted: bool
    content: bytes | None
    method: str | None = None
    _parsed: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def resource(self) -> dict[str, Any]:
        """The resource as a dict (parsed once, on first use)."""
        if self._parsed is None:
            if self.content is None:
                raise gone(self.res_type, self.res_id, self.version)
            self._parsed = orjson.loads(self.content)
        return self._parsed

    @property
    def etag(self) -> str:
        """The weak ETag of this version."""
        return f'W/"{self.version}"'

    @property
    def reference(self) -> str:
        """``Type/id``."""
        return f"{self.res_type}/{self.res_id}"


_CURRENT_COLUMNS = (
    resource.c.pid,
    resource.c.res_type,
    resource.c.res_id,
    resource.c.version,
    resource.c.last_updated,
    resource.c.deleted,
    resource.c.content,
)
_HISTORY_COLUMNS = (
    resource_history.c.pid,
    resource_history.c.res_type,
    resource_history.c.res_id,
    resource_history.c.version,
    resource_history.c.last_updated,
    resource_history.c.deleted,
    resource_history.c.content,
    resource_history.c.method,
)


def _stored(row: Any) -> StoredResource:
    return StoredResource(
        pid=row.pid,
        res_type=row.res_type,
        res_id=row.res_id,
        version=row.version,
        last_updated=as_utc(row.last_updated),
        deleted=row.deleted,
        content=bytes(row.content) if row.content is not None else None,
        method=getattr(row, "method", None),
    )


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
        policy: AccessPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.hooks = hooks or Hooks()
        self.validator = validator
        self.policy = policy
        self.postgres = engine.dialect.name == "postgresql"
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
        self._lazy = conn is None  # the unit's connection is this Tx's to open and release
        self._pending: list[_PendingWrite] = []  # index and access rows not yet stored
        self._versions: list[dict[str, Any]] = []  # first versions not yet stored
        self._moves: list[dict[str, Any]] = []  # later versions not yet stored
        self._pids: deque[int] = deque()  # pids drawn for first versions held back
        self._batching = False
        self._expected = 0
        self._prefetched: dict[tuple[str, str], StoredResource | None] = {}

    @property
    def conn(self) -> Connection:
        """The unit's connection, with every write of the unit stored (an autocommit read unit
        takes it from the pool now). Whoever reads through it sees the index and access rows
        of the resources written so far, those :meth:`batched_writes` held back included."""
        if self._pending or self._versions or self._moves:
            self.flush_writes()
        return self._connection()

    @property
    def _db(self) -> Connection:
        """The connection with every resource row of the unit stored: for statements that read
        or write only resource rows (the index and access rows may still be held back)."""
        if self._versions or self._moves:
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
        sequence beforehand (:meth:`_next_pid`); a resource created concurrently under the
        same id is found when the rows are stored, and the unit is run again
        (:class:`ConcurrentCreate`), as a lost race of a single create-on-update would be. A
        new version of an existing resource is held back too: its row is locked since it was
        read (``FOR UPDATE``), so no other writer can move it meanwhile.
        """
        self._batching, self._expected = True, expected
        try:
            yield
        finally:
            self._batching = False
        self.flush_writes()

    def flush_writes(self) -> None:
        """Store the resource rows, the index rows, then the access rows held back."""
        if self._versions or self._moves:
            self._flush_versions()
        pending, self._pending = self._pending, []
        if not pending:
            return
        conn = self._connection()
        indexer.write_rows(conn, [p.index for p in pending if p.index is not None])
        policy = self.repo.policy
        if policy is not None:
            policy.write_scopes(conn, [p.scopes for p in pending if p.scopes is not None])

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
            found = {row.res_id: _stored(row) for row in rows}
            for res_id in ids:
                self._prefetched[(res_type, res_id)] = found.get(res_id)
            absent += len(ids) - len(found)
        return absent

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

    def run_deferred(self) -> None:
        """Run the deferred checks in order (checks may defer more), then store what is still
        held back: the unit is about to commit."""
        while self._deferred:
            check, context = self._deferred.popleft()
            try:
                check()
            except FhirError as exc:
                if context is None:
                    raise
                raise context(exc) from exc
        self.flush_writes()

    # -- reads ------------------------------------------------------------------------------

    def current(
        self, res_type: str, res_id: str, *, for_update: bool = False
    ) -> StoredResource | None:
        """The current row of a resource (deleted or not), or ``None`` if it never existed."""
        if for_update and self._prefetched:
            key = (res_type, res_id)
            if key in self._prefetched:
                return self._prefetched.pop(key)
        values = {"c_type": res_type, "c_id": res_id}
        if for_update and self.repo.postgres:
            # a write's lookup, planned afresh each time (see fetch_unprepared)
            row = fetch_unprepared(self._db, _CURRENT_FOR_UPDATE, values)
        else:
            row = self._db.execute(_CURRENT, values).first()
        return _stored(row) if row else None

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
            select(*_HISTORY_COLUMNS)
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
        found = _stored(row)
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
            select(*_CURRENT_COLUMNS).where(resource.c.pid.in_(pids), resource.c.deleted.is_(False))
        ).all()
        by_pid = {row.pid: _stored(row) for row in rows}
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
        index_stored = False
        if self._batching and self.repo.postgres:
            pid = self._next_pid()
            self._versions.append({**values, "pid": pid, "h_method": method})
        elif self.repo.postgres:
            # the resource row, its history row and its index rows in one statement
            found = self._insert_first_version_pg(values, method, body)
            if found is None:
                raise _IdTaken()
            pid, index_stored = found, True
        else:
            row = self._insert_first_version(values, method)
            if row is None:
                raise _IdTaken()
            pid = row.pid
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
            select(*_HISTORY_COLUMNS)
            .where(*conditions)
            .order_by(h.last_updated.desc(), h.pid.desc(), h.version.desc())
            .limit(limit)
        )
        return [_stored(row) for row in self.conn.execute(stmt)]

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
        policy = self.repo.policy
        scopes = None
        if policy is not None:
            scopes = policy.scope_write(self, stored, created=stored.version == 1)
        index = None
        if not index_stored:
            index = indexer.index_write(self.repo.registry, stored.pid, stored.resource)
        if index is not None or scopes is not None:
            self._pending.append(_PendingWrite(index, scopes))
        if not self._batching:
            self.flush_writes()
        if policy is not None:
            policy.index_case(self, stored)
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
        409 if another writer did first. On PostgreSQL one statement that also replaces the
        index rows by those of ``body`` (drops them for a deletion): returns whether it did."""
        self._prefetched.pop((current.res_type, current.res_id), None)  # now stale
        values = {
            "b_pid": current.pid,
            "b_version": current.version,
            "version": version,
            "last_updated": now,
            "deleted": content is None,
            "content": content,
        }
        if self._batching and self.repo.postgres:
            self._moves.append({**values, "h_method": method})
            return False
        if self.repo.postgres:
            rows = None if body is None else indexer.index_rows(self.repo.registry, body)
            params = [version, now, content is None, content, current.pid, current.version]
            done = (
                self._write_with_index(_PG_MOVE_ONE, "moved", [*params, method], rows) is not None
            )
        else:
            done = self._db.execute(_BUMP_RESOURCE, values).rowcount == 1
            if done:
                row = {"pid": current.pid, "res_type": current.res_type, "res_id": current.res_id}
                self._insert_history({**values, **row}, method)
        if not done:
            raise FhirError(
                409,
                "conflict",
                f"{current.reference} was changed by another request; retry with its new version",
                code="MSO-REST-409",
            )
        return self.repo.postgres

    def _next_pid(self) -> int:
        """PostgreSQL: a pid for a first version held back, drawn from the sequence with the
        others the unit expects to create (one round trip for a transaction Bundle)."""
        if not self._pids:
            count = max(self._expected, 16)
            self._expected = 0
            rows = self._connection().exec_driver_sql(_PG_DRAW_PIDS, (count,))
            self._pids.extend(pid for (pid,) in rows)
        return self._pids.popleft()

    def _flush_versions(self) -> None:
        """PostgreSQL: insert the first versions held back and their history rows in one
        statement, and move the resources with later versions in another; a unit that finds
        one of its new ids taken is run again."""
        versions, self._versions = self._versions, []
        moves, self._moves = self._moves, []
        conn = self._connection()
        if versions:
            columns = ("pid", "res_type", "res_id", "last_updated", "content", "h_method")
            arrays = tuple([v[c] for v in versions] for c in columns)
            if conn.exec_driver_sql(_PG_INSERT_VERSIONS, arrays).rowcount != len(versions):
                raise ConcurrentCreate("a resource of this unit was created meanwhile by another")
        if moves:
            columns = ("b_pid", "b_version", "version", "last_updated", "deleted", "content")
            arrays = tuple([m[c] for m in moves] for c in (*columns, "h_method"))
            if conn.exec_driver_sql(_PG_MOVE_VERSIONS, arrays).rowcount != len(moves):
                raise FhirError(
                    409,
                    "conflict",
                    "A resource of this transaction was changed by another request; retry",
                    code="MSO-REST-409",
                )

    def _insert_first_version_pg(
        self, values: dict[str, Any], method: str, body: dict[str, Any]
    ) -> int | None:
        """PostgreSQL: insert version 1, its history row and its index rows in one statement;
        the new pid, or ``None`` when a create-on-update (PUT) finds the id taken (then
        nothing is written).

        A concurrent create-on-update of the same id must not fail with a 500: whoever loses
        the race sees no row returned and the caller retries as an update.
        """
        rows = indexer.index_rows(self.repo.registry, body)
        params = [values[c] for c in ("res_type", "res_id", "last_updated", "content")]
        return self._write_with_index(
            _PG_INSERT_FIRST[method == "PUT"], "written", [*params, method], rows
        )

    def _write_with_index(
        self, write: str, source: str, params: list[Any], rows: RowsByTable | None
    ) -> int | None:
        """PostgreSQL: run ``write`` (the CTE ``source`` writing a resource row, and its history
        row) with the index writes chained after it; the pid written, or ``None``."""
        parts, index_params = indexer.rows_after(source, rows)
        sql = write + "".join(f", i{i} AS ({part})" for i, part in enumerate(parts))
        raw = self._db.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:
            cursor.execute(f"{sql} SELECT pid FROM {source}", [*params, *index_params])
            row = cursor.fetchone()
        return None if row is None else int(row[0])

    def _insert_first_version(self, values: dict[str, Any], method: str) -> Any:
        """SQLite: insert version 1 and its history row; the new row (``pid``), or ``None``
        when a create-on-update (PUT) finds the id taken (see :meth:`_insert_first_version_pg`).
        """
        unless_exists = method == "PUT"
        statement = _SQLITE_INSERT_UNLESS_EXISTS if unless_exists else _INSERT_RESOURCE
        row = self._db.execute(statement, values).first()
        if row is not None:
            self._insert_history({**values, "pid": row.pid}, method)
        return row

    def _insert_history(self, version: dict[str, Any], method: str) -> None:
        """SQLite: record a version (the row's columns in ``version``) in the history."""
        self._db.execute(
            _INSERT_HISTORY,
            {column: version[column] for column in ("pid", *_VERSION_COLUMNS)} | {"method": method},
        )

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


@dataclass(frozen=True)
class _PendingWrite:
    """The index and access rows of a write, held back by :meth:`Tx.batched_writes`."""

    index: indexer.IndexWrite | None  # None: stored with the resource row
    scopes: ScopeWrite | None


class ConcurrentCreate(Exception):
    """A unit found that an id it created (its rows held back) was taken by another writer in
    the meantime: :meth:`Repository.write` runs the unit again, where the write becomes an
    update of that resource."""


class _IdTaken(Exception):
    """A create-on-update lost the race for its id."""


def check_version(current: StoredResource, if_match: int | None) -> None:
    """412 when an ``If-Match`` version is given and is not the current one."""
    if if_match is not None and if_match != current.version:
        raise FhirError(
            412,
            "conflict",
            f"{current.reference} is at version {current.version}, not {if_match}",
            code="MSO-REST-412",
            headers={"ETag": current.etag},
        )


def _stamp(body: dict[str, Any], res_id: str, version: int, now: datetime) -> bytes:
    """Set id and meta.versionId/lastUpdated on ``body`` and serialize it."""
    body["id"] = res_id
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = format_instant(now)
    body["meta"] = meta
    return orjson.dumps(body)


# Statements built once: executing a constant statement hits SQLAlchemy's compiled cache
# without rebuilding and hashing a new statement object on every write (that cost about as
# much CPU as running it).
_CURRENT = select(*_CURRENT_COLUMNS).where(
    resource.c.res_type == bindparam("c_type"), resource.c.res_id == bindparam("c_id")
)
_CURRENT_FOR_UPDATE = _CURRENT.with_for_update()
_CURRENT_MANY_FOR_UPDATE = (
    select(*_CURRENT_COLUMNS)
    .where(
        resource.c.res_type == bindparam("c_type"),
        resource.c.res_id.in_(bindparam("c_ids", expanding=True)),
    )
    .order_by(resource.c.res_id)
    .with_for_update()
)
_INSERT_RESOURCE = insert(resource).returning(resource.c.pid)
_INSERT_HISTORY = insert(resource_history)
_BUMP_RESOURCE = (
    update(resource)
    .where(resource.c.pid == bindparam("b_pid"), resource.c.version == bindparam("b_version"))
    .values(
        version=bindparam("version"),
        last_updated=bindparam("last_updated"),
        deleted=bindparam("deleted"),
        content=bindparam("content"),
    )
)


_VERSION_COLUMNS = ("res_type", "res_id", "version", "last_updated", "deleted", "content")


def _pg_insert_first(unless_exists: bool) -> str:
    """PostgreSQL: the start of the statement inserting a first version (``ON CONFLICT DO
    NOTHING`` if ``unless_exists``) as the CTE ``written`` and its history row; the index rows
    are chained after it (``indexer.rows_after``)."""
    return (
        "WITH written AS (INSERT INTO resource (res_type, res_id, version, last_updated, deleted,"
        " content) VALUES (%s, %s, 1, %s, false, %s)"
        + (" ON CONFLICT DO NOTHING" if unless_exists else "")
        + " RETURNING pid, res_type, res_id, last_updated, content),"
        " history AS (INSERT INTO resource_history (pid, version, res_type, res_id, last_updated,"
        " deleted, content, method) SELECT pid, 1, res_type, res_id, last_updated, false,"
        " content, %s FROM written)"
    )


_PG_INSERT_FIRST = {unless: _pg_insert_first(unless) for unless in (False, True)}
# PostgreSQL: a later version (or a deletion) moves the row from the version it was read at, as
# the CTE ``moved``, and records the history row; the index writes are chained after it.
_PG_MOVE_ONE = (
    "WITH moved AS (UPDATE resource SET version = %s, last_updated = %s, deleted = %s,"
    " content = %s WHERE pid = %s AND version = %s"
    " RETURNING pid, res_type, res_id, version, last_updated, deleted, content),"
    " history AS (INSERT INTO resource_history (pid, version, res_type, res_id, last_updated,"
    " deleted, content, method) SELECT pid, version, res_type, res_id, last_updated, deleted,"
    " content, %s FROM moved)"
)
_PG_DRAW_PIDS = (
    "SELECT nextval(pg_get_serial_sequence('resource', 'pid')) FROM generate_series(1, %s)"
)
# First versions held back by a transaction (Tx.batched_writes), as one array per column: an
# id taken meanwhile inserts nothing (ON CONFLICT), which the row count tells.
_PG_INSERT_VERSIONS = (
    "WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::timestamptz[],"
    " %s::bytea[], %s::text[]) AS v(pid, res_type, res_id, last_updated, content, method)),"
    " written AS (INSERT INTO resource (pid, res_type, res_id, version, last_updated, deleted,"
    " content) SELECT pid, res_type, res_id, 1, last_updated, false, content FROM v"
    " ON CONFLICT DO NOTHING RETURNING pid)"
    " INSERT INTO resource_history (pid, version, res_type, res_id, last_updated, deleted,"
    " content, method) SELECT v.pid, 1, v.res_type, v.res_id, v.last_updated, false, v.content,"
    " v.method FROM v JOIN written USING (pid)"
)
# New versions of existing resources held back, likewise: each moves only from the version it
# was read at (the row count tells if one did not).
_PG_MOVE_VERSIONS = (
    "WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::timestamptz[],"
    " %s::bool[], %s::bytea[], %s::text[]) AS v(pid, b_version, version, last_updated, deleted,"
    " content, method)),"
    " moved AS (UPDATE resource AS r SET version = v.version, last_updated = v.last_updated,"
    " deleted = v.deleted, content = v.content FROM v"
    " WHERE r.pid = v.pid AND r.version = v.b_version RETURNING r.pid, r.res_type, r.res_id)"
    " INSERT INTO resource_history (pid, version, res_type, res_id, last_updated, deleted,"
    " content, method) SELECT v.pid, v.version, m.res_type, m.res_id, v.last_updated,"
    " v.deleted, v.content, v.method FROM v JOIN moved AS m USING (pid)"
)
_SQLITE_INSERT_UNLESS_EXISTS = (
    sqlite_insert(resource).on_conflict_do_nothing().returning(resource.c.pid)
)
