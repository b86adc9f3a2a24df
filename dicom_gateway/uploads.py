"""DICOM files uploaded as case documents -> the spool (and so Orthanc), linked to their case.

A requester may attach DICOM files to a case as documents (DocumentReference with an
``application/dicom`` attachment whose bytes are a Binary, ``context.related`` the case
ServiceRequest; DESIGN.md, uploaded document). :class:`UploadPoller` finds new ones with
``GET DocumentReference?contenttype=application/dicom&_lastUpdated=ge<cursor>&_sort=_lastUpdated``
(FHIR R4 search, http://hl7.org/fhir/R4/search.html), downloads each attachment
(``GET Binary/<id>`` with ``Accept: application/dicom``: the raw bytes), reads the header only
(pydicom, ``stop_before_pixels``) for the StudyInstanceUID and SOPInstanceUID, records the
study -> case link (:class:`~dicom_gateway.links.StudyLinks`) and only then spools the file
(``Spool.put_bytes``), so the ImagingStudy sync finds the link when the study becomes stable.

The cursor (``spool_dir/state/uploads.json``) holds the last ``meta.lastUpdated`` handled and
the ids handled at that instant, so documents sharing an instant are neither lost nor repeated.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_gateway.fhir_client import FhirClient, FhirClientError
from dicom_gateway.links import StudyLinks
from dicom_gateway.state import StateFile, state_dir
from dicom_gateway.study_sync import is_transient, reference_id

log = logging.getLogger(__name__)

DICOM = "application/dicom"
PAGE = 50


class SpoolLike(Protocol):
    """What the poller needs of :class:`dicom_gateway.spool.Spool`."""

    def put_bytes(self, data: bytes, *, study_uid: str, sop_uid: str) -> object:
        """Durably queue one instance for Orthanc."""
        ...


def header_uids(data: bytes) -> tuple[str, str]:
    """``(StudyInstanceUID, SOPInstanceUID)`` from a DICOM Part 10 file's header;
    ``ValueError`` for anything else."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise ValueError(f"not a DICOM file: {type(exc).__name__}") from exc
    study, sop = ds.get("StudyInstanceUID"), ds.get("SOPInstanceUID")
    if not study or not sop:
        raise ValueError("the DICOM file has no StudyInstanceUID or SOPInstanceUID")
    return str(study), str(sop)


class UploadPoller:
    """Polls the FHIR server for DICOM case documents and spools them (one thread)."""

    def __init__(
        self, *, fhir: FhirClient, spool: SpoolLike, links: StudyLinks, spool_dir: Path
    ) -> None:
        self.fhir = fhir
        self.spool = spool
        self.links = links
        self.cursor = StateFile(state_dir(spool_dir) / "uploads.json", {"since": None, "ids": []})

    def poll_once(self) -> int:
        """Handle the documents updated since the cursor; how many were spooled."""
        since, done_ids = self.cursor.data.get("since"), set(self.cursor.data.get("ids") or ())
        params = [("contenttype", DICOM), ("_sort", "_lastUpdated"), ("_count", str(PAGE))]
        if since:
            params.append(("_lastUpdated", f"ge{since}"))
        spooled = 0
        try:
            for doc in self.fhir.search("DocumentReference", params):
                updated = (doc.get("meta") or {}).get("lastUpdated")
                if updated == since and doc["id"] in done_ids:
                    continue
                spooled += self._handle(doc)
                if updated != since:
                    since, done_ids = updated, set()
                done_ids.add(doc["id"])
                self.cursor.save({"since": since, "ids": sorted(done_ids)})
        except FhirClientError as exc:
            if not is_transient(exc):
                raise
            log.warning("upload polling paused, will retry: %s", exc)
        return spooled

    def _handle(self, doc: Mapping[str, Any]) -> int:
        """Spool the DICOM attachments of one case document; how many."""
        context = doc.get("context") or {}
        cases = [
            c for r in context.get("related") or () if (c := reference_id(r, "ServiceRequest"))
        ]
        if not cases or doc.get("status") == "entered-in-error":
            return 0
        spooled = 0
        for index, content in enumerate(doc.get("content") or ()):
            attachment = content.get("attachment") or {}
            if attachment.get("contentType") != DICOM:
                continue
            try:
                data = self._content(attachment)
                study_uid, sop_uid = header_uids(data)
            except FhirClientError as exc:
                if is_transient(exc):
                    raise
                log.warning("DocumentReference/%s content %d unreadable: %s", doc["id"], index, exc)
                continue
            except ValueError as exc:
                log.warning("DocumentReference/%s content %d skipped: %s", doc["id"], index, exc)
                continue
            for case_id in cases:
                self.links.add(study_uid, case_id)
            self.spool.put_bytes(data, study_uid=study_uid, sop_uid=sop_uid)
            log.info("DocumentReference/%s content %d spooled", doc["id"], index)
            spooled += 1
        return spooled

    def _content(self, attachment: Mapping[str, Any]) -> bytes:
        if attachment.get("data"):
            return base64.b64decode(attachment["data"])
        return self.fhir.get_bytes(str(attachment.get("url") or ""), accept=DICOM)
