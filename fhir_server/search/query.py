"""Query string -> intermediate form (http://hl7.org/fhir/R4/search.html#2.21.1).

``name[:modifier]=value[,value]`` repeated for AND; chains ``a:Type.b.c``; reverse chains
``_has:Type:ref:param``; result parameters ``_sort _count _include _revinclude _total
_summary _elements _type``. Unknown or malformed parameters become :class:`Issue` s; the
caller raises them (``Prefer: handling=strict``) or reports them in the Bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.search import budget
from fhir_server.search.budget import SearchLimits, limit_error
from fhir_server.search.registry import SearchParam, SearchRegistry
from fhir_server.search.types import KINDS
from fhir_server.search.types.base import split_escaped

RESULT_PARAMS = {
    "_sort", "_count", "_include", "_revinclude", "_total", "_summary", "_elements",
    "_contained", "_containedType", "_format", "_pretty", "_cursor", "_type", "_page",
}  # fmt: skip
RESOURCE_SPECIALS = {"_id", "_lastUpdated", "_text", "_content", "_list"}
SUMMARY_VALUES = {"true", "false", "count", "data", "text"}
TOTAL_VALUES = {"none", "estimate", "accurate"}
BAD_VALUE = "MSO-SEARCH-002"


@dataclass(slots=True)
class Clause:
    """One search criterion (AND-ed with the others); ``values`` are OR-ed, still escaped.

    ``param`` is ``None`` for the specials answered from the resource table (``_id``,
    ``_lastUpdated``, ``_list``, ``_text``, ``_content``). ``chain`` continues the criterion on
    the referenced resources (``target_types``); ``has`` is a reverse chain.
    """

    name: str
    code: str
    modifier: str | None = None
    values: list[str] = field(default_factory=list)
    param: SearchParam | None = None
    chain: Clause | None = None
    target_types: tuple[str, ...] = ()
    has: HasClause | None = None
    filter: Any = None  # a parsed _filter: tree of (Leaf -> Clause) and Node


@dataclass(slots=True)
class HasClause:
    """``_has:Type:ref:…``: resources of ``type`` whose ``ref`` points here and match ``inner``."""

    type: str
    ref: SearchParam
    inner: Clause


@dataclass(slots=True)
class SortKey:
    """One ``_sort`` key."""

    code: str
    descending: bool
    param: SearchParam | None  # None for _id / _lastUpdated


@dataclass(slots=True)
class Include:
    """One ``_include`` / ``_revinclude``: ``source:param[:target]``; ``*`` = every reference."""

    source: str
    param: str
    target: str | None
    iterate: bool
    reverse: bool


@dataclass(slots=True)
class Issue:
    """A parameter the server could not use."""

    name: str
    message: str
    code: str = "MSO-SEARCH-001"


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: criteria, result parameters and the problems found."""

    types: tuple[str, ...]
    clauses: list[Clause] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int | None = None
    includes: list[Include] = field(default_factory=list)
    total: str | None = None
    summary: str | None = None
    elements: list[str] | None = None
    cursor: str | None = None
    issues: list[Issue] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)  # what self links repeat


class _Bad(Exception):
    def __init__(self, message: str, code: str = "MSO-SEARCH-001") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def parse_query(
    registry: SearchRegistry,
    types: tuple[str, ...],
    params: list[tuple[str, str]],
    limits: SearchLimits | None = None,
) -> SearchQuery:
    """Parse ``params`` for a search over ``types`` (one type, or several for ``_type``).

    A search over ``limits`` (default: the current request's, see :mod:`.budget`) is a 400
    ``too-costly`` whatever the handling asked: it is refused before any value is checked.
    """
    limits = limits if limits is not None else budget.current_limits()
    query = SearchQuery(types=types)
    includes = criteria = 0
    asked: set[tuple[str, str]] = set()
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            # never dropped as lenient handling would: no value has a NUL, and a search that
            # ignored the criterion would answer more than was asked for
            raise FhirError(
                400,
                "invalid",
                "NUL characters are not allowed in search parameters",
                code=BAD_VALUE,
                expression=[name.replace("\x00", "")],
            )
        try:
            if name in RESULT_PARAMS or name.split(":")[0] in ("_include", "_revinclude"):
                if name.startswith(("_include", "_revinclude")):
                    includes += 1
                    _check_includes(includes, limits, name)
                _result_param(registry, query, name, value)
            else:
                clause = parse_clause(registry, types, name, value)
                criteria += 1
                check_limits(clause, limits, criteria - 1)
                check_values(registry, types, clause)
                if (name, value) not in asked:
                    # the same criterion again changes nothing, but would cost PostgreSQL's
                    # planner a semi-join more (200 of them: 18 s of planning)
                    asked.add((name, value))
                    query.clauses.append(clause)
                query.used.append((name, value))
        except _Bad as bad:
            query.issues.append(Issue(name, bad.message, bad.code))
        except FhirError as err:
            if err.issue_code == "too-costly":
                raise
            query.issues.append(Issue(name, err.message, err.code or "MSO-SEARCH-002"))
    return query


def _check_includes(count: int, limits: SearchLimits, name: str) -> None:
    if count > limits.max_includes:
        raise limit_error(
            budget.TOO_MANY_INCLUDES,
            f"More than {limits.max_includes} _include / _revinclude parameters",
            name,
        )


def check_limits(clause: Clause, limits: SearchLimits, before: int) -> None:
    """400 ``too-costly`` when ``clause``, after ``before`` criteria, makes the search exceed
    ``limits``: criteria (a ``_filter`` counts its leaves), OR-values, chain depth."""
    leaves = list(_leaves(clause))
    if before + len(leaves) > limits.max_criteria:
        raise limit_error(
            budget.TOO_MANY_CRITERIA,
            f"More than {limits.max_criteria} search criteria",
            clause.name,
        )
    for leaf, depth in leaves:
        if depth > limits.max_chain_depth:
            raise limit_error(
                budget.CHAIN_TOO_DEEP,
                f"More than {limits.max_chain_depth} chained or _has links in one criterion",
                leaf.name,
            )
        end = leaf
        while end.chain is not None or end.has is not None:
            end = end.chain if end.chain is not None else end.has.inner  # type: ignore[union-attr]
        if len(end.values) > limits.max_values:
            raise limit_error(
                budget.TOO_MANY_VALUES,
                f"More than {limits.max_values} values in one criterion",
                leaf.name,
            )


def _leaves(clause: Clause) -> Any:
    """(criterion, its chain depth) for ``clause``, or for each leaf of a ``_filter``."""
    if clause.filter is not None:
        stack = [clause.filter]
        while stack:
            node = stack.pop()
            if isinstance(node, Clause):
                yield from _leaves(node)
            else:
                stack.extend(node.children)
        return
    depth, link = 0, clause
    while link.chain is not None or link.has is not None:
        depth += 1
        link = link.chain if link.chain is not None else link.has.inner  # type: ignore[union-attr]
    yield clause, depth


def _result_param(registry: SearchRegistry, q: SearchQuery, name: str, value: str) -> None:
    if name == "_count":
        if not (value.isascii() and value.isdigit()):
            raise _Bad("_count must be a non-negative integer")
        q.count = int(value)
    elif name == "_sort":
        for key in value.split(","):
            key = key.strip()
            desc = key.startswith("-")
            code = key[1:] if desc else key
            if code in ("_id", "_lastUpdated"):
                q.sort.append(SortKey(code, desc, None))
                continue
            params = [registry.get(t, code) for t in q.types]
            if not code or any(p is None or p.type not in KINDS for p in params):
                raise _Bad(f"Unknown or unsortable _sort parameter '{code}'")
            q.sort.append(SortKey(code, desc, params[0]))
    elif name.startswith(("_include", "_revinclude")):
        q.includes.extend(parse_include(registry, q, name, value))
    elif name == "_total":
        if value not in TOTAL_VALUES:
            raise _Bad("_total must be one of none, estimate, accurate")
        q.total = value
    elif name == "_summary":
        if value not in SUMMARY_VALUES:
            raise _Bad(f"_summary must be one of {', '.join(sorted(SUMMARY_VALUES))}")
        q.summary = None if value == "false" else value
    elif name == "_elements":
        q.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif name in ("_cursor", "_page"):
        q.cursor = value
        return
    elif name == "_type":
        return
    # _format, _pretty, _contained: accepted; only some change the result
    if name not in ("_cursor",):
        q.used.append((name, value))


def parse_include(registry: SearchRegistry, q: SearchQuery, name: str, value: str) -> list[Include]:
    """Parse ``_include[:iterate]=Source:param[:Target]`` (``*`` allowed for the param)."""
    reverse = name.startswith("_revinclude")
    modifier = name.partition(":")[2]
    if modifier not in ("", "iterate", "recurse"):
        raise _Bad(f"Unknown modifier on {name}")
    iterate = modifier in ("iterate", "recurse")
    if value == "*":
        return [Include(t, "*", None, iterate, reverse) for t in q.types]
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise _Bad(f"{name} must be Source:param[:Target]")
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if code != "*":
        param = registry.get(source, code)
        if param is None or param.type != "reference":
            raise _Bad(f"{source}:{code} is not a reference search parameter")
    return [Include(source, code, target, iterate, reverse)]


def parse_clause(registry: SearchRegistry, types: tuple[str, ...], name: str, value: str) -> Clause:
    """Parse one criterion ``name=value`` for resources of ``types``."""
    if name.startswith("_has:"):
        return _parse_has(registry, types, name, value)
    if name == "_filter":
        return _parse_filter(registry, types, value)
    head, dot, rest = name.partition(".")
    code, _, modifier = head.partition(":")
    modifier = modifier or None
    values = split_escaped(value, ",")
    if code in RESOURCE_SPECIALS:
        if dot:
            raise _Bad(f"{code} cannot be chained")
        if code in ("_id", "_list", "_text", "_content") and modifier not in (
            None,
            "missing",
            "not",
        ):
            raise _Bad(f"Modifier :{modifier} is not supported on {code}")
        if code == "_lastUpdated" and modifier is not None:
            raise _Bad(f"Modifier :{modifier} is not supported on {code}")
        return Clause(name, code, modifier, values)
    params = [registry.get(t, code) for t in types]
    if not code or any(p is None for p in params):
        where = types[0] if len(types) == 1 else "/".join(types)
        raise _Bad(f"Unknown search parameter '{code}' for {where}")
    param = params[0]
    assert param is not None
    if param.type not in KINDS and param.type != "composite":
        raise _Bad(f"Search parameter '{code}' ({param.type}) is not supported")
    if modifier == "missing":
        if dot or value not in ("true", "false"):
            raise _Bad(f"{name} must be true or false")
        return Clause(name, code, modifier, [value], param)
    if dot:
        if param.type != "reference":
            raise _Bad(f"Only reference parameters can be chained, not '{code}'")
        targets = _targets(registry, param, modifier)
        chained_types = tuple(t for t in targets if _chain_known(registry, t, rest))
        if not chained_types:
            raise _Bad(f"Unknown chained parameter '{rest}' on {'/'.join(targets)}")
        inner = parse_clause(registry, chained_types, rest, value)
        return Clause(name, code, None, [], param, chain=inner, target_types=chained_types)
    if modifier and param.type == "reference" and modifier[:1].isupper():
        if param.target and modifier not in param.target:
            raise _Bad(f"{modifier} is not a target of '{code}'")
        return Clause(name, code, modifier, values, param, target_types=(modifier,))
    allowed = _modifiers(param)
    if modifier is not None and modifier not in allowed:
        raise _Bad(f"Modifier ':{modifier}' is not supported on '{code}' ({param.type})")
    if any(v == "" for v in values):
        raise _Bad(f"Empty value for '{code}'")
    return Clause(name, code, modifier, values, param)


def check_values(registry: SearchRegistry, types: tuple[str, ...], clause: Clause) -> None:
    """Reject malformed values now (so lenient searches can ignore just that parameter).

    Builds each value's predicate once (pure, cheap); ``:in`` / ``:not-in`` need the server's
    ValueSets and are checked when the query is compiled.
    """
    from fhir_server.search.types import composite
    from fhir_server.search.types.base import ValueContext, split_prefix
    from fhir_server.search.types.date import date_range

    if clause.has is not None:
        check_values(registry, (clause.has.type,), clause.has.inner)
        return
    if clause.chain is not None:
        check_values(registry, clause.target_types, clause.chain)
        return
    if clause.code == "_lastUpdated":
        for value in clause.values:
            try:
                date_range(split_prefix(value)[1])
            except (ValueError, OverflowError):
                raise _Bad("Invalid date for _lastUpdated", BAD_VALUE) from None
        return
    param = clause.param
    if param is None or clause.modifier in ("missing", "in", "not-in", "above", "below"):
        return
    vc = ValueContext()
    try:
        for value in clause.values:
            if param.type == "composite":
                parts = composite.split_value(param, value)
                if len(parts) != len(param.components):
                    raise _Bad(
                        f"{param.code} needs {len(param.components)} components joined by $",
                        BAD_VALUE,
                    )
                for comp, part in zip(param.components, parts, strict=True):
                    sub = registry.by_url(comp.definition)
                    if sub is not None and sub.type in KINDS:
                        KINDS[sub.type].predicate(sub, 0, None, part, vc)
                continue
            modifier = None if clause.modifier == "not" else clause.modifier
            KINDS[param.type].predicate(param, 0, modifier, value, vc)
    except FhirError as err:
        raise _Bad(err.message, err.code or BAD_VALUE) from None


def _modifiers(param: SearchParam) -> tuple[str, ...]:
    if param.type == "composite":
        return ("missing",)
    return KINDS[param.type].MODIFIERS


def _targets(registry: SearchRegistry, param: SearchParam, modifier: str | None) -> tuple[str, ...]:
    if modifier:
        if param.target and modifier not in param.target:
            raise _Bad(f"{modifier} is not a target of '{param.code}'")
        return (modifier,)
    return param.target or tuple(sorted(registry.resource_types))


def _chain_known(registry: SearchRegistry, rtype: str, rest: str) -> bool:
    if rest.startswith("_has:"):
        return True
    code = rest.partition(".")[0].partition(":")[0]
    return code in RESOURCE_SPECIALS or registry.get(rtype, code) is not None


def _parse_has(registry: SearchRegistry, types: tuple[str, ...], name: str, value: str) -> Clause:
    parts = name.split(":", 3)
    if len(parts) != 4:
        raise _Bad(f"{name} must be _has:Type:reference:parameter")
    _, rtype, ref_code, rest = parts
    ref = registry.get(rtype, ref_code)
    if ref is None or ref.type != "reference":
        raise _Bad(f"'{ref_code}' is not a reference search parameter of {rtype}")
    if ref.target and not set(types) & set(ref.target):
        raise _Bad(f"{rtype}:{ref_code} cannot point at {'/'.join(types)}")
    inner = parse_clause(registry, (rtype,), rest, value)
    return Clause(name, "_has", None, [], None, has=HasClause(rtype, ref, inner))


def _parse_filter(registry: SearchRegistry, types: tuple[str, ...], value: str) -> Clause:
    from fhir_server.search import filter as filt

    param_types = {code: p.type for code, p in registry.params_for(types[0]).items()}
    try:
        tree = filt.parse_filter(value, param_types)
    except filt.FilterError as err:
        raise _Bad(str(err), BAD_VALUE) from None

    def convert(node: Any) -> Any:
        if isinstance(node, filt.Leaf):
            clause = parse_clause(registry, types, node.name, node.value)
            check_values(registry, types, clause)
            return clause
        return filt.Node(node.op, [convert(c) for c in node.children])

    return Clause("_filter", "_filter", None, [value], filter=convert(tree))
