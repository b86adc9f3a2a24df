"""Page statements built once per query shape and run again with new values.

Building a search's SQLAlchemy statement and computing its cache key cost more CPU than
PostgreSQL spends answering it (30 to 40% of a ``Patient?identifier=`` request, measured with
py-spy). Most searches repeat a few shapes with other values: the same parameters, modifiers
and sort, a different identifier or name. For those, :func:`page_statement` keeps the compiled
page statement, whose values are named parameters (``sv_0``, ``sv_1`` …, given out by a
:class:`Slots` binder while compiling), and runs it again with the new values bound by name.
SQLAlchemy memoizes the cache key on the statement object, so a repeat costs neither the build
nor the key.

Only plain criteria take part (token, string, date, reference … on a parameter's own index rows,
``_id``, ``_text``, ``_content``), on the first page (no keyset position or snapshot bound) and
with an access filter that names its own cache key. Everything else compiles as before. The
shape key holds everything that changes the SQL text, and the values are exactly what the
compiler would bind: ``MSO_VERIFY_SEARCH_SHAPES=1`` (set by the test suite) recompiles every
reused statement from scratch and fails on any difference.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.elements import BindParameter

from fhir_server.search.compile import (
    Compiled,
    CompileOptions,
    Position,
    compile_search,
    explain,
    id_values,
    plain_criterion,
    text_predicate,
)
from fhir_server.search.query import Clause, SearchQuery
from fhir_server.search.registry import SearchRegistry
from fhir_server.search.types import special
from fhir_server.search.types.base import bound_values, pred_shape

VERIFY = os.environ.get("MSO_VERIFY_SEARCH_SHAPES") == "1"
_CACHE_MAX = 512
_caches: weakref.WeakKeyDictionary[SearchRegistry, dict[Hashable, Compiled]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


class Slots:
    """A binder (see :func:`~fhir_server.search.types.base.to_sql`) naming values in order."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, value: Any, column: Any) -> BindParameter[Any]:
        name = f"sv_{self.count}"
        self.count += 1
        return bindparam(name, value, type_=column.type)


def page_statement(
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    *,
    limit: int | None,
    position: Position | None,
    max_pid: int | None,
    columns: Sequence[str],
) -> tuple[Compiled, dict[str, Any] | None]:
    """The compiled page (see :func:`compile_search`) and the parameters to execute it with
    (``None``: the statement carries its own values)."""
    later_page = position is not None or max_pid is not None
    shape = None if later_page else shape_of(query, options, limit, columns)
    if shape is None:
        compiled = compile_search(
            registry, query, options, limit=limit, position=position, max_pid=max_pid,
            columns=columns,
        )  # fmt: skip
        return compiled, None
    key, values = shape
    params = {f"sv_{i}": v for i, v in enumerate(values)}
    cache = _cache_of(registry)
    compiled = cache.get(key)
    if compiled is None:
        slots = Slots()
        compiled = compile_search(
            registry, query, dataclasses.replace(options, binder=slots), limit=limit,
            columns=columns,
        )  # fmt: skip
        if slots.count != len(values):
            raise AssertionError(f"search shape bound {slots.count} values, expected {values}")
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = compiled
    elif VERIFY:
        _verify(registry, query, options, limit, columns, compiled, params)
    return compiled, params


def _cache_of(registry: SearchRegistry) -> dict[Hashable, Compiled]:
    cache = _caches.get(registry)
    if cache is None:
        with _lock:
            cache = _caches.setdefault(registry, {})
    return cache


def shape_of(
    query: SearchQuery,
    options: CompileOptions,
    limit: int | None,
    columns: Sequence[str],
) -> tuple[Hashable, list[Any]] | None:
    """(shape key, values in binding order) of a first-page query that can reuse a statement,
    else ``None``. Raises what the compiler raises for a malformed value."""
    if options.extra:
        return None
    access_key = None
    if options.access_filter is not None:
        access_key = getattr(options.access_filter, "cache_key", None)
        if access_key is None:
            return None
    values: list[Any] = []
    parts = []
    for clause in query.clauses:
        part = _clause_shape(options, query.types, clause, values)
        if part is None:
            return None
        parts.append(part)
    sort = tuple((key.code, key.descending) for key in query.sort)
    key = (query.types, access_key, tuple(parts), sort, limit, tuple(columns), options.index_driven)
    return key, values


def _clause_shape(
    options: CompileOptions, types: tuple[str, ...], clause: Clause, values: list[Any]
) -> Hashable | None:
    """The shape of one criterion, its values appended to ``values``; ``None``: not plain.

    Mirrors the dispatch of :func:`~fhir_server.search.compile.clause_condition`.
    """
    code, modifier = clause.code, clause.modifier
    if clause.has is not None or clause.filter is not None or clause.chain is not None:
        return None
    if modifier == "missing" or code in ("_lastUpdated", "_list"):
        return None
    if code == "_id":
        ids = id_values(clause)
        values.extend(ids)
        return (code, modifier, len(ids))
    if code in special.CODES:
        pred = text_predicate(clause)
        values.extend(bound_values(pred))
        return (code, modifier, pred_shape(pred))
    param = clause.param
    if param is None or param.type == "composite":
        return None
    if len(types) > 1 and len({param.identity(t) for t in types}) > 1:
        return None
    criterion = plain_criterion(options, param, param.identity(types[0]), clause)
    for _table, pred in criterion.tables:
        values.extend(bound_values(pred))
    return (
        code,
        modifier,
        criterion.negate,
        tuple((table, pred_shape(pred)) for table, pred in criterion.tables),
    )


def _verify(
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    limit: int | None,
    columns: Sequence[str],
    reused: Compiled,
    params: dict[str, Any],
) -> None:
    """Fail unless the reused statement with ``params`` is the one compiled from scratch."""
    fresh = compile_search(registry, query, options, limit=limit, columns=columns)
    dialect = sqlite.dialect()
    ours = explain(reused.statement.params(params), dialect)
    theirs = explain(fresh.statement, dialect)
    if ours != theirs:
        raise AssertionError(f"reused search statement differs:\n{ours}\n---\n{theirs}")
