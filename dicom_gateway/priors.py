"""Work the ``import-priors`` Tasks: find a case patient's prior studies in the hospital PACS
and retrieve them, linked to the case.

The server's ``ServiceRequest/[id]/$import-priors`` creates a Task (code task-code
``import-priors``, status requested; http://hl7.org/fhir/R4/task.html). :class:`PriorsWorker`
polls ``Task?code=…|import-priors&status=requested``, claims each by moving it to
``in-progress`` (``If-Match``: of two gateways one wins, the other gets a 412 and leaves it),
then

1. reads the case and its Patient, and takes the Patient's identifiers in the configured
   PatientID systems;
2. C-FINDs the PACS (DICOM PS3.4 C.4.1, Study Root, STUDY level) for each;
3. records the study -> case link for every study found *before* retrieving it;
4. C-MOVEs each study to the gateway's own AE (PS3.4 C.4.2); the instances come back through
   the SCP, the spool, Orthanc and the change feed, where the ImagingStudy sync links them;
5. completes the Task with ``output`` (studies found, studies retrieved, each
   StudyInstanceUID as ``valueIdentifier``), or fails it with a ``statusReason``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from dicom_gateway.fhir_client import FhirClient
from dicom_gateway.links import StudyLinks
from dicom_gateway.qr_scu import QueryError, RemoteAE, find_studies, move_study
from dicom_gateway.study_sync import (
    DICOM_UID_SYSTEM,
    PatientSystems,
    reference_id,
)
from dicom_gateway.tasks import close, progress, text, work_requested

log = logging.getLogger(__name__)

TASK_CODE_IMPORT_PRIORS = "import-priors"

Finder = Callable[..., list[str]]
Mover = Callable[..., bool]


def outputs(found: list[str], moved: list[str]) -> list[dict[str, Any]]:
    """``Task.output``: the counts, then each study found as a ``valueIdentifier``."""
    out: list[dict[str, Any]] = [
        {"type": text("studies-found"), "valueUnsignedInt": len(found)},
        {"type": text("studies-retrieved"), "valueUnsignedInt": len(moved)},
    ]
    for uid in found:
        kind = "study-retrieved" if uid in moved else "study-not-retrieved"
        identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
        out.append({"type": text(kind), "valueIdentifier": identifier})
    return out


class PriorsWorker:
    """Polls and works the import-priors Tasks (one thread)."""

    def __init__(
        self,
        *,
        fhir: FhirClient,
        links: StudyLinks,
        patients: PatientSystems,
        remote: str | None,
        aet: str,
        finder: Finder = find_studies,
        mover: Mover = move_study,
    ) -> None:
        self.fhir = fhir
        self.links = links
        self.patients = patients
        self.remote = remote
        self.aet = aet
        self.finder = finder
        self.mover = mover

    def poll_once(self) -> int:
        """Work every requested import-priors Task; how many were worked."""
        return work_requested(
            self.fhir,
            TASK_CODE_IMPORT_PRIORS,
            doing="querying the PACS",
            work=self._work,
            what="priors",
        )

    def _work(self, task: dict[str, Any]) -> None:
        try:
            found, moved, task = self._retrieve(task)
        except (QueryError, LookupError, ValueError, OSError) as exc:
            self._finish(task, "failed", reason=str(exc))
            return
        reason = None
        if len(moved) < len(found):
            reason = f"{len(found) - len(moved)} of {len(found)} studies could not be retrieved"
        self._finish(task, "failed" if reason else "completed", found, moved, reason)
        log.info(
            "Task/%s: %d prior studies found, %d retrieved", task["id"], len(found), len(moved)
        )

    def _retrieve(self, task: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
        """C-FIND, then C-MOVE each study found, the Task showing how far it got; the studies
        found, those retrieved, and the Task as last stored."""
        if not self.remote:
            raise LookupError("no hospital PACS is configured for the DICOM gateway")
        remote = RemoteAE.parse(self.remote)
        case_id = reference_id(task.get("focus"), "ServiceRequest")
        if not case_id:
            raise LookupError("the Task names no case ServiceRequest (Task.focus)")
        patient_id = reference_id(task.get("for"), "Patient") or reference_id(
            self.fhir.read("ServiceRequest", case_id).get("subject"), "Patient"
        )
        if not patient_id:
            raise LookupError("the case has no Patient")
        keys = self._patient_keys(self.fhir.read("Patient", patient_id))
        if not keys:
            raise LookupError("the Patient has no identifier in a configured PatientID system")
        found: list[str] = []
        for value, issuer in keys:
            for uid in self.finder(remote, calling_aet=self.aet, patient_id=value, issuer=issuer):
                if uid not in found:
                    found.append(uid)
        for uid in found:
            self.links.add(uid, case_id)
        task = progress(self.fhir, task, f"prior studies found: {len(found)}; retrieving")
        moved: list[str] = []
        for number, uid in enumerate(found, start=1):
            if self.mover(remote, calling_aet=self.aet, destination=self.aet, study_uid=uid):
                moved.append(uid)
            status = f"retrieving: {number} of {len(found)} asked for, {len(moved)} retrieved"
            task = progress(self.fhir, task, status)
        return found, moved, task

    def _patient_keys(self, patient: Mapping[str, Any]) -> list[tuple[str, str | None]]:
        """(PatientID, IssuerOfPatientID or None) for each identifier in a known system."""
        issuers = {system: issuer for issuer, system in self.patients.by_issuer.items()}
        keys: list[tuple[str, str | None]] = []
        for identifier in patient.get("identifier") or ():
            system, value = identifier.get("system"), identifier.get("value")
            if not value:
                continue
            if system == self.patients.default:
                keys.append((value, None))
            elif system in issuers:
                keys.append((value, issuers[system]))
        return keys

    def _finish(
        self,
        task: dict[str, Any],
        status: str,
        found: list[str] | None = None,
        moved: list[str] | None = None,
        reason: str | None = None,
    ) -> None:
        business = "retrieved" if status == "completed" else "failed"
        output = outputs(found or [], moved or [])
        close(self.fhir, task, status, business, output=output, reason=reason)
