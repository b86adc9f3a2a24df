"""Index extraction: a resource -> its index rows, per table (http://hl7.org/fhir/R4/search.html).

Uses the per-type plan precompiled by the registry (which parameters apply, their compiled
paths), so a write evaluates only what applies to its type. Pure: no database.
"""

from __future__ import annotations

from typing import Any

from fhir_server.search.registry import SearchRegistry
from fhir_server.search.types import KINDS, composite, special

RowsByTable = dict[str, list[dict[str, Any]]]


def extract_rows(registry: SearchRegistry, resource: dict[str, Any]) -> RowsByTable:
    """Every index row of ``resource`` (without ``pid``), grouped by table name, each once.

    Rows of different parameters (or composite groups) never coincide: they differ in
    ``hash_identity`` (or ``grp``), and each type's extractor gives a repeated value of one
    parameter one row.
    """
    rt = resource.get("resourceType", "")
    plan = registry.extractor(rt)
    out: RowsByTable = {}
    for param, path in plan.paths:
        nodes = path.evaluate(resource)
        if not nodes:
            continue
        for table, row in KINDS[param.type].extract(param, param.identity(rt), nodes):
            out.setdefault(table, []).append(row)
    for param, path, parts in plan.composites:
        identity = param.identity(rt)
        for grp, element in enumerate(path.evaluate(resource)[: composite.MAX_GROUPS], start=1):
            group: list[tuple[str, dict[str, Any]]] = []
            for index, (sub, sub_path) in enumerate(parts):
                nodes = sub_path.evaluate_relative(element) if sub.type in KINDS else []
                ident = composite.component_identity(identity, index)
                rows = KINDS[sub.type].extract(sub, ident, nodes, grp) if nodes else []
                if not rows:  # a composite value needs every component: no rows for this group
                    group = []
                    break
                group.extend(rows)
            for table, row in group:
                out.setdefault(table, []).append(row)
    for table, row in special.extract(resource):
        out.setdefault(table, []).append(row)
    return out
