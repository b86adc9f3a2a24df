"""The export's side of the HTTP exchanges: kick-off, status, cancel and download
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html#bulk-data-kick-off-request).

A job belongs to the client that started it (a backend client by its id, a user by name):
only that client sees its status, cancels it or downloads its files; to anyone else it does
not exist (404, never 403, so job ids reveal nothing). Which types the caller may export is
read from its token's scopes here; which resources, by the access policy when the job runs.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import Engine

from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import Permission
from fhir_server.bulk import jobs
from fhir_server.bulk.files import OutputStore
from fhir_server.bulk.manifest import RETRY_AFTER_SECONDS
from fhir_server.bulk.request import ExportRequest, bulk_error
from fhir_server.config import Settings
from fhir_server.fhir.outcome import FhirError


def client_key(caller: Principal) -> str:
    """Whose jobs a caller sees: a backend client's, or a user's."""
    if caller.role is Role.SYSTEM:
        return f"client:{caller.client_id or caller.subject}"
    return f"user:{caller.subject}"


def check_scopes(caller: Principal, request: ExportRequest) -> None:
    """403 when ``_type`` names a type the token may not read, or it may read none."""
    scopes = caller.scopes
    if request.types is not None:
        refused = [t for t in request.types if not scopes.grants(t, Permission.SEARCH)]
        if refused:
            raise bulk_error(
                403,
                f"The access token's scopes do not allow reading {', '.join(refused)}",
                "MSO-BULK-403",
                "_type",
            )
    elif scopes.types_for(Permission.SEARCH) == set():
        raise bulk_error(
            403, "The access token's scopes allow reading no resource type", "MSO-BULK-403"
        )


def start(
    engine: Engine,
    settings: Settings,
    caller: Principal,
    request: ExportRequest,
    request_url: str,
) -> str:
    """Queue an export for ``caller``; its job id. 429 when the client has too many."""
    job_id = str(uuid.uuid4())
    try:
        jobs.create(
            engine,
            job_id=job_id,
            client_key=client_key(caller),
            principal=caller.to_dict(),
            request=request.to_dict(),
            request_url=request_url,
            max_active=settings.bulk_max_jobs_per_client,
        )
    except jobs.TooManyJobs:
        error = bulk_error(
            429,
            f"This client already has {settings.bulk_max_jobs_per_client} exports queued or "
            "running: wait for one to finish, or cancel one",
            "MSO-BULK-429",
        )
        error.headers["Retry-After"] = str(max(RETRY_AFTER_SECONDS, 30))
        raise error from None
    return job_id


def job_of(engine: Engine, caller: Principal, job_id: str) -> jobs.Job:
    """The caller's job ``job_id``; 404 for an unknown, cancelled or another client's job."""
    job = jobs.get(engine, job_id)
    if (
        job is None
        or job.status is jobs.JobStatus.CANCELLED
        or job.client_key != client_key(caller)
    ):
        raise FhirError(404, "not-found", "No export job with this id", code="MSO-BULK-404")
    return job


def cancel(engine: Engine, settings: Settings, caller: Principal, job_id: str) -> None:
    """Cancel the caller's job and delete its files (a running job's worker stops)."""
    job_of(engine, caller, job_id)
    jobs.cancel(engine, job_id)
    OutputStore(settings.bulk_path).remove(job_id)


def output_file(
    engine: Engine, settings: Settings, caller: Principal, job_id: str, name: str
) -> Path:
    """The path of a file of the caller's completed job; 404 otherwise."""
    job = job_of(engine, caller, job_id)
    path = None
    if job.status is jobs.JobStatus.COMPLETED:
        listed = {
            item["name"]
            for listing in ("output", "deleted", "error")
            for item in (job.checkpoint or {}).get(listing, [])
        }
        if name in listed:
            path = OutputStore(settings.bulk_path).path(job_id, name)
    if path is None:
        raise FhirError(404, "not-found", "No such file in this export", code="MSO-BULK-404F")
    return path


def require_principal(caller: object) -> Principal:
    """The authenticated caller of an export request (exports are always someone's)."""
    if not isinstance(caller, Principal):
        raise FhirError(401, "login", "A bulk export needs an access token", code="MSO-BULK-401")
    return caller
