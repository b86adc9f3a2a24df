"""``mso reindex [--type T]``: rebuild the search index rows of stored resources.

Needed after SearchParameters change (a new MSO parameter in ``profiles/``, an extraction
fix): index rows are computed at write time (http://hl7.org/fhir/R4/search.html), so existing
resources only gain rows for a new parameter when reindexed. The access policy's membership rows
(``access_scope`` / ``case_access``) are rebuilt with them. Works in batches of pids, one
transaction each with the batch's rows locked, so it can run beside a live server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import select

from fhir_server.storage import indexer
from fhir_server.storage.repository import StoredResource, as_utc
from fhir_server.storage.schema import resource

if TYPE_CHECKING:
    from fhir_server.storage.repository import Tx

BATCH = 500


def reindex(settings: Any, resource_type: str | None, *, batch: int = BATCH) -> int:
    """Re-extract the index rows of every current resource (of ``resource_type``, or all).

    Returns the number of resources reindexed.
    """
    from fhir_server.wiring import build_repository

    repo = build_repository(settings)
    done = 0
    last = 0
    try:
        while True:
            with repo.unit(write=True) as tx:
                stmt = (
                    select(
                        resource.c.pid,
                        resource.c.res_type,
                        resource.c.res_id,
                        resource.c.version,
                        resource.c.last_updated,
                        resource.c.content,
                    )
                    .where(resource.c.pid > last, resource.c.deleted.is_(False))
                    .order_by(resource.c.pid)
                    .limit(batch)
                    # a concurrent update of one of these resources waits for this batch (or
                    # this batch for it): otherwise the rows rewritten here could be those of
                    # the version it replaced
                    .with_for_update()
                )
                if resource_type:
                    stmt = stmt.where(resource.c.res_type == resource_type)
                rows = tx.conn.execute(stmt).all()
                reindex_rows(tx, rows)
            if not rows:
                return done
            done += len(rows)
            last = rows[-1].pid
    finally:
        repo.engine.dispose()


def reindex_rows(tx: Tx, rows: Sequence[Any]) -> None:
    """Rewrite the index and access rows of stored resources, one after the other in the
    order given, as their writes did. ``rows`` carry ``pid``, ``res_type``, ``res_id``,
    ``version``, ``last_updated`` and ``content`` of current, non-deleted versions."""
    registry, policy = tx.repo.registry, tx.repo.policy
    for row in rows:
        body = orjson.loads(row.content)
        meta = dict(body.get("meta") or {})
        meta["versionId"] = "reindex"  # never "1": diff against stored rows
        body["meta"] = meta
        indexer.write_index(tx.conn, registry, row.pid, row.res_type, body)
        if policy is not None:
            stored = StoredResource(
                row.pid, row.res_type, row.res_id, row.version,
                as_utc(row.last_updated), False, row.content, _parsed=body,
            )  # fmt: skip
            policy.index.on_write(tx, stored, created=False)
