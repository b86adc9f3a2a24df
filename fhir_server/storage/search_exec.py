"""Execute compiled searches against the index tables (http://hl7.org/fhir/R4/search.html).

:func:`find_pids` serves conditional interactions (strict: an unknown or malformed criterion is
a 400, since ignoring it would widen a conditional update or delete). :func:`run_page` runs
one keyset page of a search, :func:`include_pids` resolves ``_include`` / ``_revinclude``,
:func:`count` the ``_total``. ``:in`` / ``:not-in`` ValueSets come from ValueSet resources
stored on the server (by ``url``) or from the R4 ValueSets shipped with the spec.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, null, select

from fhir_server.fhir.outcome import FhirError
from fhir_server.search.compile import (
    CompileOptions,
    Position,
    compile_search,
    count_statement,
)
from fhir_server.search.query import Include, SearchQuery, parse_query
from fhir_server.search.registry import SearchRegistry
from fhir_server.search.shapes import page_statement
from fhir_server.storage import cursors
from fhir_server.storage.index_schema import idx_reference, idx_uri
from fhir_server.storage.records import CURRENT_COLUMNS, StoredResource, as_utc, stored_from_row
from fhir_server.storage.schema import resource

log = logging.getLogger(__name__)
MAX_INCLUDE_ROUNDS = 4
_CURSOR_PURPOSE = "search"


def strict_error(query: SearchQuery) -> FhirError | None:
    """The 400 naming the first unusable parameter, if any."""
    if not query.issues:
        return None
    issue = query.issues[0]
    return FhirError(
        400,
        "invalid" if issue.code != "MSO-SEARCH-003" else "not-supported",
        issue.message,
        code=issue.code,
        expression=[issue.name],
    )


def find_pids(
    conn: Connection,
    registry: SearchRegistry,
    res_type: str,
    params: list[tuple[str, str]],
    *,
    limit: int | None,
    access_filter: Any = None,
) -> list[int]:
    """Pids of current, non-deleted ``res_type`` resources matching ``params`` (strict).

    ``access_filter`` (see :class:`~fhir_server.search.compile.CompileOptions`) narrows the
    matches to what the caller may see.
    """
    if res_type not in registry.resource_types:
        raise FhirError(
            400, "not-supported", f"Unknown resource type '{res_type}'", code="MSO-SEARCH-004"
        )
    query = parse_query(registry, (res_type,), params)
    error = strict_error(query)
    if error is not None:
        raise error
    query.sort = []
    options = CompileOptions(
        expand_valueset=valueset_expander(conn, registry),
        access_filter=access_filter,
        subsumption=subsumption(conn, registry),
    )
    compiled = compile_search(registry, query, options, limit=limit)
    return [row.pid for row in conn.execute(compiled.statement)]


@dataclass(slots=True)
class Page:
    """One page of matches with what the paging links need.

    ``resources`` holds the matches as stored rows when they were fetched with the page;
    ``max_pid`` is the snapshot bound (``None`` when a first page needed none: no next page).
    """

    pids: list[int]
    first: Position | None
    last: Position | None
    has_next: bool
    has_previous: bool
    max_pid: int | None
    resources: list[StoredResource] = field(default_factory=list)


def current_max_pid(conn: Connection) -> int:
    """The largest pid now (the snapshot bound of a new search)."""
    stmt = select(resource.c.pid).order_by(resource.c.pid.desc()).limit(1)
    return int(conn.execute(stmt).scalar() or 0)


def chunks_by_size(
    conn: Connection, pids: Sequence[int], max_bytes: int
) -> list[tuple[list[int], int]]:
    """``pids`` (in their order) cut into runs whose stored JSON is at most ``max_bytes`` in
    all (a resource larger than that makes a run of its own), each with its size in bytes;
    the sizes are read from the database, the contents are not."""
    if not pids:
        return []
    stmt = select(resource.c.pid, func.coalesce(func.length(resource.c.content), 0)).where(
        resource.c.pid.in_(pids)
    )
    sizes = {pid: size for pid, size in conn.execute(stmt).all()}
    chunks: list[tuple[list[int], int]] = []
    run: list[int] = []
    used = 0
    for pid in pids:
        size = int(sizes.get(pid, 0))
        if run and used + size > max_bytes:
            chunks.append((run, used))
            run, used = [], 0
        run.append(pid)
        used += size
    if run:
        chunks.append((run, used))
    return chunks


def load_in_slices(conn: Connection, pid: int, slice_bytes: int) -> StoredResource | None:
    """The current version of resource ``pid`` (``None`` if gone), its content read
    ``slice_bytes`` at a time: a driver fetching a large value whole holds several copies of
    it (PostgreSQL's text protocol sends ``bytea`` as hex, twice its size), a slice at a time
    the content is held about twice (its slices, then the joined bytes)."""
    columns = [c if c.name != "content" else null().label("content") for c in CURRENT_COLUMNS]
    head = conn.execute(
        select(*columns, func.length(resource.c.content).label("size")).where(
            resource.c.pid == pid, resource.c.deleted.is_(False)
        )
    ).one_or_none()
    if head is None or head.size is None:
        return None
    parts: list[bytes] = []
    for start in range(1, int(head.size) + 1, slice_bytes):
        piece = func.substr(resource.c.content, start, slice_bytes)
        parts.append(bytes(conn.execute(select(piece).where(resource.c.pid == pid)).scalar_one()))
    stored = stored_from_row(head)
    stored.content = b"".join(parts)
    return stored


_CONTENT = ("res_type", "res_id", "version", "last_updated", "deleted", "content")


def run_page(
    connection: Callable[[], Connection],
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    *,
    count: int,
    position: Position | None,
    max_pid: int | None,
    with_resources: bool = False,
    generic_plans: Callable[[Any, dict[str, Any] | None], Sequence[Sequence[Any]]] | None = None,
) -> Page:
    """Run one page: ``count`` matches after (or before) ``position``, within the snapshot.

    A first page runs without a snapshot bound; one is taken only if there is a next page.
    With ``with_resources`` the page query also returns the stored resources (one round trip).
    ``generic_plans`` (PostgreSQL, a read outside any transaction; see
    ``Repository.generic_plan_fetch``) runs a statement on a connection whose statements keep
    one plan: a page compiled in the index-driven form (``options.index_driven``) runs there,
    unplanned after its first time on the connection.
    ``connection`` gives the unit's own connection, asked for only when needed.
    """
    columns = _CONTENT if with_resources else ()
    compiled, params = page_statement(
        registry, query, options, limit=count + 1, position=position, max_pid=max_pid,
        columns=columns,
    )  # fmt: skip
    if compiled.index_driven and generic_plans is not None:
        rows = list(generic_plans(compiled.statement, params))
    else:
        rows = connection().execute(compiled.statement, params).all()
    more = len(rows) > count
    rows = rows[:count]
    backward = position is not None and position.backward
    if backward:
        rows.reverse()
    nkeys = len(compiled.sort_exprs)

    def pos(row: Any) -> Position:
        return Position([row[i + 1] for i in range(nkeys)], row[0])

    first = pos(rows[0]) if rows else None
    last = pos(rows[-1]) if rows else None
    if backward:
        has_prev, has_next = more, True
    else:
        has_prev, has_next = position is not None, more
    if max_pid is None and (has_next or has_prev):
        # a first page with the resources' columns ends with the snapshot bound (max_pid)
        max_pid = rows[0][-1] if with_resources and rows else current_max_pid(connection())
    resources: list[StoredResource] = []
    if with_resources:
        # by position (pid, the sort keys, then _CONTENT): a Row's attribute lookups cost more
        # than building the StoredResource
        start = 1 + nkeys
        resources = [
            StoredResource(
                row[0],
                res_type,
                res_id,
                version,
                as_utc(last_updated),
                deleted,
                bytes(content) if content is not None else None,
            )
            for row in rows
            for res_type, res_id, version, last_updated, deleted, content in (
                row[start : start + len(_CONTENT)],
            )
        ]
    return Page([row[0] for row in rows], first, last, has_next, has_prev, max_pid, resources)


def count(
    conn: Connection,
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    *,
    max_pid: int | None,
    estimate: bool = False,
) -> int:
    """Number of matches (``estimate`` on PostgreSQL: the planner's row estimate)."""
    stmt = count_statement(registry, query, options, max_pid=max_pid)
    if estimate and conn.dialect.name == "postgresql":
        compiled = stmt.compile(dialect=conn.dialect)
        from sqlalchemy import text

        plan = conn.execute(
            text("EXPLAIN (FORMAT JSON) " + str(compiled)), compiled.params
        ).scalar()
        data = plan if isinstance(plan, list) else orjson.loads(plan)
        node = data[0]["Plan"]
        while node.get("Plans") and node.get("Node Type") == "Aggregate":
            node = node["Plans"][0]
        return int(node.get("Plan Rows", 0))
    return int(conn.execute(stmt).scalar_one())


def include_pids(
    conn: Connection,
    registry: SearchRegistry,
    includes: list[Include],
    match_pids: list[int],
    options: CompileOptions,
    *,
    limit: int,
) -> list[int]:
    """Pids added by ``_include`` / ``_revinclude`` (``:iterate`` repeats on what was added)."""
    if not includes or not match_pids:
        return []
    seen = set(match_pids)
    added: list[int] = []
    frontier = list(match_pids)
    for round_no in range(MAX_INCLUDE_ROUNDS):
        active = [inc for inc in includes if round_no == 0 or inc.iterate]
        if not active or not frontier:
            break
        new: list[int] = []
        for inc in active:
            for pid in _one_include(conn, registry, inc, frontier, options):
                if pid not in seen:
                    seen.add(pid)
                    new.append(pid)
                    if len(added) + len(new) >= limit:
                        return added + new
        added.extend(new)
        frontier = new
    return added


def _identities(registry: SearchRegistry, inc: Include) -> list[int]:
    if inc.param == "*":
        return [
            p.identity(inc.source)
            for p in registry.params_for(inc.source).values()
            if p.type == "reference"
        ]
    param = registry.get(inc.source, inc.param)
    return [param.identity(inc.source)] if param is not None else []


def _one_include(
    conn: Connection,
    registry: SearchRegistry,
    inc: Include,
    pids: list[int],
    options: CompileOptions,
) -> list[int]:
    every = inc.reverse and inc.param == "*"  # _revinclude=*: whatever points at the page
    identities = [] if every else _identities(registry, inc)
    if not identities and not every:
        return []
    ref = idx_reference.alias()
    other = resource.alias("t")
    join = ref.join(
        other, and_(other.c.res_type == ref.c.target_type, other.c.res_id == ref.c.target_id)
    )
    if inc.reverse:
        # resources of inc.source whose reference points at one of pids
        src = resource.alias("s")
        stmt = (
            select(src.c.pid)
            .select_from(join.join(src, src.c.pid == ref.c.pid))
            .where(other.c.pid.in_(pids), src.c.deleted.is_(False))
        )
        if not every:
            stmt = stmt.where(ref.c.hash_identity.in_(identities), src.c.res_type == inc.source)
        if inc.target:
            stmt = stmt.where(other.c.res_type == inc.target)
        filtered = src
    else:
        stmt = (
            select(other.c.pid)
            .select_from(join)
            .where(
                ref.c.pid.in_(pids), ref.c.hash_identity.in_(identities), other.c.deleted.is_(False)
            )
        )
        if inc.target:
            stmt = stmt.where(other.c.res_type == inc.target)
        filtered = other
    if options.access_filter is not None:
        stmt = stmt.where(options.access_filter(filtered))
    return [row[0] for row in conn.execute(stmt.distinct())]


# -- cursors ----------------------------------------------------------------------------------


def encode_cursor(position: Position, max_pid: int | None, total: int | None, key: bytes) -> str:
    """An opaque, signed page token: keyset position + snapshot bound + total
    (:mod:`fhir_server.storage.cursors`; ``key`` is :func:`~.cursors.cursor_key`)."""
    keys = [{"dt": k.isoformat()} if isinstance(k, datetime) else k for k in position.keys]
    data = {"k": keys, "p": position.pid, "b": position.backward, "m": max_pid, "t": total}
    return cursors.seal(data, key, _CURSOR_PURPOSE)


def decode_cursor(token: str, key: bytes) -> tuple[Position, int, int | None]:
    """Reverse :func:`encode_cursor`; a 400 for a token this server did not sign."""
    data = cursors.unseal(token, key, _CURSOR_PURPOSE)
    try:
        if not isinstance(data, dict):
            raise TypeError
        keys = [datetime.fromisoformat(k["dt"]) if isinstance(k, dict) else k for k in data["k"]]
        total = data.get("t")
        if total is not None and type(total) is not int:
            raise TypeError
        return Position(keys, int(data["p"]), bool(data["b"])), int(data["m"]), total
    except (KeyError, TypeError, ValueError):
        raise FhirError(
            400,
            "invalid",
            "_cursor is not a paging cursor this server issued",
            code="MSO-SEARCH-005",
        ) from None


# -- ValueSets --------------------------------------------------------------------------------

_SPEC_TERMINOLOGY = Path(__file__).resolve().parents[1] / "fhir" / "r4" / "valuesets.json"


@cache
def _spec_terminology() -> dict[str, dict[str, dict[str, Any]]]:
    """The R4 ValueSets and CodeSystems by resource type, then canonical URL (parsed once)."""
    out: dict[str, dict[str, dict[str, Any]]] = {"ValueSet": {}, "CodeSystem": {}}
    bundle = orjson.loads(_SPEC_TERMINOLOGY.read_bytes())
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        by_url = out.get(resource.get("resourceType", ""))
        if by_url is not None and "url" in resource:
            by_url[resource["url"]] = resource
    return out


def _spec_valuesets() -> dict[str, dict[str, Any]]:
    return _spec_terminology()["ValueSet"]


def _stored_canonical(
    conn: Connection, registry: SearchRegistry, res_type: str, url: str
) -> dict[str, Any] | None:
    """A current ValueSet/CodeSystem stored on the server, found by its canonical ``url``."""
    param = registry.get(res_type, "url")
    if param is None:
        return None
    from fhir_server.search.types.uri import h_uri

    row = conn.execute(
        select(resource.c.content)
        .select_from(resource.join(idx_uri, idx_uri.c.pid == resource.c.pid))
        .where(
            idx_uri.c.hash_uri == h_uri(param.identity(res_type), url),
            resource.c.deleted.is_(False),
        )
        .limit(1)
    ).first()
    return orjson.loads(row[0]) if row and row[0] is not None else None


def valueset_expander(conn: Connection, registry: SearchRegistry) -> Any:
    """A function url -> [(system, code)] (code ``None``: the whole system), or ``None``."""

    def stored(url: str) -> dict[str, Any] | None:
        return _stored_canonical(conn, registry, "ValueSet", url)

    def find(url: str) -> dict[str, Any] | None:
        url = url.split("|", 1)[0]
        return stored(url) or _spec_valuesets().get(url)

    def expand(url: str, depth: int = 0) -> Sequence[tuple[str | None, str | None]] | None:
        vs = find(url)
        if vs is None or depth > 5:
            return None
        out: list[tuple[str | None, str | None]] = []
        for item in (vs.get("expansion") or {}).get("contains", ()):
            _contains(item, out)
        for inc in (vs.get("compose") or {}).get("include", ()):
            system = inc.get("system")
            concepts = inc.get("concept")
            if concepts:
                out.extend((system, c.get("code")) for c in concepts)
            elif system and not inc.get("filter"):
                out.append((system, None))
            for nested in inc.get("valueSet", ()):
                out.extend(expand(nested, depth + 1) or ())
        return out

    return expand


def _contains(item: dict[str, Any], out: list[tuple[str | None, str | None]]) -> None:
    if item.get("code"):
        out.append((item.get("system"), item["code"]))
    for child in item.get("contains", ()):
        _contains(child, out)


# -- CodeSystem hierarchies (:above / :below on tokens) ---------------------------------------


def _spec_codesystems() -> dict[str, dict[str, Any]]:
    return _spec_terminology()["CodeSystem"]


def _parents(codesystem: dict[str, Any]) -> dict[str, set[str]]:
    """code -> its parent codes, from nested ``concept`` s and ``subsumedBy`` properties."""
    parents: dict[str, set[str]] = {}

    def walk(concepts: list[dict[str, Any]], parent: str | None) -> None:
        for concept in concepts:
            code = concept.get("code")
            if not code:
                continue
            entry = parents.setdefault(code, set())
            if parent:
                entry.add(parent)
            for prop in concept.get("property", ()):
                if prop.get("code") in ("subsumedBy", "parent") and prop.get("valueCode"):
                    entry.add(prop["valueCode"])
            walk(concept.get("concept", ()), code)

    walk(codesystem.get("concept", ()), None)
    return parents


def subsumption(conn: Connection, registry: SearchRegistry) -> Any:
    """A function (system, code, below) -> the code plus its descendants / ancestors, or ``None``.

    The code system comes from a CodeSystem stored on the server (by ``url``) or from the R4
    CodeSystems shipped with the specification.
    """

    def find(system: str) -> dict[str, Any] | None:
        found = _stored_canonical(conn, registry, "CodeSystem", system)
        return found if found is not None else _spec_codesystems().get(system)

    def related(system: str, code: str, below: bool) -> list[str] | None:
        cs = find(system)
        if cs is None:
            return None
        parents = _parents(cs)
        if code not in parents:
            return None
        if below:
            children: dict[str, set[str]] = {}
            for child, ps in parents.items():
                for p in ps:
                    children.setdefault(p, set()).add(child)
            edges = children
        else:
            edges = parents
        out, todo = {code}, [code]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in out:
                    out.add(nxt)
                    todo.append(nxt)
        return sorted(out)

    return related
