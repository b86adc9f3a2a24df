"""Which studies a DICOMweb caller may see: those of the ImagingStudy resources the MSO access
policy shows it (DESIGN.md, Imaging and Access).

A DICOM study is visible iff an ``ImagingStudy`` with
``identifier = urn:dicom:uid|urn:oid:<StudyInstanceUID>`` is visible to the caller. The
repository applies the policy to every search (requesters: their organization's cases'
studies; a provider: the cases assigned to it; admins and system clients: all), so this module
only asks it; callers the policy hides nothing of ImagingStudy from get Orthanc's answers
unfiltered (:meth:`StudyAccess.sees_every_study`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_server.auth.policy import AccessPolicy
from fhir_server.auth.scopes import Permission
from fhir_server.storage.records import StoredResource
from fhir_server.storage.repository import Repository, Tx

IMAGING_STUDY = "ImagingStudy"
DICOM_UID_SYSTEM = "urn:dicom:uid"
_OID = "urn:oid:"


@dataclass(frozen=True)
class StudyRecord:
    """The ImagingStudy a DICOM study is known by: its id and version (the metadata cache's
    validity) and its patient (the audit trail's)."""

    id: str
    version: int
    patient: str | None

    @property
    def source_version(self) -> str:
        """``<id>/<versionId>``: changes whenever the ImagingStudy does."""
        return f"{self.id}/{self.version}"


def study_identifier(uid: str) -> str:
    """The token search value of a study's ImagingStudy identifier."""
    return f"{DICOM_UID_SYSTEM}|{_OID}{uid}"


def study_uids(body: dict[str, Any]) -> list[str]:
    """The StudyInstanceUIDs an ImagingStudy names in its identifiers."""
    return [
        str(i["value"])[len(_OID) :]
        for i in body.get("identifier") or ()
        if i.get("system") == DICOM_UID_SYSTEM and str(i.get("value", "")).startswith(_OID)
    ]


class StudyAccess:
    """The access questions of the bridge, answered by the policy through the repository.
    Blocking (database): callers run them on a worker thread."""

    def __init__(self, repo: Repository, policy: AccessPolicy) -> None:
        self.repo = repo
        self.policy = policy

    def require(self, caller: Any, permission: Permission) -> None:
        """403 unless the caller's scopes allow ``permission`` on ImagingStudy at all."""
        self.policy.require(caller, IMAGING_STUDY, permission)

    def sees_every_study(self, caller: Any, permission: Permission = Permission.READ) -> bool:
        """True when the policy hides no ImagingStudy from ``caller``."""
        return self.policy.sees_every(caller, IMAGING_STUDY, permission)

    def find(self, caller: Any, uid: str) -> StudyRecord | None:
        """The ImagingStudy of study ``uid`` as ``caller`` may see it; ``None`` when there is
        none or the caller may not see it (the same answer, on purpose)."""

        def work(tx: Tx) -> StoredResource | None:
            page = tx.search(IMAGING_STUDY, [("identifier", study_identifier(uid))], count=1)
            return page.matches[0] if page.matches else None

        found = self.repo.read_only(work, caller=caller)
        if found is None:
            return None
        subject = (found.resource.get("subject") or {}).get("reference") or ""
        patient = subject.split("/", 1)[1] if subject.startswith("Patient/") else None
        return StudyRecord(found.res_id, found.version, patient)

    def visible_uids(self, caller: Any) -> list[str]:
        """Every StudyInstanceUID of the ImagingStudies ``caller`` may see, sorted."""

        def work(tx: Tx) -> set[str]:
            uids: set[str] = set()
            for stored in tx.iter_search(IMAGING_STUDY, [], batch=500):
                uids.update(study_uids(stored.resource))
            return uids

        return sorted(self.repo.read_only(work, caller=caller))
