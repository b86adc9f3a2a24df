"""What the status endpoint says of a job: progress while it runs, the manifest when it is done
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html#response---complete-status).
"""

from __future__ import annotations

from typing import Any

from fhir_server.bulk.jobs import Job, JobStatus
from fhir_server.storage.records import format_instant

RETRY_AFTER_SECONDS = 2


def file_url(base_url: str, job_id: str, name: str) -> str:
    """The download URL of a job's file."""
    return f"{base_url}/_bulk/{job_id}/{name}"


def status_url(base_url: str, job_id: str) -> str:
    """The status URL of a job (the kick-off's ``Content-Location``)."""
    return f"{base_url}/_bulk/{job_id}"


def progress(job: Job) -> str:
    """The ``X-Progress`` text of a queued or running job (at most 100 characters)."""
    if job.status is JobStatus.QUEUED or job.estimate is None:
        return "queued"
    done = job.exported
    if job.estimate:
        percent = min(99, done * 100 // job.estimate)
        return f"{done} of about {job.estimate} resources exported ({percent}%)"
    return f"{done} resources exported"


def manifest(job: Job, base_url: str) -> dict[str, Any]:
    """The complete-status body of a finished job: its files with their counts."""
    state = job.checkpoint or {}

    def files(listing: str) -> list[dict[str, Any]]:
        return [
            {
                "type": item["type"],
                "url": file_url(base_url, job.id, item["name"]),
                "count": item["count"],
            }
            for item in state.get(listing, [])
        ]

    body: dict[str, Any] = {
        "transactionTime": format_instant(job.transaction_time),
        "request": job.request_url,
        "requiresAccessToken": True,
        "output": files("output"),
        "error": files("error"),
    }
    if job.request.get("since"):
        body["deleted"] = files("deleted")
    return body
