"""The repository-level search: one call with the caller's access filter applied inside.

http://hl7.org/fhir/R4/search.html. Every reader of search results goes through here — the
REST search interactions (:mod:`fhir_server.interactions.search`, which only turns HTTP
parameters into a call and a :class:`SearchPage` into a searchset Bundle), ``$everything``, the
patient picker of the authorization server, and the bulk export, Subscriptions and viewer to
come — so none of them compiles SQL or can forget the access policy:

* :func:`search` (``Tx.search``): one page of matches (keyset paging by opaque cursor, with a
  snapshot bound so later pages neither shift nor repeat), ``_include`` / ``_revinclude``,
  ``Bundle.total`` as asked, and the lenient or strict handling of unusable parameters;
* :func:`iter_search` (``Tx.iter_search``): every match in pid order, fetched in keyset
  batches within the snapshot taken by the first one (bulk export).

The caller is the unit's (``Tx.caller``): the policy's search filter restricts the matches,
includes, counts, chains and ``_has`` in the same SQL statement; with ``check`` the caller must
also be allowed to search the type (403 otherwise) and the before-search hooks run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from sqlalchemy import Connection, and_, or_

from fhir_server.fhir.definitions import load_json
from fhir_server.fhir.outcome import FhirError
from fhir_server.search.budget import (
    TOO_MANY_INCLUDED,
    current_budget,
    current_limits,
    limit_error,
)
from fhir_server.search.compile import CompileOptions, Position, compartment_condition
from fhir_server.search.query import Issue, SearchQuery, parse_query
from fhir_server.storage import search_exec
from fhir_server.storage.cursors import cursor_key
from fhir_server.storage.engine import cost_error, search_guard
from fhir_server.storage.records import StoredResource

DEFAULT_COUNT = 20  # matches per page when neither the call nor ``_count`` says
INCLUDE_LIMIT = 1000  # resources ``_include`` / ``_revinclude`` add to a page at most
Condition = Callable[[Any], Any]  # a condition on a ``resource`` alias


class SearchUnit(Protocol):
    """The part of a unit of work (``Tx``) a search uses."""

    repo: Any
    caller: Any

    @property
    def conn(self) -> Connection:
        """The unit's connection (every write of the unit stored)."""
        ...

    @property
    def autocommit(self) -> bool:
        """True for an autocommit read unit (no transaction of its own)."""
        ...

    def fire_search(self, res_type: str, params: list[tuple[str, str]]) -> None:
        """403 unless the caller may search ``res_type``; the before-search hooks."""
        ...

    def load(self, pids: list[int]) -> list[StoredResource]:
        """Current resources by pid."""
        ...


@dataclass(slots=True)
class SearchPage:
    """One page of a search.

    ``query`` is the search as run: ``used`` holds the parameters a self link repeats,
    ``issues`` those ignored (lenient handling), ``summary`` / ``elements`` how to shape the
    resources, ``cursor`` the page asked for. With ``_summary=count`` only ``total`` is set.
    ``next_cursor`` / ``previous_cursor`` are opaque tokens for :func:`search`'s ``cursor``.
    """

    query: SearchQuery
    matches: list[StoredResource] = field(default_factory=list)
    included: list[StoredResource] = field(default_factory=list)
    total: int | None = None
    next_cursor: str | None = None
    previous_cursor: str | None = None


@cache
def compartment_params() -> dict[str, list[str]]:
    """Patient compartment: resource type -> its parameters linking to the patient
    (http://hl7.org/fhir/R4/compartmentdefinition-patient.html)."""
    definition = load_json("compartmentdefinition-patient.json")
    return {r["code"]: list(r["param"]) for r in definition.get("resource", ()) if r.get("param")}


def in_compartment(
    registry: Any,
    compartment_type: str,
    compartment_id: str | Sequence[str] | None,
    types: Sequence[str],
) -> Condition:
    """A condition: the resource (of one of ``types``) is in ``compartment_type/id`` (several
    ids: in any of their compartments; ``None``: in some compartment of that type)."""
    params = compartment_params()
    per_type = {
        t: compartment_condition(registry, params, compartment_type, compartment_id, t)
        for t in types
    }

    def condition(r: Any) -> Any:
        if len(per_type) == 1:
            return next(iter(per_type.values()))(r)
        return or_(*(and_(r.c.res_type == t, cond(r)) for t, cond in per_type.items()))

    return condition


def search(
    tx: SearchUnit,
    types: str | Sequence[str],
    params: Sequence[tuple[str, str]] | SearchQuery = (),
    *,
    count: int | None = None,
    cursor: str | None = None,
    strict: bool = False,
    where: Sequence[Condition] = (),
    compartment: tuple[str, str] | None = None,
    base_url: str | None = None,
    include_limit: int = INCLUDE_LIMIT,
    check: bool = True,
) -> SearchPage:
    """One page of ``types`` resources matching ``params``, as the unit's caller may see them.

    ``params`` are search parameters (``[("name", "smith"), ("_count", "10")]``) or a parsed
    :class:`SearchQuery`; ``count`` (else ``_count``, else :data:`DEFAULT_COUNT`) is the page
    size, ``cursor`` a :attr:`SearchPage.next_cursor` / ``previous_cursor`` (else ``_cursor``).
    ``strict``: an unusable parameter is a 400 (``Prefer: handling=strict``); otherwise it is
    ignored and reported in ``query.issues``. ``where`` adds conditions on the ``resource``
    alias, ``compartment`` (``("Patient", id)``) restricts to a compartment. ``base_url``
    resolves absolute references. ``check=False`` skips the search permission check and
    hooks for searches the server makes inside another interaction (``$everything``): the
    access filter applies either way.
    """
    types, query, raw = _parse(tx, types, params, strict=strict)
    if cursor is not None:
        query.cursor = cursor
    if count is None:
        count = query.count if query.count is not None else DEFAULT_COUNT
    if check:
        tx.fire_search(types[0] if len(types) == 1 else "", raw)
    options = _options(tx, base_url, where, compartment, types)
    try:
        return _budgeted_page(tx, query, options, count, include_limit)
    except FhirError as err:
        if strict or err.status != 400 or err.code not in ("MSO-SEARCH-002", "MSO-SEARCH-003"):
            raise
        # lenient: drop the offending clause and report it
        bad = (err.expression or [""])[0].split(":")[0]
        kept = [c for c in query.clauses if c.code != bad and c.name.split(":")[0] != bad]
        if len(kept) == len(query.clauses):
            raise
        query.clauses = kept
        query.used = [(k, v) for k, v in query.used if k.split(":")[0] != bad]
        query.issues.append(
            Issue((err.expression or [""])[0], err.message, err.code or "MSO-SEARCH-002")
        )
        return _budgeted_page(tx, query, options, count, include_limit)


def iter_search(
    tx: SearchUnit,
    types: str | Sequence[str],
    params: Sequence[tuple[str, str]] | SearchQuery = (),
    *,
    batch: int = 1000,
    max_bytes: int | None = None,
    where: Sequence[Condition] = (),
    compartment: tuple[str, str | Sequence[str] | None] | None = None,
    base_url: str | None = None,
    check: bool = True,
) -> Iterator[StoredResource]:
    """Every ``types`` resource matching ``params`` that the unit's caller may see, in pid
    order, fetched ``batch`` at a time (keyset on pid); resources written after the first
    batch are not included (its snapshot bound). Parameters are strict (a 400 for one that
    cannot be used: an export must not silently widen); ``_sort``, ``_count``, ``_include``
    and the paging parameters are not used.

    With ``max_bytes`` a batch's pids are fetched first and their contents loaded in chunks of
    at most that many bytes of stored JSON (a resource larger than that alone): the memory a
    batch takes is bounded whatever the resources hold (bulk export of inline attachments).
    """
    types, query, raw = _parse(tx, types, params, strict=True)
    query.sort, query.includes = [], []
    if check:
        tx.fire_search(types[0] if len(types) == 1 else "", raw)
    options = _options(tx, base_url, where, compartment, types)
    registry = tx.repo.registry
    position: Position | None = None
    max_pid: int | None = None
    while True:
        page = search_exec.run_page(
            lambda: tx.conn, registry, query, options, count=batch, position=position,
            max_pid=max_pid, with_resources=max_bytes is None,
        )  # fmt: skip
        if max_bytes is None:
            yield from page.resources
        else:
            for chunk, size in search_exec.chunks_by_size(tx.conn, page.pids, max_bytes):
                if size <= max_bytes:
                    yield from tx.load(chunk)
                    continue
                # one resource alone larger than a batch may be: read it in slices
                large = search_exec.load_in_slices(tx.conn, chunk[0], max_bytes)
                if large is not None:
                    yield large
        if not page.has_next or page.last is None:
            return
        position, max_pid = page.last, page.max_pid


def _parse(
    tx: SearchUnit,
    types: str | Sequence[str],
    params: Sequence[tuple[str, str]] | SearchQuery,
    *,
    strict: bool,
) -> tuple[tuple[str, ...], SearchQuery, list[tuple[str, str]]]:
    """The types as a tuple, the parsed query and the parameters the hooks see; 400 for an
    unknown type, and (``strict``) for an unusable parameter."""
    registry = tx.repo.registry
    types = (types,) if isinstance(types, str) else tuple(types)
    for rtype in types:
        if rtype not in registry.resource_types:
            raise FhirError(
                400, "not-supported", f"Unknown resource type '{rtype}'", code="MSO-SEARCH-004"
            )
    if isinstance(params, SearchQuery):
        query, raw = params, list(params.used)
    else:
        raw = list(params)
        query = parse_query(registry, types, raw)
    if strict and query.issues:
        error = search_exec.strict_error(query)
        assert error is not None
        raise error
    return types, query, raw


def _options(
    tx: SearchUnit,
    base_url: str | None,
    where: Sequence[Condition],
    compartment: tuple[str, str | Sequence[str] | None] | None,
    types: tuple[str, ...],
) -> CompileOptions:
    """Compile options with the caller's access filter; ValueSets and CodeSystems stored on the
    server are looked up on the unit's connection, taken only when one is needed."""
    repo = tx.repo
    registry = repo.registry
    options = CompileOptions(base_url=base_url, access_filter=repo.search_access_filter(tx.caller))
    options.expand_valueset = lambda url: search_exec.valueset_expander(tx.conn, registry)(url)
    options.subsumption = lambda system, code, below: search_exec.subsumption(tx.conn, registry)(
        system, code, below
    )
    if compartment is not None:
        options.extra.append(in_compartment(registry, *compartment, types))
    options.extra.extend(where)
    return options


def _budgeted_page(
    tx: SearchUnit, query: SearchQuery, options: CompileOptions, count: int, include_limit: int
) -> SearchPage:
    """:func:`_page` under the current request's search budget (see ``search.budget``): the
    statement timeout and cancellation on the unit's connection (taken only when needed; the
    generic-plan pool applies the budget itself), a stopped statement answered as a 503."""
    budget = current_budget()
    with ExitStack() as stack:
        guarded: list[Connection] = []

        def connection() -> Connection:
            if not guarded:
                guarded.append(stack.enter_context(search_guard(tx.conn, budget)))
            return guarded[0]

        try:
            return _page(tx, query, options, count, include_limit, connection)
        except FhirError:
            raise
        except Exception as exc:
            error = cost_error(exc, budget)
            if error is None:
                raise
            raise error from None


def _page(
    tx: SearchUnit,
    query: SearchQuery,
    options: CompileOptions,
    count: int,
    include_limit: int,
    connection: Callable[[], Connection],
) -> SearchPage:
    repo = tx.repo
    registry = repo.registry
    position: Position | None = None
    total: int | None = None
    max_pid: int | None = None
    if query.cursor:
        position, max_pid, total = search_exec.decode_cursor(query.cursor, cursor_key(repo.engine))
    if query.summary == "count":
        total = search_exec.count(connection(), registry, query, options, max_pid=None)
        return SearchPage(query, total=total)
    # an autocommit read (not inside a transaction) may run its page on the generic-plan pool
    generic = repo.generic_plan_fetch if tx.autocommit and repo.postgres else None
    options.index_driven = generic is not None
    page = search_exec.run_page(
        connection, registry, query, options, count=count, position=position,
        max_pid=max_pid, with_resources=True, generic_plans=generic,
    )  # fmt: skip
    max_pid = page.max_pid
    # Bundle.total: free when the first page holds everything; otherwise only on request
    # (_total=accurate counts, _total=estimate asks the planner), as counting a large
    # result costs as much as the search itself.
    if total is None and query.total != "none":
        if position is None and not page.has_next:
            total = len(page.pids)
        elif query.total is None:
            pass
        elif query.total == "estimate":
            total = search_exec.count(
                connection(), registry, query, options, max_pid=max_pid, estimate=True
            )
        else:
            total = search_exec.count(connection(), registry, query, options, max_pid=max_pid)
    result = SearchPage(query, page.resources, total=total)
    if page.has_previous and page.first is not None:
        prev = Position(page.first.keys, page.first.pid, backward=True)
        result.previous_cursor = search_exec.encode_cursor(
            prev, max_pid, total, cursor_key(repo.engine)
        )
    if page.has_next and page.last is not None:
        result.next_cursor = search_exec.encode_cursor(
            page.last, max_pid, total, cursor_key(repo.engine)
        )
    if query.includes:  # the unit's connection is taken only when it is needed
        cap = min(include_limit, current_limits().max_included)
        included = search_exec.include_pids(
            connection(), registry, query.includes, page.pids, options, limit=cap + 1
        )
        if len(included) > cap:
            raise limit_error(
                TOO_MANY_INCLUDED,
                f"_include / _revinclude would add more than {cap} resources to the page; "
                "ask for a smaller _count",
                "_include",
            )
        result.included = tx.load(included)
    return result
