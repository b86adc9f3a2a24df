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

from sqlalchemy import select

from fhir_server.auth.policy import AccessPolicy
from fhir_server.auth.scopes import Permission
from fhir_server.storage.index_schema import idx_token
from fhir_server.storage.records import StoredResource
from fhir_server.storage.repository import Repository, Tx
from fhir_server.storage.search_exec import find_pids

IMAGING_STUDY = "ImagingStudy"
DICOM_UID_SYSTEM = "urn:dicom:uid"
_OID = "urn:oid:"
_PIDS_AT_ONCE = 1000  # bound parameters of one IN list


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


def study_uids(body: dict[str, Any]) -> list[str]:
    """The StudyInstanceUIDs an ImagingStudy names in its identifiers."""
    return [
        str(i["value"])[len(_OID) :]
        for i in body.get("identifier") or ()
        if i.get("system") == DICOM_UID_SYSTEM and str(i.get("value", "")).startswith(_OID)
    ]


def study_identifier(uid: str) -> str:
    """The token search value of a study's ImagingStudy identifier."""
    return f"{DICOM_UID_SYSTEM}|{_OID}{uid}"


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
        """Every StudyInstanceUID of the ImagingStudies ``caller`` may see, sorted: the pids
        the policy lets it search, then their ``identifier`` index rows (never the resources:
        an organization's ImagingStudies, each listing its instances, would be megabytes)."""
        identity = self.repo.registry.get(IMAGING_STUDY, "identifier").identity(IMAGING_STUDY)
        token = idx_token.c

        def work(tx: Tx) -> set[str]:
            pids = find_pids(
                tx.conn,
                self.repo.registry,
                IMAGING_STUDY,
                [],
                limit=None,
                access_filter=self.repo.search_access_filter(caller),
            )
            uids: set[str] = set()
            for start in range(0, len(pids), _PIDS_AT_ONCE):
                rows = tx.conn.execute(
                    select(token.code).where(
                        token.pid.in_(pids[start : start + _PIDS_AT_ONCE]),
                        token.hash_identity == identity,
                        token.system == DICOM_UID_SYSTEM,
                    )
                )
                uids.update(c[len(_OID) :] for (c,) in rows if c and c.startswith(_OID))
            return uids

        return sorted(self.repo.read_only(work, caller=caller))
