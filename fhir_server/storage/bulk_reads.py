"""The reads of a bulk export that are not searches: what types exist, how many rows there are
about, which resources were deleted (https://hl7.org/fhir/uv/bulkdata/STU3/export.html).

Each runs on a unit of work (:class:`~fhir_server.storage.repository.Tx`) and, where it hands
out resources or ids, under the unit caller's access filter, like a search: a deleted resource
is listed only when the caller may see it (the rows its visibility is read from are those
kept after the delete, so a caller bound to an organization is told only of its own).
The resources themselves are read with :meth:`Tx.iter_search <.repository.Tx.iter_search>`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from fhir_server.storage.repository import Tx
from fhir_server.storage.schema import resource


@dataclass(frozen=True, slots=True)
class DeletedResource:
    """A resource deleted since an instant: its pid (for keyset paging), type, id and when."""

    pid: int
    res_type: str
    res_id: str
    last_updated: datetime


def snapshot_bound(tx: Tx) -> int:
    """The largest resource pid now: an export covers the resources up to it."""
    return int(tx.conn.execute(select(func.max(resource.c.pid))).scalar() or 0)


def present_types(tx: Tx, bound: int) -> list[str]:
    """The resource types with a current (not deleted) resource up to pid ``bound``, sorted."""
    stmt = (
        select(resource.c.res_type)
        .where(resource.c.pid <= bound, resource.c.deleted.is_(False))
        .group_by(resource.c.res_type)
        .order_by(resource.c.res_type)
    )
    return [row[0] for row in tx.conn.execute(stmt)]


def estimate(tx: Tx, types: Sequence[str], bound: int) -> int:
    """How many current resources of ``types`` there are up to pid ``bound``, before any
    access rule or criterion: the denominator of the export's progress."""
    if not types:
        return 0
    stmt = select(func.count()).where(
        resource.c.res_type.in_(list(types)),
        resource.c.pid <= bound,
        resource.c.deleted.is_(False),
    )
    return int(tx.conn.execute(stmt).scalar() or 0)


def iter_deleted(
    tx: Tx,
    types: Sequence[str],
    *,
    since: datetime,
    until: datetime | None,
    bound: int,
    after: int = 0,
    batch: int = 1000,
) -> Iterator[DeletedResource]:
    """The resources of ``types`` up to pid ``bound`` deleted at or after ``since`` (and at
    or before ``until``) that the unit's caller may see, in pid order after pid ``after``."""
    if not types:
        return
    r = resource.alias("deleted_resource")
    conditions = [
        r.c.res_type.in_(list(types)),
        r.c.deleted.is_(True),
        r.c.pid <= bound,
        r.c.last_updated >= since,
    ]
    if until is not None:
        conditions.append(r.c.last_updated <= until)
    access = tx.repo.search_access_filter(tx.caller)
    if access is not None:
        conditions.append(access(r))
    while True:
        stmt = (
            select(r.c.pid, r.c.res_type, r.c.res_id, r.c.last_updated)
            .where(*conditions, r.c.pid > after)
            .order_by(r.c.pid)
            .limit(batch)
        )
        rows = tx.conn.execute(stmt).all()
        for row in rows:
            yield DeletedResource(row.pid, row.res_type, row.res_id, row.last_updated)
        if len(rows) < batch:
            return
        after = rows[-1].pid
