"""Work the ``deidentify-imaging`` Tasks: a de-identified copy of a study, linked to its case.

The server's ``ImagingStudy/[id]/$deidentify`` creates a Task (code task-code
``deidentify-imaging``, status requested; http://hl7.org/fhir/R4/task.html).
:class:`DeidentifyWorker` polls ``Task?code=…|deidentify-imaging&status=requested`` (and those a
killed gateway left ``in-progress``: :mod:`dicom_gateway.tasks`), claims each by moving it to
``in-progress`` (``If-Match``: of two gateways one wins), then

1. reads the focus ImagingStudy and takes its StudyInstanceUID (identifier
   ``urn:dicom:uid|urn:oid:<uid>``);
2. finds the study in Orthanc (``POST /tools/lookup``) and downloads every instance
   (``GET /instances/{id}/file``);
3. de-identifies each with DICOM PS3.15 Annex E, Basic Application Level Confidentiality
   Profile (:mod:`dicom_gateway.deidentify`), one :class:`~dicom_gateway.deidentify.UidMap` and
   one pseudonym for the whole study, into a temporary folder — an instance with Burned In
   Annotation fails the Task before anything is sent. The new UIDs and the pseudonym are keyed
   derivations of the Task's id (HMAC with the gateway's own secret), so a Task worked again
   makes the same copy: Orthanc takes its instances as already stored;
4. stores the reversal mapping (original <-> new UIDs, SHA-256 of the original PatientID and
   name <-> the pseudonym, the Patient) as a FHIR Binary ``deid-map-<Task id>`` (PUT: one per
   Task, whatever the retries) **without** ``securityContext``: the
   access policy then shows it only to administrators and organization-less system clients
   (the gateway itself), never to a case's requester or provider;
5. records the link new StudyInstanceUID -> the case (:class:`~dicom_gateway.links.StudyLinks`)
   and puts every instance through the spool (``Spool.put_bytes``), so the copy reaches Orthanc
   by the path of any received study and the ImagingStudy sync writes its ImagingStudy
   ``basedOn`` the case (its subject from the case: the pseudonym matches no Patient);
6. completes the Task with ``output`` (the new StudyInstanceUID as ``valueIdentifier``, the
   mapping as ``valueReference``) or fails it with a ``statusReason``.

Logs name resource ids and counts only: no UID, name or identifier of a patient.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from orthanc_api_client import exceptions as api_errors
from pydicom.errors import InvalidDicomError

from dicom_gateway.deidentify import (
    BurnedInAnnotation,
    Deidentified,
    PatientEntry,
    Profile,
    UidMap,
    deidentify,
    keyed_uid,
    load_profile,
)
from dicom_gateway.fhir_client import FhirClientError
from dicom_gateway.orthanc import OrthancClient, OrthancRejected, OrthancUnavailable
from dicom_gateway.study_sync import DICOM_UID_SYSTEM, reference_id
from dicom_gateway.tasks import (
    CLOSE_TRIES,
    TASK_LEASE_SECONDS,
    close,
    text,
    work_requested,
)
from dicom_gateway.uploads import SpoolLike

log = logging.getLogger(__name__)

TASK_CODE_DEIDENTIFY = "deidentify-imaging"
MAPPING_CONTENT_TYPE = "application/json"
PSEUDONYM_PREFIX = "MSO-ANON-"
# the server's fhir_server.codes.SECURITY_LABEL_SYSTEM / WITHHELD_FROM_PROVIDER (asserted equal
# by tests/unit/test_deidentify.py: the gateway does not import the server)
SECURITY_LABEL_SYSTEM = "https://mso.example.org/fhir/CodeSystem/security-label"
WITHHELD_FROM_PROVIDER = "withheld-from-provider"
REPLACE_INPUT = "replace"


class FhirLike(Protocol):
    """What the worker needs of :class:`dicom_gateway.fhir_client.FhirClient`."""

    def search(self, res_type: str, params: Any) -> list[dict[str, Any]]: ...

    def read(self, res_type: str, res_id: str) -> dict[str, Any]: ...

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> dict[str, Any]: ...

    def update(
        self, resource: Mapping[str, Any], *, if_match: str | None = None
    ) -> dict[str, Any]: ...


class LinksLike(Protocol):
    """What the worker needs of :class:`dicom_gateway.links.StudyLinks`."""

    def add(self, study_uid: str, case_id: str) -> None: ...


class TaskFailed(Exception):
    """The Task cannot be done; the message becomes its ``statusReason`` (no patient data)."""


@dataclass(frozen=True)
class Copy:
    """The de-identified study waiting in a temporary folder."""

    study_uid: str
    files: list[tuple[Path, str]]  # (file, new SOPInstanceUID)
    uid_map: UidMap
    patient: PatientEntry


def keyed_pseudonym(secret: bytes, task_id: str) -> str:
    """The pseudonym of the patient's name and ID in the copy a Task makes (the same when the
    Task is worked again; nothing links it to the patient without ``secret``)."""
    digest = hmac.new(secret, f"{task_id}|pseudonym".encode(), hashlib.sha256).hexdigest()
    return f"{PSEUDONYM_PREFIX}{digest[:12].upper()}"


def mapping_id(task_id: str) -> str:
    """The id of a Task's mapping Binary (written with PUT: once, whatever the retries)."""
    return f"deid-map-{task_id}"[:64]


def mapping_document(
    *, task: Mapping[str, Any], study_ref: str, copy: Copy, subject: str | None
) -> dict[str, Any]:
    """The reversal mapping stored as the Binary's content (JSON)."""
    return {
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "method": {"system": "DCM", "code": "113100"},
        "task": f"Task/{task['id']}",
        "original": study_ref,
        "subject": subject,
        "studyInstanceUid": {"original": _original_of(copy), "new": copy.study_uid},
        "patient": {
            "pseudonym": copy.patient.pseudonym,
            "patientIdSha256": copy.patient.patient_id_sha256,
            "patientNameSha256": copy.patient.patient_name_sha256,
        },
        "uids": [{"original": old, "new": new} for old, new in copy.uid_map],
    }


def _original_of(copy: Copy) -> str | None:
    return copy.uid_map.reverse().get(copy.study_uid)


def outputs(study_uid: str, mapping_id: str) -> list[dict[str, Any]]:
    """``Task.output``: the copy's StudyInstanceUID and the mapping Binary."""
    identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}
    return [
        {"type": text("deidentified-study"), "valueIdentifier": identifier},
        {"type": text("mapping"), "valueReference": {"reference": f"Binary/{mapping_id}"}},
    ]


def asks_replace(task: Mapping[str, Any]) -> bool:
    """The Task asks that the original be withheld from providers (input ``replace``)."""
    return any(
        (i.get("type") or {}).get("text") == REPLACE_INPUT and i.get("valueBoolean") is True
        for i in task.get("input") or ()
    )


def study_uid_of(study: Mapping[str, Any]) -> str | None:
    """The StudyInstanceUID in an ImagingStudy's ``urn:dicom:uid`` identifier."""
    for identifier in study.get("identifier") or ():
        value = str((identifier or {}).get("value") or "")
        if identifier.get("system") == DICOM_UID_SYSTEM and value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


def instance_file(orthanc: OrthancClient, orthanc_id: str) -> bytes:
    """``GET /instances/{id}/file``: the instance as a DICOM Part 10 file."""
    try:
        return orthanc.api.get_binary(f"instances/{orthanc_id}/file")
    except api_errors.HttpError as exc:
        raise OrthancUnavailable(f"Orthanc answered HTTP {exc.http_status_code}") from exc
    except api_errors.OrthancApiException as exc:
        raise OrthancUnavailable(type(exc).__name__) from exc


class DeidentifyWorker:
    """Polls and works the deidentify-imaging Tasks (one thread; see the module docstring)."""

    def __init__(
        self,
        *,
        fhir: FhirLike,
        orthanc: OrthancClient,
        spool: SpoolLike,
        links: LinksLike,
        profile: Profile | None = None,
        secret: bytes | None = None,
        work_dir: Path | None = None,
        lease: float = TASK_LEASE_SECONDS,
    ) -> None:
        self.fhir = fhir
        self.orthanc = orthanc
        self.spool = spool
        self.links = links
        self.profile = profile or load_profile()
        # the key of the copy's UIDs and pseudonym; the gateway keeps one in its spool's state
        # (sync.build_sync), so a Task worked again after a crash makes the same copy
        self.secret = secret or secrets.token_bytes(32)
        self.work_dir = work_dir
        self.lease = lease

    def run_once(self) -> int:
        """Work every requested deidentify-imaging Task; how many were worked."""
        return work_requested(
            self.fhir,
            TASK_CODE_DEIDENTIFY,
            doing="de-identifying",
            work=self._work,
            what="de-identification",
            lease=self.lease,
        )

    # -- one Task ---------------------------------------------------------------------------

    def _work(self, task: dict[str, Any]) -> None:
        try:
            study_id = reference_id(task.get("focus"), "ImagingStudy")
            case_id = next(
                (c for b in task.get("basedOn") or () if (c := reference_id(b, "ServiceRequest"))),
                None,
            )
            if not study_id or not case_id:
                raise TaskFailed("the Task names no ImagingStudy (focus) or no case (basedOn)")
            study = self.fhir.read("ImagingStudy", study_id)
            study_uid = study_uid_of(study)
            if not study_uid:
                raise TaskFailed("the ImagingStudy has no urn:dicom:uid identifier")
            with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="deid-") as folder:
                copy = self._copy(task["id"], study_uid, Path(folder))
                subject = (study.get("subject") or {}).get("reference")
                mapping = self._store_mapping(task, f"ImagingStudy/{study_id}", copy, subject)
                self._send(copy, case_id)
            if asks_replace(task):
                self._withhold(study)
        except TaskFailed as exc:
            self._finish(task, "failed", reason=str(exc))
            return
        except (OrthancUnavailable, OrthancRejected) as exc:
            self._finish(task, "failed", reason=f"Orthanc failed: {exc}")
            return
        except OSError as exc:
            self._finish(task, "failed", reason=f"the spool failed: {type(exc).__name__}")
            return
        except FhirClientError as exc:  # e.g. no scope to create the mapping Binary
            reason = f"the FHIR server answered HTTP {exc.status} {exc.code or ''}".strip()
            self._finish(task, "failed", reason=reason)
            return
        self._finish(task, "completed", output=outputs(copy.study_uid, mapping["id"]))
        log.info("Task/%s: %d instances de-identified", task["id"], len(copy.files))

    def _copy(self, task_id: str, study_uid: str, folder: Path) -> Copy:
        """Every instance of the study, de-identified into ``folder`` (nothing sent yet)."""
        orthanc_id = self.orthanc.find_study(study_uid)
        if orthanc_id is None:
            raise TaskFailed("Orthanc does not hold the study")
        instances = self.orthanc.study_instances(orthanc_id)
        if not instances:
            raise TaskFailed("Orthanc holds no instance of the study")
        uid_map = UidMap(derive=lambda original: keyed_uid(self.secret, task_id, original))
        pseudonym = keyed_pseudonym(self.secret, task_id)
        files: list[tuple[Path, str]] = []
        result: Deidentified | None = None
        for index, instance in enumerate(instances, start=1):
            data = instance_file(self.orthanc, instance["ID"])
            try:
                dataset = pydicom.dcmread(io.BytesIO(data))
                result = deidentify(
                    dataset, profile=self.profile, uid_map=uid_map, pseudonym=pseudonym
                )
            except BurnedInAnnotation:
                raise TaskFailed(
                    f"instance {index} of {len(instances)} has burned-in annotation "
                    "(0028,0301): pixel data cleaning is not supported"
                ) from None
            except (InvalidDicomError, ValueError, EOFError) as exc:
                raise TaskFailed(
                    f"instance {index} of {len(instances)} is unreadable: {type(exc).__name__}"
                ) from None
            path = folder / f"{index:06d}.dcm"
            result.dataset.save_as(path, enforce_file_format=True)
            files.append((path, str(result.dataset.SOPInstanceUID)))
        assert result is not None
        return Copy(str(result.dataset.StudyInstanceUID), files, uid_map, result.patient)

    def _store_mapping(
        self, task: Mapping[str, Any], study_ref: str, copy: Copy, subject: str | None
    ) -> dict[str, Any]:
        """The reversal mapping as a Binary with no securityContext (administrators only);
        the one a first run of the Task stored, when it is worked again (the same content: the
        copy is the same)."""
        binary_id = mapping_id(str(task["id"]))
        try:
            return self.fhir.read("Binary", binary_id)
        except FhirClientError as exc:
            if exc.status not in (404, 410):
                raise
        document = mapping_document(task=task, study_ref=study_ref, copy=copy, subject=subject)
        content = json.dumps(document, sort_keys=True).encode("utf-8")
        binary = {
            "resourceType": "Binary",
            "id": binary_id,
            "contentType": MAPPING_CONTENT_TYPE,
            "data": base64.b64encode(content).decode("ascii"),
        }
        return self.fhir.update(binary)

    def _withhold(self, study: dict[str, Any]) -> None:
        """Label the original ``withheld-from-provider``: the case's provider then sees only
        the copy (the server's access policy; only operators may set the label)."""
        for _ in range(CLOSE_TRIES):
            meta = dict(study.get("meta") or {})
            labels = list(meta.get("security") or ())
            label = {"system": SECURITY_LABEL_SYSTEM, "code": WITHHELD_FROM_PROVIDER}
            if any(
                (x.get("system"), x.get("code")) == (label["system"], label["code"]) for x in labels
            ):
                return
            meta["security"] = [*labels, label]
            try:
                self.fhir.update({**study, "meta": meta}, if_match=meta.get("versionId"))
                return
            except FhirClientError as exc:
                if exc.status != 412:
                    raise
                study = self.fhir.read("ImagingStudy", study["id"])
        raise TaskFailed("the original ImagingStudy kept changing: it is not withheld yet")

    def _send(self, copy: Copy, case_id: str) -> None:
        """Link the copy to the case, then spool every instance (the link comes first, so the
        ImagingStudy sync finds it when the study becomes stable)."""
        self.links.add(copy.study_uid, case_id)
        for path, sop_uid in copy.files:
            self.spool.put_bytes(path.read_bytes(), study_uid=copy.study_uid, sop_uid=sop_uid)

    def _finish(
        self,
        task: dict[str, Any],
        status: str,
        *,
        output: list[dict[str, Any]] | None = None,
        reason: str | None = None,
    ) -> None:
        business = "de-identified" if status == "completed" else "failed"
        close(self.fhir, task, status, business, output=output, reason=reason)
