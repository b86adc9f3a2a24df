"""``mso reindex [--type T]``: rebuild the search index rows of stored resources.

Needed after SearchParameters change (a new MSO parameter in ``profiles/``, an extraction
fix): index rows are computed at write time (http://hl7.org/fhir/R4/search.html), so existing
resources only gain rows for a new parameter when reindexed. Works in batches of pids, one
transaction each, so it can run beside a live server.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select

from fhir_server.search.registry import SearchRegistry
from fhir_server.storage import indexer
from fhir_server.storage.engine import WRITE_OPTION, build_engine
from fhir_server.storage.schema import resource

BATCH = 500


def reindex(settings: Any, resource_type: str | None, *, batch: int = BATCH) -> int:
    """Re-extract the index rows of every current resource (of ``resource_type``, or all).

    Returns the number of resources reindexed.
    """
    registry = SearchRegistry.load()
    engine = build_engine(settings.database_url)
    done = 0
    last = 0
    try:
        while True:
            with engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    stmt = (
                        select(resource.c.pid, resource.c.res_type, resource.c.content)
                        .where(resource.c.pid > last, resource.c.deleted.is_(False))
                        .order_by(resource.c.pid)
                        .limit(batch)
                    )
                    if resource_type:
                        stmt = stmt.where(resource.c.res_type == resource_type)
                    rows = conn.execute(stmt).all()
                    for row in rows:
                        body = orjson.loads(row.content)
                        meta = dict(body.get("meta") or {})
                        meta["versionId"] = "reindex"  # never "1": diff against stored rows
                        body["meta"] = meta
                        indexer.write_index(conn, registry, row.pid, row.res_type, body)
            if not rows:
                return done
            done += len(rows)
            last = rows[-1].pid
    finally:
        engine.dispose()
