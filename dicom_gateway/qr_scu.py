"""Query/Retrieve SCU towards the hospital PACS: study-level C-FIND and C-MOVE.

DICOM PS3.4 Annex C (Query/Retrieve Service Class), Study Root information model (C.6.2):
:func:`find_studies` sends a C-FIND at the STUDY level keyed on PatientID (and
IssuerOfPatientID when known) and collects the StudyInstanceUIDs of the pending responses
(C.4.1.1.4); :func:`move_study` sends a C-MOVE of one study to a destination AE (C.4.2), which
must be known to the PACS — here the gateway's own SCP, so the instances arrive through the
spool like any C-STORE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
TIMEOUT = 30.0
MOVE_TIMEOUT = 600.0


class QueryError(Exception):
    """The PACS could not be reached or refused the query."""


@dataclass(frozen=True)
class RemoteAE:
    """A peer DICOM application entity: ``AET@host:port``."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RemoteAE:
        """From ``AET@host:port``; ``ValueError`` for anything else."""
        aet, sep, address = text.strip().partition("@")
        host, colon, port = address.rpartition(":")
        if not (sep and colon and aet and host and port.isdigit()):
            raise ValueError("a remote AE is written AET@host:port")
        return cls(aet, host, int(port))


def _associate(calling_aet: str, remote: RemoteAE, context: object, timeout: float) -> Association:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(context)
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.aet)
    if not assoc.is_established:
        raise QueryError(f"no association with {remote.aet}")
    return assoc


def find_studies(
    remote: RemoteAE, *, calling_aet: str, patient_id: str, issuer: str | None = None
) -> list[str]:
    """The StudyInstanceUIDs the PACS holds for ``patient_id`` (C-FIND, STUDY level)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer:
        query.IssuerOfPatientID = issuer
    query.StudyInstanceUID = ""
    assoc = _associate(calling_aet, remote, StudyRootQueryRetrieveInformationModelFind, TIMEOUT)
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code in PENDING and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID") or "")
                if uid and uid not in found:
                    found.append(uid)
            elif code is None or code != SUCCESS:
                raise QueryError(f"C-FIND failed with status 0x{code or 0:04X}")
    finally:
        assoc.release()
    return found


def move_study(remote: RemoteAE, *, calling_aet: str, destination: str, study_uid: str) -> bool:
    """C-MOVE one study to ``destination``; True when every sub-operation succeeded."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    context = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(calling_aet, remote, context, MOVE_TIMEOUT)
    final = None
    try:
        for status, _identifier in assoc.send_c_move(query, destination, context):
            if status is not None and "Status" in status:
                final = status
    finally:
        assoc.release()
    if final is None:
        return False
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    log.debug("C-MOVE of %s ended 0x%04X", study_uid, final.Status)
    return final.Status == SUCCESS and failed == 0
