"""The FHIR Tasks the gateway works (``import-priors``, ``deidentify-imaging``): claiming one and
closing it, shared by :mod:`dicom_gateway.priors` and :mod:`dicom_gateway.deidentify_task`.

A Task is claimed by moving it from ``requested`` to ``in-progress`` with ``If-Match`` (of two
gateways polling the same server one wins, the other gets a 412 and leaves it), shows its
progress in ``businessStatus`` while it is worked, and is closed as ``completed`` or ``failed``
(FHIR R4 Task state machine, http://hl7.org/fhir/R4/task.html#statemachine), re-reading its
version when someone else touched it meanwhile. A Task left ``in-progress`` without a change
for :data:`TASK_LEASE_SECONDS` (its gateway was killed) is claimed again and worked from the
start: the work is repeatable (C-MOVE again, the same de-identified copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from dicom_gateway.fhir_client import FhirClientError
from dicom_gateway.study_sync import is_transient

log = logging.getLogger(__name__)

TASK_CODE_SYSTEM = "https://mso.example.org/fhir/CodeSystem/task-code"
"""The server's ``fhir_server.codes.TASK_CODE_SYSTEM`` (kept equal by a unit test)."""
CLOSE_TRIES = 3
TASK_LEASE_SECONDS = 900.0
"""An ``in-progress`` Task unchanged this long is taken to have lost its gateway."""


class TaskClient(Protocol):
    """What claiming and closing needs of :class:`~dicom_gateway.fhir_client.FhirClient`."""

    def search(self, res_type: str, params: Any) -> list[dict[str, Any]]: ...

    def read(self, res_type: str, res_id: str) -> dict[str, Any]: ...

    def update(self, resource: dict[str, Any], *, if_match: str | None = None) -> Any: ...


def text(value: str) -> dict[str, str]:
    """A text-only CodeableConcept (``businessStatus``, ``statusReason``, ``output.type``)."""
    return {"text": value}


def claim(fhir: TaskClient, task: dict[str, Any], doing: str) -> dict[str, Any] | None:
    """``task`` moved to ``in-progress`` (business status ``doing``), or ``None`` when another
    gateway claimed it first."""
    task = {**task, "status": "in-progress", "businessStatus": text(doing)}
    try:
        return fhir.update(task, if_match=(task.get("meta") or {}).get("versionId"))
    except FhirClientError as exc:
        if exc.status == 412:
            return None
        raise


def progress(fhir: TaskClient, task: dict[str, Any], business_status: str) -> dict[str, Any]:
    """Show ``business_status`` on the Task being worked (also what keeps its lease); the Task
    as stored, or as it was when the server could not take it (the work goes on)."""
    try:
        updated = {**task, "businessStatus": text(business_status)}
        return fhir.update(updated, if_match=(task.get("meta") or {}).get("versionId"))
    except FhirClientError as exc:
        log.warning("Task/%s: progress not recorded (HTTP %s)", task.get("id"), exc.status)
        return task


def close(
    fhir: TaskClient,
    task: dict[str, Any],
    status: str,
    business_status: str,
    *,
    output: list[dict[str, Any]] | None = None,
    reason: str | None = None,
) -> None:
    """Record ``status`` (completed / failed) with its outputs and reason."""
    done = {**task, "status": status, "businessStatus": text(business_status)}
    if output:
        done["output"] = output
    if reason:
        done["statusReason"] = text(reason)
    for _ in range(CLOSE_TRIES):
        try:
            fhir.update(done, if_match=(done.get("meta") or {}).get("versionId"))
            return
        except FhirClientError as exc:
            if exc.status != 412:
                raise
            current = fhir.read("Task", task["id"])
            done = {**done, "meta": current.get("meta")}
    log.error("Task/%s could not be closed", task["id"])


def work_requested(
    fhir: TaskClient,
    code: str,
    *,
    doing: str,
    work: Callable[[dict[str, Any]], None],
    what: str,
    lease: float = TASK_LEASE_SECONDS,
) -> int:
    """Claim (:func:`claim`, business status ``doing``) and work every ``requested`` Task of
    ``code``, and every ``in-progress`` one unchanged for ``lease`` seconds, oldest first; how
    many were worked. A server that cannot be reached pauses the pass (logged with ``what``),
    the next retries."""
    stale = datetime.now(UTC) - timedelta(seconds=lease)
    of_code = [("code", f"{TASK_CODE_SYSTEM}|{code}"), ("_sort", "_lastUpdated")]
    requested = [*of_code, ("status", "requested")]
    abandoned = [*of_code, ("status", "in-progress"), ("_lastUpdated", f"lt{stale.isoformat()}")]
    worked = 0
    try:
        for task in [*fhir.search("Task", requested), *fhir.search("Task", abandoned)]:
            claimed = claim(fhir, task, doing)
            if claimed is not None:
                work(claimed)
                worked += 1
    except FhirClientError as exc:
        if not is_transient(exc):
            raise
        log.warning("%s polling paused, will retry: %s", what, exc.code or exc.status)
    return worked
