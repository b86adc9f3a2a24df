"""Compile a :class:`~fhir_server.search.query.SearchQuery` into SQL (SQLAlchemy Core).

http://hl7.org/fhir/R4/search.html. The statement selects ``resource.pid`` (plus the sort
keys) of current, non-deleted resources: each criterion is ``pid IN (SELECT pid FROM idx_<type>
WHERE <hash / value predicate>)``, chains and ``_has`` join ``idx_reference`` to ``resource``
on (target_type, target_id), composites join their components' rows on (pid, grp). A page with
a single plain criterion can instead be driven from its index table (see "pages driven from one
index" below), for PostgreSQL connections that keep one generic plan per statement.

Paging is keyset paging (http://hl7.org/fhir/R4/http.html#paging): results are ordered by the
``_sort`` keys (missing values last) and then ``pid``; a page position is the key tuple of a
boundary row, never an OFFSET, and a snapshot bound (the largest pid when the search started)
keeps resources created while a client pages out of later pages.

Access control seam: :class:`CompileOptions.access_filter`, given the ``resource`` alias of the
rows being returned (matches and includes), returns an extra SQL condition ANDed into the
statement, so totals, paging and includes can never leak what the filter excludes.

Pure: no engine, no session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    Select,
    String,
    and_,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from fhir_server.search.hashing import hash64
from fhir_server.search.query import Clause, SearchQuery, SortKey
from fhir_server.search.registry import SearchParam, SearchRegistry
from fhir_server.search.types import KINDS, composite, date, special, table_for
from fhir_server.search.types.base import (
    All,
    Any_,
    Binder,
    Cmp,
    Const,
    Not,
    Pred,
    ValueContext,
    any_of,
    bad_value,
    to_sql,
)
from fhir_server.storage.index_schema import INDEX_TABLES, idx_reference, idx_text
from fhir_server.storage.schema import resource

TABLES = {t.name: t for t in INDEX_TABLES}
AccessFilter = Callable[[Any], ColumnElement[bool]]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HIGH_STR = "\U0010ffff"
# Shared aliases of the outer query (statements built from them get stable cache keys).
_R = resource.alias("r")
_R2 = resource.alias("r2")
_MAX_PID = select(func.max(resource.c.pid)).scalar_subquery().label("max_pid")


@dataclass(slots=True)
class CompileOptions:
    """What compilation needs besides the query.

    ``access_filter`` is the hook for access policy (see the module docstring);
    ``expand_valueset`` resolves ``:in`` / ``:not-in`` ValueSets to (system, code) pairs.
    """

    base_url: str | None = None
    expand_valueset: Callable[[str], Sequence[tuple[str | None, str | None]] | None] | None = None
    access_filter: AccessFilter | None = None
    now_ms: int | None = None
    extra: list[Callable[[Any], ColumnElement[bool]]] = field(default_factory=list)
    subsumption: Callable[[str, str, bool], Sequence[str] | None] | None = None
    binder: Binder | None = None  # names the values of plain criteria (see search.shapes)
    # PostgreSQL reads with a generic plan: a single equality criterion drives the page from
    # its index in pid order (see index_driven_criterion)
    index_driven: bool = False

    def value_context(self) -> ValueContext:
        """The part type modules see."""
        return ValueContext(
            self.base_url, self.expand_valueset, self.now_ms, subsumption=self.subsumption
        )


@dataclass(slots=True)
class Position:
    """A keyset position: the sort key values and pid of a boundary row."""

    keys: list[Any]
    pid: int
    backward: bool = False  # True: the page *before* this row


@dataclass(slots=True)
class Compiled:
    """A compiled search: the page statement and the parts the caller needs."""

    statement: Select[Any]
    sort_exprs: list[tuple[ColumnElement[Any], bool]]
    index_driven: bool = False  # the page is driven from one index (see index_driven_criterion)


def compile_search(
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    *,
    limit: int | None,
    position: Position | None = None,
    max_pid: int | None = None,
    columns: Sequence[str] = (),
) -> Compiled:
    """The page statement: ``SELECT pid, <sort keys>, <columns> … ORDER BY … LIMIT``.

    ``columns`` names further ``resource`` columns to return (the content, to save a query).
    They are fetched by an outer query for the page's pids only: the inner query finds and
    orders the page from the index tables (with a trusted index criterion it need not read
    ``resource`` rows at all: see :func:`base_conditions`).
    """
    backward = position is not None and position.backward
    driver = index_driven_criterion(registry, query, options) if options.index_driven else None
    if driver is not None:
        stmt = _index_driven_page(query, options, *driver, limit, position, max_pid)
        return Compiled(_with_columns(stmt, query, [], columns, max_pid, backward), [], True)
    r = _R
    where = base_conditions(registry, query, options, r, trust_index=bool(columns))
    if max_pid is not None:
        where.append(r.c.pid <= max_pid)
    sort_exprs = [(_sort_expr(key, query.types, r), key.descending) for key in query.sort]
    keys = [e.label(f"k{i}") for i, (e, _) in enumerate(sort_exprs)]
    stmt = select(r.c.pid, *keys).where(*where)
    if position is not None:
        stmt = stmt.where(_keyset(sort_exprs, r.c.pid, position))

    stmt = stmt.order_by(*_order(sort_exprs, [e for e, _ in sort_exprs], r.c.pid, backward))
    if limit is not None:
        stmt = stmt.limit(limit)
    return Compiled(_with_columns(stmt, query, sort_exprs, columns, max_pid, backward), sort_exprs)


def _order(
    sort_exprs: list[tuple[ColumnElement[Any], bool]], exprs: list[Any], pid: Any, backward: bool
) -> list[Any]:
    """ORDER BY ``exprs`` (in the directions of ``sort_exprs``), then ``pid``; all reversed
    when paging backward."""
    order = [
        e.desc() if desc != backward else e.asc()
        for e, (_, desc) in zip(exprs, sort_exprs, strict=True)
    ]
    order.append(pid.desc() if backward else pid.asc())
    return order


def _with_columns(
    stmt: Select[Any],
    query: SearchQuery,
    sort_exprs: list[tuple[ColumnElement[Any], bool]],
    columns: Sequence[str],
    max_pid: int | None,
    backward: bool,
) -> Select[Any]:
    """The page ``stmt`` (pid, sort keys) with the ``resource`` ``columns`` of its rows, fetched
    for the page's pids only, and the snapshot bound on a first page."""
    if not columns:
        return stmt
    page = stmt.subquery("page")
    r2 = _R2
    page_keys = [page.c[f"k{i}"] for i in range(len(sort_exprs))]
    snapshot = [_MAX_PID] if max_pid is None else []
    return (
        select(page.c.pid, *page_keys, *(r2.c[c] for c in columns), *snapshot)
        .select_from(page.join(r2, r2.c.pid == page.c.pid))
        .where(*_type_and_live(query.types, r2))
        .order_by(*_order(sort_exprs, page_keys, page.c.pid, backward))
    )


# -- pages driven from one index ----------------------------------------------------------------
#
# PostgreSQL plans a search anew each time it runs (custom plans): for the usual single-criterion
# search the planning costs several times the execution. A generic plan, made once per
# connection, would save that, but for ``pid IN (SELECT pid FROM idx WHERE hash = $1)`` the
# generic row estimate of a value is far off, and the plan then walks the primary key in order
# until the page is full: milliseconds for a rare value, growing with the table. A page driven
# from the criterion's index table has one good plan whatever the values: the matching pids,
# distinct and in pid order, come from the index (lazily when the index holds them in pid order,
# as for an equality, else sorted: only pids, read from the index alone), behind ``OFFSET 0``
# so that PostgreSQL cannot merge the two levels; each is then checked against its ``resource``
# row (type, liveness, access filter) in a correlated subquery, in pid order, until the page is
# full. Its cost is bounded by the number of matches, never by the size of ``resource``.


def index_driven_criterion(
    registry: SearchRegistry, query: SearchQuery, options: CompileOptions
) -> tuple[Any, Pred] | None:
    """(index table, predicate) when the page can be driven from one index table: one type, no
    ``_sort``, a single positive criterion on a type-specific parameter's own index rows in one
    table (token, string, date, reference, uri, quantity, number). Else ``None``."""
    if len(query.types) != 1 or query.sort or len(query.clauses) != 1 or options.extra:
        return None
    clause = query.clauses[0]
    if clause.chain is not None or clause.filter is not None or clause.code in _NOT_PLAIN:
        return None
    if not trusted_index_clause(registry, query.types, clause):
        return None
    param = clause.param
    assert param is not None
    if param.type == "composite":
        return None
    criterion = plain_criterion(options, param, param.identity(query.types[0]), clause)
    if criterion.negate or len(criterion.tables) != 1:
        return None
    name, pred = criterion.tables[0]
    return TABLES[name], pred


_NOT_PLAIN = frozenset({"_id", "_lastUpdated", "_list", *special.CODES})
_DRIVERS = {t.name: t.alias("t") for t in INDEX_TABLES}  # stable aliases: stable cache keys


def _index_driven_page(
    query: SearchQuery,
    options: CompileOptions,
    table: Any,
    pred: Pred,
    limit: int | None,
    position: Position | None,
    max_pid: int | None,
) -> Select[Any]:
    """``SELECT m.pid FROM (SELECT DISTINCT t.pid FROM <index> t WHERE <pred> ORDER BY t.pid
    OFFSET 0) m WHERE (SELECT true FROM resource r WHERE r.pid = m.pid AND <type, live,
    access>) ORDER BY m.pid LIMIT n``."""
    t = _DRIVERS[table.name]
    backward = position is not None and position.backward
    where = [to_sql(pred, t, options.binder)]
    if max_pid is not None:
        where.append(t.c.pid <= max_pid)
    if position is not None:
        where.append(_keyset([], t.c.pid, position))
    matches = (
        select(t.c.pid)
        .where(*where)
        .distinct()
        .order_by(t.c.pid.desc() if backward else t.c.pid.asc())
        .offset(literal_column("0"))  # a fence: the check below must run on these, in order
        .subquery("m")
    )
    r = _R
    visible = (
        select(true())
        .where(r.c.pid == matches.c.pid, *_type_and_live(query.types, r), *_access(options, r))
        .scalar_subquery()
    )
    stmt = (
        select(matches.c.pid)
        .where(visible)
        .order_by(matches.c.pid.desc() if backward else matches.c.pid.asc())
    )
    if limit is not None:
        # a constant (the page size is part of the query shape): a generic plan then knows it
        stmt = stmt.limit(literal_column(str(int(limit))))
    return stmt


def count_statement(
    registry: SearchRegistry, query: SearchQuery, options: CompileOptions, *, max_pid: int | None
) -> Select[Any]:
    """``SELECT count(*)`` over every match (``_total=accurate``)."""
    r = _R
    where = base_conditions(registry, query, options, r, trust_index=True)
    if max_pid is not None:
        where.append(r.c.pid <= max_pid)
    return select(func.count()).select_from(r).where(*where)


def _type_and_live(types: tuple[str, ...], r: Any) -> list[ColumnElement[bool]]:
    return [
        r.c.res_type == types[0] if len(types) == 1 else r.c.res_type.in_(types),
        r.c.deleted.is_(False),
    ]


def trusted_index_clause(registry: SearchRegistry, types: tuple[str, ...], clause: Clause) -> bool:
    """True when ``clause`` only matches live resources of ``types`` by construction.

    Index rows exist only for current, non-deleted resources and their hashes include the
    resource type, so a positive criterion on a type-specific parameter (plain, chained or
    composite) implies the type and liveness checks.
    """
    param = clause.param
    if param is None or clause.has is not None or param.resource_level:
        return False
    if clause.modifier in ("missing", "not", "not-in"):
        return False
    return len(types) == 1


def base_conditions(
    registry: SearchRegistry,
    query: SearchQuery,
    options: CompileOptions,
    r: Any,
    *,
    trust_index: bool = False,
) -> list[ColumnElement[bool]]:
    """Type, liveness, access filter and every criterion, on the ``resource`` alias ``r``.

    With ``trust_index`` the type and liveness conditions are left out when a criterion
    implies them (:func:`trusted_index_clause`), so PostgreSQL can answer from the index
    tables and the primary key alone; callers then re-check them on the rows they return.
    """
    types = query.types
    where: list[ColumnElement[bool]] = []
    if not (
        trust_index
        and options.access_filter is None
        and not options.extra
        and any(trusted_index_clause(registry, types, c) for c in query.clauses)
    ):
        where.extend(_type_and_live(types, r))
    if options.access_filter is not None:
        where.append(options.access_filter(r))
    for extra in options.extra:
        where.append(extra(r))
    for clause in query.clauses:
        where.append(clause_condition(registry, options, types, clause, r))
    return where


def matching_pids(
    registry: SearchRegistry, options: CompileOptions, types: tuple[str, ...], clause: Clause
) -> Select[Any]:
    """``SELECT pid`` of live ``types`` resources matching ``clause`` (chains, ``_has``).

    The access filter applies to them too: a criterion on a resource the caller may not see
    must not decide what the caller gets back.
    """
    t = resource.alias()
    return select(t.c.pid).where(
        t.c.res_type.in_(types),
        t.c.deleted.is_(False),
        *_access(options, t),
        clause_condition(registry, options, types, clause, t),
    )


def _access(options: CompileOptions, t: Any) -> list[ColumnElement[bool]]:
    """The access filter on alias ``t`` (empty when there is none)."""
    return [options.access_filter(t)] if options.access_filter is not None else []


def clause_condition(
    registry: SearchRegistry,
    options: CompileOptions,
    types: tuple[str, ...],
    clause: Clause,
    r: Any,
) -> ColumnElement[bool]:
    """The SQL condition of one criterion on the ``resource`` alias ``r``."""
    code = clause.code
    if clause.has is not None:
        return _has_condition(registry, options, types, clause, r)
    if clause.filter is not None:
        return _filter_condition(registry, options, types, clause.filter, r)
    if code == "_id":
        if clause.modifier == "missing":
            return false() if clause.values[0] == "true" else true()
        ids = id_values(clause)
        binder = options.binder
        cond = r.c.res_id.in_([binder(i, r.c.res_id) for i in ids] if binder else ids)
        return not_(cond) if clause.modifier == "not" else cond
    if code == "_lastUpdated":
        return or_(*(_last_updated(options, v, r) for v in clause.values))
    if code == "_list":
        return _list_condition(registry, options, clause, r)
    if code in special.CODES:
        pred = text_predicate(clause)
        cond = r.c.pid.in_(select(idx_text.c.pid).where(to_sql(pred, idx_text, options.binder)))
        return not_(cond) if clause.modifier == "not" else cond
    param = clause.param
    assert param is not None
    owners = {param.identity(t) for t in types}
    if len(owners) == 1 or len(types) == 1:
        return _typed_condition(registry, options, types[0], param, clause, r)
    return or_(
        *(
            and_(
                r.c.res_type == t,
                _typed_condition(registry, options, t, _param(registry, t, clause), clause, r),
            )
            for t in types
        )
    )


def _filter_condition(
    registry: SearchRegistry, options: CompileOptions, types: tuple[str, ...], node: Any, r: Any
) -> ColumnElement[bool]:
    if isinstance(node, Clause):
        return clause_condition(registry, options, types, node, r)
    parts = [_filter_condition(registry, options, types, c, r) for c in node.children]
    if node.op == "not":
        return not_(parts[0])
    return and_(*parts) if node.op == "and" else or_(*parts)


def _param(registry: SearchRegistry, rtype: str, clause: Clause) -> SearchParam:
    param = registry.get(rtype, clause.code)
    assert param is not None
    return param


def _typed_condition(
    registry: SearchRegistry,
    options: CompileOptions,
    rtype: str,
    param: SearchParam,
    clause: Clause,
    r: Any,
) -> ColumnElement[bool]:
    identity = param.identity(rtype)
    if clause.modifier == "missing":
        tables = _tables_of(param)
        present = or_(
            *(r.c.pid.in_(select(t.c.pid).where(t.c.hash_identity == identity)) for t in tables)
        )
        return not_(present) if clause.values[0] == "true" else present
    if clause.chain is not None:
        return _chain_condition(registry, options, rtype, param, clause, r)
    if param.type == "composite":
        return or_(*(_composite(registry, options, param, identity, v, r) for v in clause.values))
    criterion = plain_criterion(options, param, identity, clause)
    conds = [
        r.c.pid.in_(select(TABLES[name].c.pid).where(to_sql(pred, TABLES[name], options.binder)))
        for name, pred in criterion.tables
    ]
    cond = or_(*conds) if len(conds) > 1 else conds[0]
    return not_(cond) if criterion.negate else cond


@dataclass(frozen=True, slots=True)
class Criterion:
    """A plain criterion: one predicate per index table it reads (OR-ed), maybe negated."""

    tables: tuple[tuple[str, Pred], ...]
    negate: bool


def plain_criterion(
    options: CompileOptions, param: SearchParam, identity: int, clause: Clause
) -> Criterion:
    """The predicates of a criterion on a parameter's own index rows (no chain, composite or
    ``:missing``): each value's predicate from its type module, grouped by index table."""
    module = KINDS[param.type]
    vc = options.value_context()
    modifier = clause.modifier
    negate = modifier in ("not", "not-in")
    inner_modifier = {"not": None, "not-in": "in"}.get(modifier or "", modifier)
    if param.type == "reference" and clause.target_types and modifier and modifier[:1].isupper():
        inner_modifier = modifier
    if param.type != "token" and modifier == "not":
        raise bad_value(param.code, clause.values[0], ":not is only defined for token parameters")
    by_table: dict[str, list[Pred]] = {}
    for value in clause.values:
        table = table_for(param.type, inner_modifier)
        by_table.setdefault(table, []).append(
            module.predicate(param, identity, inner_modifier, value, vc)
        )
    return Criterion(tuple((t, any_of(*preds)) for t, preds in by_table.items()), negate)


def id_values(clause: Clause) -> list[str]:
    """The ids an ``_id`` criterion asks for."""
    return [_unescape(v) for v in clause.values]


def text_predicate(clause: Clause) -> Pred:
    """The ``idx_text`` predicate of a ``_text`` / ``_content`` criterion."""
    return any_of(*(special.predicate(clause.code, v) for v in clause.values))


def _tables_of(param: SearchParam) -> list[Any]:
    if param.type == "composite":
        return []
    tables = [TABLES[KINDS[param.type].TABLE]]
    return tables


def _chain_condition(
    registry: SearchRegistry,
    options: CompileOptions,
    rtype: str,
    param: SearchParam,
    clause: Clause,
    r: Any,
) -> ColumnElement[bool]:
    assert clause.chain is not None
    ref = idx_reference.alias()
    t = resource.alias()
    inner = clause_condition(registry, options, clause.target_types, clause.chain, t)
    sub = (
        select(ref.c.pid)
        .select_from(
            ref.join(t, and_(t.c.res_type == ref.c.target_type, t.c.res_id == ref.c.target_id))
        )
        .where(
            ref.c.hash_identity == param.identity(rtype),
            t.c.res_type.in_(clause.target_types),
            t.c.deleted.is_(False),
            *_access(options, t),
            inner,
        )
    )
    return r.c.pid.in_(sub)


def _has_condition(
    registry: SearchRegistry,
    options: CompileOptions,
    types: tuple[str, ...],
    clause: Clause,
    r: Any,
) -> ColumnElement[bool]:
    has = clause.has
    assert has is not None
    ref = idx_reference.alias()
    target = resource.alias()
    sources = matching_pids(registry, options, (has.type,), has.inner)
    sub = (
        select(target.c.pid)
        .select_from(
            ref.join(
                target,
                and_(target.c.res_type == ref.c.target_type, target.c.res_id == ref.c.target_id),
            )
        )
        .where(
            ref.c.hash_identity == has.ref.identity(has.type),
            target.c.res_type.in_(types),
            ref.c.pid.in_(sources),
        )
    )
    return r.c.pid.in_(sub)


def _list_condition(
    registry: SearchRegistry, options: CompileOptions, clause: Clause, r: Any
) -> ColumnElement[bool]:
    """``_list=id``: the resource is an item of List/id."""
    item = registry.get("List", "item")
    assert item is not None
    ref = idx_reference.alias()
    lst = resource.alias()
    members = (
        select(literal(1))
        .select_from(ref.join(lst, lst.c.pid == ref.c.pid))
        .where(
            lst.c.res_type == "List",
            lst.c.deleted.is_(False),
            *_access(options, lst),
            lst.c.res_id.in_([_unescape(v) for v in clause.values]),
            ref.c.hash_identity == item.identity("List"),
            ref.c.target_type == r.c.res_type,
            ref.c.target_id == r.c.res_id,
        )
        .exists()
    )
    return not_(members) if clause.modifier == "not" else members


def _composite(
    registry: SearchRegistry,
    options: CompileOptions,
    param: SearchParam,
    identity: int,
    value: str,
    r: Any,
) -> ColumnElement[bool]:
    values = composite.split_value(param, value)
    if len(values) != len(param.components):
        raise bad_value(
            param.code, value, f"expected {len(param.components)} components joined by $"
        )
    vc = options.value_context()
    aliases = []
    conds = []
    for index, (comp, text) in enumerate(zip(param.components, values, strict=True)):
        sub = registry.by_url(comp.definition)
        if sub is None or sub.type not in KINDS:
            raise bad_value(param.code, value, "unsupported composite component")
        ident = composite.component_identity(identity, index)
        table = TABLES[table_for(sub.type, None)].alias()
        conds.append(to_sql(KINDS[sub.type].predicate(sub, ident, None, text, vc), table))
        aliases.append(table)
    first = aliases[0]
    joined: Any = first
    for other in aliases[1:]:
        joined = joined.join(other, and_(other.c.pid == first.c.pid, other.c.grp == first.c.grp))
    return r.c.pid.in_(select(first.c.pid).select_from(joined).where(*conds))


def _unescape(value: str) -> str:
    from fhir_server.search.types.base import unescape

    return unescape(value)


def _last_updated(options: CompileOptions, value: str, r: Any) -> ColumnElement[bool]:
    from fhir_server.search.types.base import split_prefix

    prefix, text = split_prefix(value)
    try:
        low, high = date.date_range(text)
    except (ValueError, OverflowError):
        raise bad_value("_lastUpdated", value, "expected [prefix]date") from None
    pred = date.range_predicate(prefix, low, high, options.now_ms or date.now_ms())
    return _instant_sql(pred, r.c.last_updated)


def _instant_sql(pred: Pred, column: Any) -> ColumnElement[bool]:
    """Render a date range predicate where the target range is one instant (``column``)."""
    if isinstance(pred, Cmp):
        value = _EPOCH + timedelta(milliseconds=pred.value)
        return {
            "=": column == value, "!=": column != value, "<": column < value,
            "<=": column <= value, ">": column > value, ">=": column >= value,
        }[pred.op]  # fmt: skip
    if isinstance(pred, All):
        return and_(*(_instant_sql(p, column) for p in pred.preds))
    if isinstance(pred, Any_):
        return or_(*(_instant_sql(p, column) for p in pred.preds))
    if isinstance(pred, Not):
        return not_(_instant_sql(pred.pred, column))
    if isinstance(pred, Const):
        return true() if pred.value else false()
    raise TypeError(pred)


# -- sorting and keyset -----------------------------------------------------------------------


def _sort_expr(key: SortKey, types: tuple[str, ...], r: Any) -> ColumnElement[Any]:
    if key.code == "_id":
        return r.c.res_id
    if key.code == "_lastUpdated":
        return r.c.last_updated
    param = key.param
    assert param is not None
    module = KINDS[param.type]
    table = TABLES[module.TABLE].alias()
    column = table.c[module.SORT_COLUMN]
    agg = func.max(column) if key.descending else func.min(column)
    identities = {param.identity(t) for t in types}
    sub = (
        select(agg)
        .where(table.c.pid == r.c.pid, table.c.hash_identity.in_(identities))
        .scalar_subquery()
    )
    if isinstance(column.type, String) or column.type.python_type is str:
        missing: Any = "" if key.descending else _HIGH_STR
    elif isinstance(column.type, Float):
        missing = -1e300 if key.descending else 1e300
    else:
        missing = -(2**62) if key.descending else 2**62
    return func.coalesce(
        sub,
        literal(
            missing, type_=column.type if not isinstance(column.type, BigInteger) else BigInteger()
        ),
    )


def _keyset(
    sort_exprs: list[tuple[ColumnElement[Any], bool]], pid_col: Any, pos: Position
) -> ColumnElement[bool]:
    """Rows strictly after (or, going backward, before) ``pos`` in the result order."""
    items = [*sort_exprs, (pid_col, False)]
    values = [*pos.keys, pos.pid]
    ors = []
    for i, (expr, desc) in enumerate(items):
        after = desc == pos.backward  # ascending & forward -> greater
        cmp = expr > values[i] if after else expr < values[i]
        eqs = [items[j][0] == values[j] for j in range(i)]
        ors.append(and_(*eqs, cmp) if eqs else cmp)
    return or_(*ors)


def compartment_condition(
    registry: SearchRegistry,
    compartment_params: dict[str, list[str]],
    compartment_type: str,
    compartment_id: str | Sequence[str] | None,
    target_type: str,
) -> Callable[[Any], ColumnElement[bool]]:
    """A condition: the resource is in ``compartment_type/compartment_id``.

    http://hl7.org/fhir/R4/compartmentdefinition.html: a ``target_type`` resource is in the
    compartment when any of its listed reference parameters points at the compartment owner;
    ``{def}`` means the owner itself. ``compartment_id`` may also be several owners (in any
    of their compartments: a Group's members) or ``None`` (in some ``compartment_type``
    compartment: a Patient-level bulk export).
    """
    codes = compartment_params.get(target_type, [])
    ids = [compartment_id] if isinstance(compartment_id, str) else compartment_id

    def build(r: Any) -> ColumnElement[bool]:
        if ids is not None and not ids:
            return false()  # no owner: an empty Group
        conds: list[ColumnElement[bool]] = []
        if target_type == compartment_type:  # the owner is in its own compartment
            conds.append(true() if ids is None else r.c.res_id.in_(ids))
        identities = []
        for code in codes:
            if code == "{def}":
                continue
            param = registry.get(target_type, code)
            if param is not None and param.type == "reference":
                identities.append(param.identity(target_type))
        if identities:
            ref = idx_reference
            owner = [ref.c.target_type == compartment_type]
            if ids is not None:
                owner.append(
                    ref.c.target_id == ids[0] if len(ids) == 1 else ref.c.target_id.in_(ids)
                )
            conds.append(
                r.c.pid.in_(select(ref.c.pid).where(ref.c.hash_identity.in_(identities), *owner))
            )
        return or_(*conds) if conds else false()

    return build


def explain(statement: Select[Any], dialect: Any) -> str:
    """The SQL text of ``statement`` with literal values inlined (golden tests, debugging)."""
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def identity_of(owner: str, code: str) -> int:
    """hash_identity for an owner type and code (handy in tests and benches)."""
    return hash64(owner, code)
