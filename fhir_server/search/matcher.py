"""In-memory search matching (http://hl7.org/fhir/R4/search.html), without a database.

Evaluates a parsed :class:`~fhir_server.search.query.SearchQuery` against resources held in
memory, using the same extraction and the same per-type predicates as the SQL compiler (but
Python evaluation of them, and Python navigation for chains, ``_has`` and composites). Serves
as the oracle of the differential tests and for subscription-style matching.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from fhir_server.search.extract import RowsByTable, extract_rows
from fhir_server.search.query import Clause, SearchQuery
from fhir_server.search.registry import SearchParam, SearchRegistry
from fhir_server.search.types import KINDS, composite, date, special, table_for
from fhir_server.search.types.base import (
    Pred,
    ValueContext,
    any_of,
    evaluate,
    split_prefix,
    unescape,
)
from fhir_server.search.types.reference import TABLE as REF_TABLE


class MemoryStore:
    """Resources by (type, id) with their extracted index rows."""

    def __init__(self, registry: SearchRegistry, resources: Iterable[dict[str, Any]]) -> None:
        self.registry = registry
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.rows: dict[tuple[str, str], RowsByTable] = {}
        for res in resources:
            key = (res["resourceType"], res["id"])
            self.items[key] = res
            self.rows[key] = extract_rows(registry, res)

    def search(self, query: SearchQuery, vc: ValueContext | None = None) -> list[dict[str, Any]]:
        """Resources of ``query.types`` matching every clause."""
        vc = vc or ValueContext()
        return [
            res
            for key, res in self.items.items()
            if key[0] in query.types and all(self.matches(key, c, vc) for c in query.clauses)
        ]

    def matches(self, key: tuple[str, str], clause: Clause, vc: ValueContext) -> bool:
        """True when the resource ``key`` satisfies ``clause``."""
        rtype, rid = key
        rows = self.rows[key]
        res = self.items[key]
        code = clause.code
        if clause.filter is not None:
            return self._filter(key, clause.filter, vc)
        if clause.has is not None:
            has = clause.has
            identity = has.ref.identity(has.type)
            for other_key in self.items:
                if other_key[0] != has.type:
                    continue
                refs = [
                    r
                    for r in self.rows[other_key].get(REF_TABLE, [])
                    if r["hash_identity"] == identity
                    and r["target_type"] == rtype
                    and r["target_id"] == rid
                ]
                if refs and self.matches(other_key, has.inner, vc):
                    return True
            return False
        if code == "_id":
            if clause.modifier == "missing":
                return clause.values[0] != "true"
            hit = rid in {unescape(v) for v in clause.values}
            return not hit if clause.modifier == "not" else hit
        if code == "_lastUpdated":
            return any(_last_updated_match(res, v, vc) for v in clause.values)
        if code in special.CODES:
            pred = any_of(*(special.predicate(code, v) for v in clause.values))
            hit = any(evaluate(pred, r) for r in rows.get(special.TABLE, []))
            return not hit if clause.modifier == "not" else hit
        if code == "_list":
            raise NotImplementedError("_list needs List resources; not in the matcher")
        param = clause.param
        assert param is not None
        param = self.registry.get(rtype, code) or param
        identity = param.identity(rtype)
        if clause.modifier == "missing":
            table = KINDS[param.type].TABLE
            present = any(r["hash_identity"] == identity for r in rows.get(table, []))
            return not present if clause.values[0] == "true" else present
        if clause.chain is not None:
            for r in rows.get(REF_TABLE, []):
                if r["hash_identity"] != identity or r["target_type"] not in clause.target_types:
                    continue
                target = (r["target_type"], r["target_id"])
                if target in self.items and self.matches(target, clause.chain, vc):
                    return True
            return False
        if param.type == "composite":
            return any(self._composite(rows, param, identity, v, vc) for v in clause.values)
        modifier = clause.modifier
        negate = modifier in ("not", "not-in")
        inner = {"not": None, "not-in": "in"}.get(modifier or "", modifier)
        module = KINDS[param.type]
        hit = False
        for value in clause.values:
            pred = module.predicate(param, identity, inner, value, vc)
            table = table_for(param.type, inner)
            if any(evaluate(pred, r) for r in rows.get(table, [])):
                hit = True
                break
        return not hit if negate else hit

    def _filter(self, key: tuple[str, str], node: Any, vc: ValueContext) -> bool:
        if isinstance(node, Clause):
            return self.matches(key, node, vc)
        results = [self._filter(key, c, vc) for c in node.children]
        if node.op == "not":
            return not results[0]
        return all(results) if node.op == "and" else any(results)

    def _composite(
        self, rows: RowsByTable, param: SearchParam, identity: int, value: str, vc: ValueContext
    ) -> bool:
        values = composite.split_value(param, value)
        groups: set[int] | None = None
        for index, (comp, text) in enumerate(zip(param.components, values, strict=True)):
            sub = self.registry.by_url(comp.definition)
            assert sub is not None
            pred: Pred = KINDS[sub.type].predicate(
                sub, composite.component_identity(identity, index), None, text, vc
            )
            found = {r["grp"] for r in rows.get(table_for(sub.type, None), []) if evaluate(pred, r)}
            groups = found if groups is None else groups & found
        return bool(groups)


def _last_updated_match(res: dict[str, Any], value: str, vc: ValueContext) -> bool:
    stamp = (res.get("meta") or {}).get("lastUpdated")
    if not stamp:
        return False
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC)
    ms = int(when.timestamp() * 1000)
    prefix, text = split_prefix(value)
    low, high = date.date_range(text)
    pred = date.range_predicate(prefix, low, high, vc.now_ms or date.now_ms())
    return evaluate(pred, {"low": ms, "high": ms})
