"""Search interactions: type, system and compartment search, and Patient/$everything.

http://hl7.org/fhir/R4/http.html#search, http://hl7.org/fhir/R4/search.html,
http://hl7.org/fhir/R4/compartmentdefinition.html#search and
http://hl7.org/fhir/R4/patient-operation-everything.html. Transport-free: the REST layer hands
in a :class:`FhirRequest` (for POST ``_search`` with the form parameters merged into
``params``) and serializes the returned searchset Bundle.

Unknown or malformed parameters are ignored and reported in an OperationOutcome entry
(``search.mode = outcome``), or rejected with a 400 under ``Prefer: handling=strict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import and_, or_

from fhir_server.fhir.definitions import load_json
from fhir_server.fhir.outcome import FhirError, Issue, operation_outcome
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.search import summary as summary_mod
from fhir_server.search.compile import CompileOptions, Position, compartment_condition
from fhir_server.search.query import SearchQuery, parse_query
from fhir_server.storage import search_exec

COMMON_TYPES_PARAMS = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")


@contextmanager
def _unit(ctx: InteractionContext) -> Iterator[Any]:
    if ctx.tx is not None:
        yield ctx.tx
    else:
        # Autocommit: under PostgreSQL's READ COMMITTED each statement takes its own snapshot
        # anyway, so BEGIN/COMMIT would only add two round trips to every search.
        with ctx.repo.unit(caller=ctx.caller, snapshot=False) as tx:
            yield tx


def _known_type(ctx: InteractionContext, rtype: str, *, status: int = 404) -> None:
    if rtype not in ctx.repo.registry.resource_types:
        raise FhirError(
            status,
            "not-supported",
            f"Unknown resource type '{rtype}'",
            code="MSO-SEARCH-004",
            expression=["_type"] if status == 400 else None,
        )


def search_type(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/[type]?… and POST [base]/[type]/_search."""
    rtype = req.resource_type or ""
    _known_type(ctx, rtype)
    return _search(ctx, req, (rtype,), rtype)


def search_system(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]?_type=A,B&…: search several (or all) types with their common parameters."""
    types_param = ",".join(v for k, v in req.params if k == "_type")
    if types_param:
        types = tuple(t.strip() for t in types_param.split(",") if t.strip())
        for t in types:
            _known_type(ctx, t, status=400)
    else:
        types = tuple(sorted(ctx.repo.registry.resource_types))
    return _search(ctx, req, types, "", extra_self=[("_type", types_param)] if types_param else [])


def search_compartment(
    ctx: InteractionContext,
    req: FhirRequest,
    compartment_type: str,
    compartment_id: str,
    target_type: str,
) -> FhirResponse:
    """GET [base]/Patient/[id]/[type]?…: ``type`` resources in the patient's compartment."""
    if compartment_type != "Patient":
        raise FhirError(
            404,
            "not-supported",
            f"No {compartment_type} compartment on this server",
            code="MSO-SEARCH-006",
        )
    params = compartment_params()
    registry = ctx.repo.registry
    if target_type == "*":
        types = tuple(t for t in sorted(params) if t in registry.resource_types)
    else:
        _known_type(ctx, target_type)
        if target_type not in params:
            raise FhirError(
                400,
                "invalid",
                f"{target_type} is not in the {compartment_type} compartment",
                code="MSO-SEARCH-007",
            )
        types = (target_type,)
    per_type = {
        t: compartment_condition(registry, params, compartment_type, compartment_id, t)
        for t in types
    }

    def condition(r: Any) -> Any:
        if len(types) == 1:
            return per_type[types[0]](r)
        return or_(*(and_(r.c.res_type == t, cond(r)) for t, cond in per_type.items()))

    return _search(
        ctx, req, types, f"{compartment_type}/{compartment_id}/{target_type}", extra=[condition]
    )


def everything(ctx: InteractionContext, req: FhirRequest, patient_id: str | None) -> FhirResponse:
    """Patient/[id]/$everything: the patient and every resource in its compartment.

    One Bundle (type searchset) holding at most ``max_page_size`` compartment resources besides
    the patient; ``_type`` restricts the types, ``_since`` (instant) filters on lastUpdated.
    """
    registry = ctx.repo.registry
    if not patient_id:
        raise FhirError(400, "invalid", "$everything needs a patient id", code="MSO-SEARCH-008")
    params = compartment_params()
    wanted = {t.strip() for k, v in req.params if k == "_type" for t in v.split(",") if t.strip()}
    since = req.param("_since")
    limit = ctx.settings.max_page_size
    entries: list[dict[str, Any]] = []
    with _unit(ctx) as tx:
        patient = tx.read("Patient", patient_id)
        entries.append(_entry(ctx, patient, "match"))
        for rtype in sorted(params):
            if rtype == "Patient" or (wanted and rtype not in wanted):
                continue
            if rtype not in registry.resource_types:
                continue
            q = parse_query(registry, (rtype,), [("_lastUpdated", f"ge{since}")] if since else [])
            if q.issues:
                raise search_exec.strict_error(q) or AssertionError()
            options = _options(ctx)
            options.extra.append(
                compartment_condition(registry, params, "Patient", patient_id, rtype)
            )
            page = search_exec.run_page(
                lambda: tx.conn, registry, q, options, count=limit - len(entries) + 1,
                position=None, max_pid=None, with_resources=True,
            )  # fmt: skip
            for stored in page.resources:
                entries.append(_entry(ctx, stored, "match"))
            if len(entries) > limit:
                break
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{ctx.base_url}/Patient/{patient_id}/$everything"}],
        "entry": entries[: limit + 1],
    }
    return FhirResponse(resource=bundle)


@cache
def compartment_params() -> dict[str, list[str]]:
    """Patient compartment: resource type -> its parameters linking to the patient."""
    definition = load_json("compartmentdefinition-patient.json")
    return {r["code"]: list(r["param"]) for r in definition.get("resource", ()) if r.get("param")}


# -- the search itself ------------------------------------------------------------------------


def access_filter_for(ctx: InteractionContext) -> Any:
    """The SQL access filter for ``ctx.caller`` (``None``: everything is visible).

    The seam where access policy plugs in: a function of the ``resource`` alias returning a
    condition, compiled into the match, count and include queries (CompileOptions).
    """
    return getattr(ctx.repo, "search_access_filter", lambda caller: None)(ctx.caller)


def _options(ctx: InteractionContext, tx: Any = None) -> CompileOptions:
    options = CompileOptions(base_url=ctx.base_url, access_filter=access_filter_for(ctx))
    if tx is not None:
        registry = ctx.repo.registry
        # the unit's connection is asked for only when a ValueSet or CodeSystem is looked up
        options.expand_valueset = lambda url: search_exec.valueset_expander(tx.conn, registry)(url)
        options.subsumption = lambda system, code, below: search_exec.subsumption(
            tx.conn, registry
        )(system, code, below)
    return options


def _search(
    ctx: InteractionContext,
    req: FhirRequest,
    types: tuple[str, ...],
    path: str,
    *,
    extra: list[Callable[[Any], Any]] | None = None,
    extra_self: list[tuple[str, str]] | None = None,
) -> FhirResponse:
    registry = ctx.repo.registry
    params = [(k, v) for k, v in req.params if k != "_type"]
    query = parse_query(registry, types, params)
    strict = req.prefer.handling == "strict"
    if strict and query.issues:
        error = search_exec.strict_error(query)
        assert error is not None
        raise error
    settings = ctx.settings
    count = query.count if query.count is not None else settings.default_page_size
    count = min(count, settings.max_page_size)
    with _unit(ctx) as tx:
        tx.fire_search(types[0] if len(types) == 1 else "", params)
        options = _options(ctx, tx)
        options.extra.extend(extra or [])
        if query.issues and not strict:
            # re-check values lazily: a malformed value is found while compiling
            pass
        try:
            return _run(ctx, tx, query, options, types, path, count, extra_self or [])
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
            query.issues.append(_issue_from(err))
            return _run(ctx, tx, query, options, types, path, count, extra_self or [])


def _issue_from(err: FhirError) -> Any:
    from fhir_server.search.query import Issue as QIssue

    return QIssue((err.expression or [""])[0], err.message, err.code or "MSO-SEARCH-002")


def _run(
    ctx: InteractionContext,
    tx: Any,
    query: SearchQuery,
    options: CompileOptions,
    types: tuple[str, ...],
    path: str,
    count: int,
    extra_self: list[tuple[str, str]],
) -> FhirResponse:
    registry = ctx.repo.registry
    position: Position | None = None
    total: int | None = None
    max_pid: int | None = None
    if query.cursor:
        position, max_pid, total = search_exec.decode_cursor(query.cursor)
    base_link = f"{ctx.base_url}/{path}" if path else ctx.base_url
    self_params = [*extra_self, *query.used]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}

    if query.summary == "count":
        bundle["total"] = search_exec.count(tx.conn, registry, query, options, max_pid=None)
        bundle["link"] = [{"relation": "self", "url": _url(base_link, self_params)}]
        _add_outcome(bundle, query)
        return FhirResponse(resource=bundle)

    # outside a transaction Bundle, the page may run on a connection keeping generic plans
    generic = ctx.repo.generic_plan_fetch if ctx.tx is None and ctx.repo.postgres else None
    options.index_driven = generic is not None
    page = search_exec.run_page(
        lambda: tx.conn, registry, query, options, count=count, position=position,
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
                tx.conn, registry, query, options, max_pid=max_pid, estimate=True
            )
        else:
            total = search_exec.count(tx.conn, registry, query, options, max_pid=max_pid)
    if total is not None:
        bundle["total"] = total
    links = [{"relation": "self", "url": _url(base_link, self_params, query.cursor)}]
    if position is not None:
        links.append({"relation": "first", "url": _url(base_link, self_params)})
    if page.has_previous and page.first is not None:
        prev = Position(page.first.keys, page.first.pid, backward=True)
        token = search_exec.encode_cursor(prev, max_pid, total)
        links.append({"relation": "previous", "url": _url(base_link, self_params, token)})
    if page.has_next and page.last is not None:
        token = search_exec.encode_cursor(page.last, max_pid, total)
        links.append({"relation": "next", "url": _url(base_link, self_params, token)})
    bundle["link"] = links

    matches = page.resources
    included_pids: list[int] = []
    if query.includes:  # the unit's connection is taken only when it is needed
        included_pids = search_exec.include_pids(
            tx.conn, registry, query.includes, page.pids, options, limit=ctx.settings.max_page_size
        )
    included = tx.load(included_pids)
    entries = [_entry(ctx, s, "match", query) for s in matches]
    entries.extend(_entry(ctx, s, "include", query) for s in included)
    if entries:
        bundle["entry"] = entries
    _add_outcome(bundle, query)
    return FhirResponse(resource=bundle)


def _add_outcome(bundle: dict[str, Any], query: SearchQuery) -> None:
    if not query.issues:
        return
    outcome = operation_outcome(
        [
            Issue(
                "warning",
                "not-supported" if i.code == "MSO-SEARCH-003" else "invalid",
                f"Search parameter ignored: {i.message}",
                [i.name],
                i.code,
            )
            for i in query.issues
        ]
    )
    bundle.setdefault("entry", []).append({"resource": outcome, "search": {"mode": "outcome"}})


def _entry(
    ctx: InteractionContext, stored: Any, mode: str, query: SearchQuery | None = None
) -> dict[str, Any]:
    """A searchset entry. Its ``resource`` is the stored JSON as an ``orjson.Fragment`` (sent
    as-is) unless ``_summary`` or ``_elements`` shaped it into a dict: in-process callers that
    read the resources ask for the elements they need."""
    if query is not None and (query.summary or query.elements):
        body: Any = summary_mod.apply(stored.resource, query.summary, query.elements)
    else:
        body = orjson.Fragment(stored.content)  # the stored JSON as-is: no parse, no re-dump
    return {
        "fullUrl": f"{ctx.base_url}/{stored.res_type}/{stored.res_id}",
        "resource": body,
        "search": {"mode": mode},
    }


def _url(base: str, params: list[tuple[str, str]], cursor: str | None = None) -> str:
    items = list(params)
    if cursor:
        items.append(("_cursor", cursor))
    return f"{base}?{urlencode(items)}" if items else base


__all__ = [
    "COMMON_TYPES_PARAMS",
    "everything",
    "search_compartment",
    "search_system",
    "search_type",
]
