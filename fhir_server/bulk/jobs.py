"""The export job queue: rows of ``bulk_job`` claimed by workers under leases.

https://hl7.org/fhir/uv/bulkdata/STU3/export.html describes the asynchronous pattern; this
module is how its jobs survive workers. A worker claims the oldest queued job, or a running one
whose lease has run out (its worker died), with ``SELECT … FOR UPDATE SKIP LOCKED`` on
PostgreSQL (on SQLite the claim is one ``BEGIN IMMEDIATE`` transaction). Each claim increments
``attempts``, which fences it: every later write of the worker names the attempt it holds, so
a worker whose job was taken over (or cancelled) finds its writes refused and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update

from fhir_server.storage.bulk_schema import bulk_job
from fhir_server.storage.engine import write_connection
from fhir_server.storage.records import as_utc, utc_now

_j = bulk_job.c


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(slots=True)
class Job:
    """A job row as the status endpoint and the workers see it."""

    id: str
    status: JobStatus
    client_key: str
    principal: dict[str, Any]
    request: dict[str, Any]
    request_url: str
    transaction_time: datetime
    created: datetime
    finished: datetime | None
    expires: datetime | None
    snapshot_pid: int | None
    attempts: int
    checkpoint: dict[str, Any] | None
    exported: int
    estimate: int | None
    error: str | None


def _job(row: Any) -> Job:
    return Job(
        id=row.id,
        status=JobStatus(row.status),
        client_key=row.client_key,
        principal=orjson.loads(row.principal),
        request=orjson.loads(row.request),
        request_url=row.request_url,
        transaction_time=as_utc(row.transaction_time),
        created=as_utc(row.created),
        finished=as_utc(row.finished) if row.finished else None,
        expires=as_utc(row.expires) if row.expires else None,
        snapshot_pid=row.snapshot_pid,
        attempts=row.attempts,
        checkpoint=orjson.loads(row.checkpoint) if row.checkpoint else None,
        exported=row.exported,
        estimate=row.estimate,
        error=row.error,
    )


class TooManyJobs(Exception):
    """The client already has as many queued or running jobs as it may."""


def create(
    engine: Engine,
    *,
    job_id: str,
    client_key: str,
    principal: dict[str, Any],
    request: dict[str, Any],
    request_url: str,
    max_active: int,
    now: datetime | None = None,
) -> None:
    """Queue a new job; :class:`TooManyJobs` when ``client_key`` has ``max_active`` already."""
    now = now or utc_now()
    active = select(func.count()).where(_j.client_key == client_key, _j.status.in_(ACTIVE))
    with write_connection(engine) as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            # one kick-off of a client at a time, so two cannot both pass the count
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (client_key,))
        if int(conn.execute(active).scalar() or 0) >= max_active:
            raise TooManyJobs(client_key)
        conn.execute(
            insert(bulk_job).values(
                id=job_id,
                status=JobStatus.QUEUED.value,
                client_key=client_key,
                principal=orjson.dumps(principal).decode(),
                request=orjson.dumps(request).decode(),
                request_url=request_url,
                transaction_time=now,
                created=now,
                attempts=0,
                exported=0,
            )
        )


def get(engine: Engine, job_id: str) -> Job | None:
    """The job ``job_id`` (any status), or ``None``."""
    with engine.connect() as conn:
        row = conn.execute(select(bulk_job).where(_j.id == job_id)).first()
    return _job(row) if row is not None else None


def claim(engine: Engine, *, owner: str, lease: float, now: datetime | None = None) -> Job | None:
    """Take the oldest queued job, or a running one whose lease expired, for ``lease`` seconds."""
    now = now or utc_now()
    claimable = or_(
        _j.status == JobStatus.QUEUED.value,
        and_(_j.status == JobStatus.RUNNING.value, _j.lease_until < now),
    )
    candidate = select(_j.id).where(claimable).order_by(_j.created, _j.id).limit(1)
    if engine.dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    stmt = (
        update(bulk_job)
        .where(_j.id == candidate.scalar_subquery(), claimable)
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_until=now + timedelta(seconds=lease),
            attempts=_j.attempts + 1,
        )
        .returning(*bulk_job.c)
    )
    with write_connection(engine) as conn, conn.begin():
        row = conn.execute(stmt).first()
    return _job(row) if row is not None else None


def _fenced(job: Job) -> Any:
    return and_(_j.id == job.id, _j.attempts == job.attempts, _j.status == JobStatus.RUNNING.value)


def save(
    engine: Engine,
    job: Job,
    *,
    lease: float,
    checkpoint: dict[str, Any] | None = None,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Renew ``job``'s lease, storing its ``checkpoint`` (and other columns) if given; False
    when the claim is no longer the worker's (taken over, or the job cancelled)."""
    now = now or utc_now()
    values["lease_until"] = now + timedelta(seconds=lease)
    if checkpoint is not None:
        values["checkpoint"] = orjson.dumps(checkpoint).decode()
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(update(bulk_job).where(_fenced(job)).values(**values)).rowcount == 1


def finish(
    engine: Engine,
    job: Job,
    *,
    checkpoint: dict[str, Any],
    exported: int,
    retention: float,
    now: datetime | None = None,
) -> bool:
    """``job`` completed: its files are downloadable for ``retention`` seconds."""
    now = now or utc_now()
    values = {
        "status": JobStatus.COMPLETED.value,
        "checkpoint": orjson.dumps(checkpoint).decode(),
        "exported": exported,
        "finished": now,
        "expires": now + timedelta(seconds=retention),
        "lease_owner": None,
        "lease_until": None,
    }
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(update(bulk_job).where(_fenced(job)).values(**values)).rowcount == 1


def fail(
    engine: Engine, job: Job, error: str, *, retention: float, now: datetime | None = None
) -> bool:
    """``job`` failed with ``error`` (a text without patient data)."""
    now = now or utc_now()
    values = {
        "status": JobStatus.FAILED.value,
        "error": error,
        "finished": now,
        "expires": now + timedelta(seconds=retention),
        "lease_owner": None,
        "lease_until": None,
    }
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(update(bulk_job).where(_fenced(job)).values(**values)).rowcount == 1


def cancel(engine: Engine, job_id: str, *, now: datetime | None = None) -> bool:
    """Mark ``job_id`` cancelled (whatever its status); False when it was already gone."""
    now = now or utc_now()
    stmt = (
        update(bulk_job)
        .where(_j.id == job_id, _j.status != JobStatus.CANCELLED.value)
        .values(status=JobStatus.CANCELLED.value, finished=now, expires=now)
    )
    with write_connection(engine) as conn, conn.begin():
        return conn.execute(stmt).rowcount == 1


def expired(engine: Engine, *, now: datetime | None = None) -> list[str]:
    """Ids of finished jobs past their retention (cancelled ones at once)."""
    now = now or utc_now()
    stmt = select(_j.id).where(_j.status.not_in(ACTIVE), _j.expires <= now)
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(stmt)]


def forget(engine: Engine, job_ids: list[str]) -> None:
    """Delete the rows of ``job_ids`` (their files are already removed)."""
    if not job_ids:
        return
    with write_connection(engine) as conn, conn.begin():
        conn.execute(delete(bulk_job).where(_j.id.in_(job_ids), _j.status.not_in(ACTIVE)))
