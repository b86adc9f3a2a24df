"""Explicit study -> case links, kept durably in ``spool_dir/state/links.json``.

A study whose AccessionNumber is no case number still belongs to a case when it came in for
one: uploaded as a case document (a DICOM DocumentReference of the case), or retrieved from the
hospital PACS by the case's ``$import-priors``. The gateway records the link (StudyInstanceUID
-> the case ServiceRequest's id) before the study's instances reach Orthanc, so the ImagingStudy
sync finds it when the study becomes stable (DESIGN.md, Imaging: "linked to the case by
accession number or by upload"). A StudyInstanceUID may belong to several cases.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_gateway.state import StateFile, state_dir


class StudyLinks:
    """StudyInstanceUID -> case ServiceRequest ids, persisted on every change."""

    def __init__(self, spool_dir: Path) -> None:
        self._file = StateFile(state_dir(spool_dir) / "links.json", {})
        self._lock = threading.Lock()

    def add(self, study_uid: str, case_id: str) -> None:
        """Link ``study_uid`` to the case ``ServiceRequest/<case_id>`` (idempotent)."""
        with self._lock:
            current = dict(self._file.data)
            cases = list(current.get(study_uid, []))
            if case_id in cases:
                return
            current[study_uid] = [*cases, case_id]
            self._file.save(current)

    def cases(self, study_uid: str) -> list[str]:
        """The case ids ``study_uid`` is linked to (in the order linked)."""
        with self._lock:
            return list(self._file.data.get(study_uid, []))
