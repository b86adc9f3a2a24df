"""The status, cancel and download requests of a bulk export (Bulk Data Access IG 3.0.0,
https://hl7.org/fhir/uv/bulkdata/STU3/export.html#bulk-data-status-request and
#file-request).

``GET [base]/_bulk/{job}``: 202 with ``X-Progress`` and ``Retry-After`` while the job is queued
or running, 200 with the manifest when it is done, 500 with an OperationOutcome when it failed.
``DELETE [base]/_bulk/{job}``: 202, and the job and its files are gone. ``GET
[base]/_bulk/{job}/{file}``: the NDJSON file, streamed. Only the client that started the job
gets any of these; to another it does not exist.
"""

from __future__ import annotations

from fhir_server.bulk import service
from fhir_server.bulk.files import OutputStore
from fhir_server.bulk.jobs import JobStatus
from fhir_server.bulk.manifest import RETRY_AFTER_SECONDS, manifest, progress
from fhir_server.bulk.request import NDJSON
from fhir_server.fhir.jsonio import dumps
from fhir_server.fhir.outcome import FhirError, information
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import http_date


def status(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """The job's progress, its manifest, or why it failed."""
    caller = service.require_principal(ctx.caller)
    job = service.job_of(ctx.repo.engine, caller, req.resource_id or "")
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return FhirResponse(
            status=202,
            headers={"X-Progress": progress(job), "Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if job.status is JobStatus.FAILED:
        raise FhirError(500, "exception", job.error or "The export failed", code="MSO-BULK-500")
    headers = {"Expires": http_date(job.expires)} if job.expires else {}
    return FhirResponse(
        body=dumps(manifest(job, ctx.base_url)), media_type="application/json", headers=headers
    )


def cancel(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """Cancel the job and delete its files: 202."""
    caller = service.require_principal(ctx.caller)
    service.cancel(ctx.repo.engine, ctx.settings, caller, req.resource_id or "")
    return FhirResponse(status=202, resource=information("The export was cancelled"))


def download(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """One output file of a completed job, streamed."""
    caller = service.require_principal(ctx.caller)
    path = service.output_file(
        ctx.repo.engine, ctx.settings, caller, req.resource_id or "", req.file_name or ""
    )
    return FhirResponse(
        stream=OutputStore(ctx.settings.bulk_path).read(path),
        media_type=NDJSON,
        headers={"Content-Length": str(path.stat().st_size)},
    )
