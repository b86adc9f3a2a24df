"""Search interactions: type, system and compartment search.

http://hl7.org/fhir/R4/http.html#search, http://hl7.org/fhir/R4/search.html,
http://hl7.org/fhir/R4/compartmentdefinition.html#search. Transport-free: the REST layer hands
in a :class:`FhirRequest` (for POST ``_search`` with the form parameters merged into
``params``) and serializes the returned searchset Bundle. A thin adapter: the search itself,
access filter included, is the repository's (:meth:`Tx.search`,
:mod:`fhir_server.storage.searching`).

Unknown or malformed parameters are ignored and reported in an OperationOutcome entry
(``search.mode = outcome``), or rejected with a 400 under ``Prefer: handling=strict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server.fhir.outcome import FhirError, Issue, operation_outcome
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.search import summary as summary_mod
from fhir_server.search.query import SearchQuery, parse_query
from fhir_server.storage.searching import Condition, SearchPage, compartment_params

COMMON_TYPES_PARAMS = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source")


@contextmanager
def search_unit(ctx: InteractionContext) -> Iterator[Any]:
    """The request's unit (a transaction Bundle's), or an autocommit read unit of its own."""
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
    return _search(
        ctx,
        req,
        types,
        f"{compartment_type}/{compartment_id}/{target_type}",
        compartment=(compartment_type, compartment_id),
    )


# -- the search itself ------------------------------------------------------------------------


def _search(
    ctx: InteractionContext,
    req: FhirRequest,
    types: tuple[str, ...],
    path: str,
    *,
    compartment: tuple[str, str] | None = None,
    where: list[Condition] | None = None,
    extra_self: list[tuple[str, str]] | None = None,
) -> FhirResponse:
    """HTTP parameters -> :meth:`Tx.search` -> a searchset Bundle."""
    params = [(k, v) for k, v in req.params if k != "_type"]
    query = parse_query(ctx.repo.registry, types, params)
    strict = req.prefer.handling == "strict"
    settings = ctx.settings
    count = query.count if query.count is not None else settings.default_page_size
    count = min(count, settings.max_page_size)
    with search_unit(ctx) as tx:
        page = tx.search(
            types, query, count=count, strict=strict, where=where or (), compartment=compartment,
            base_url=ctx.base_url, include_limit=settings.max_page_size,
        )  # fmt: skip
        return _bundle(ctx, page, path, extra_self or [])


def _bundle(
    ctx: InteractionContext, page: SearchPage, path: str, extra_self: list[tuple[str, str]]
) -> FhirResponse:
    """The searchset Bundle of ``page``: total, paging links, matches, includes, outcome."""
    query = page.query
    base_link = f"{ctx.base_url}/{path}" if path else ctx.base_url
    self_params = [*extra_self, *query.used]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if query.summary == "count":
        bundle["total"] = page.total
        bundle["link"] = [{"relation": "self", "url": _url(base_link, self_params)}]
        _add_outcome(bundle, query)
        return FhirResponse(resource=bundle)
    if page.total is not None:
        bundle["total"] = page.total
    links = [{"relation": "self", "url": _url(base_link, self_params, query.cursor)}]
    if query.cursor:
        links.append({"relation": "first", "url": _url(base_link, self_params)})
    if page.previous_cursor is not None:
        links.append(
            {"relation": "previous", "url": _url(base_link, self_params, page.previous_cursor)}
        )
    if page.next_cursor is not None:
        links.append({"relation": "next", "url": _url(base_link, self_params, page.next_cursor)})
    bundle["link"] = links
    entries = [entry(ctx, s, "match", query) for s in page.matches]
    entries.extend(entry(ctx, s, "include", query) for s in page.included)
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


def entry(
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
    "compartment_params",
    "entry",
    "search_compartment",
    "search_system",
    "search_type",
    "search_unit",
]
