"""The DIMSE handlers of the gateway's SCP: C-ECHO (PS3.4 Annex A, Verification) and C-STORE
(PS3.4 Annex B, Storage Service Class), with the status codes of PS3.4 B.2.3 / PS3.7 Annex C.

C-STORE keeps the dataset exactly as received (no decoding of pixels, no transcoding): the
encoded bytes plus a File Meta Information header become a Part-10 file in the spool. Success
(0x0000) is answered only once that file is durable. When the spool cannot take it (a full or
failing disk) the instance goes straight to Orthanc within the association, and Success means
Orthanc stored it (out of the spool's order for its study: the ImagingStudy sync follows
Orthanc, not the arrival order); only when neither could keep it is the answer 0xA700 (Refused:
Out of Resources), so the modality keeps the instance and sends it again later.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import zlib
from collections.abc import Callable
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.events import Event

from dicom_gateway.spool import Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: Refused, Out of Resources
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand

STUDY_INSTANCE_UID = 0x0020000D
REACTOR_IDLE_SLEEP = 0.0002  # seconds; about 1 ms less per instance, a few % CPU while idle
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def study_uid_of(encoded: bytes, transfer_syntax: UID) -> str | None:
    """The StudyInstanceUID of an encoded dataset (without File Meta), read by parsing only the
    elements up to (0020,000D): the pixel data is never touched."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        encoded = zlib.decompress(encoded, -zlib.MAX_WBITS)
    dataset = read_dataset(
        io.BytesIO(encoded),
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        stop_when=lambda tag, vr, length: tag > STUDY_INSTANCE_UID,
        defer_size=1024,
    )
    uid = str(dataset.get("StudyInstanceUID") or "").strip()
    return uid or None


def _socket(event: Event) -> socket.socket | None:
    holder = event.assoc.dul.socket
    return holder.socket if holder is not None else None


def handle_open(event: Event) -> None:
    """A peer connected: send our small DIMSE responses at once (no Nagle delay), and poll
    its socket more often than pynetdicom's default of 1 ms while the association lasts."""
    if (sock := _socket(event)) is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(event.assoc.dul, "_run_loop_delay"):  # pynetdicom's idle sleep of its reactor
        event.assoc.dul._run_loop_delay = REACTOR_IDLE_SLEEP


def handle_sent(event: Event) -> None:
    """After each response, acknowledge the peer's next segments at once (Linux TCP_QUICKACK,
    which the kernel clears whenever we send). A modality whose TCP stack keeps Nagle on (as
    dcmtk's storescu does by default) sends a C-STORE command, then holds the dataset until that
    command is acknowledged; a delayed ACK costs it about 40 ms per instance."""
    if QUICKACK is not None and (sock := _socket(event)) is not None:
        with contextlib.suppress(OSError):  # the connection is closing
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


def handle_echo(event: Event) -> int:
    """C-ECHO: the gateway is up."""
    return SUCCESS


Fallback = Callable[[bytes], bool]
"""Stores a Part-10 file where the spool could not: True once it is kept (Orthanc has it)."""


def handle_store(event: Event, spool: Spool, fallback: Fallback | None = None) -> int:
    """C-STORE: spool the instance durably (else store it through ``fallback``), then answer
    Success."""
    transfer_syntax = UID(event.context.transfer_syntax)
    stream = event.encoded_dataset(include_meta=False)
    try:
        study_uid = study_uid_of(stream, transfer_syntax)
    except Exception:
        log.warning("C-STORE refused: the dataset cannot be parsed (0xC000)")
        return CANNOT_UNDERSTAND
    if study_uid is None:
        log.warning("C-STORE refused: no StudyInstanceUID (0xA900)")
        return DOES_NOT_MATCH_SOP_CLASS
    data = event.encoded_dataset(include_meta=True)
    try:
        spool.put_bytes(
            data, study_uid=study_uid, sop_uid=str(event.request.AffectedSOPInstanceUID)
        )
    except OSError as exc:
        if fallback is not None and fallback(data):
            log.warning(
                "the spool could not persist an instance (%s): stored in Orthanc", exc.strerror
            )
            return SUCCESS
        log.error(
            "C-STORE refused: neither the spool (%s) nor Orthanc kept it (0xA700)", exc.strerror
        )
        return OUT_OF_RESOURCES
    return SUCCESS


def event_handlers(spool: Spool, fallback: Fallback | None = None) -> list[tuple[Any, ...]]:
    """The ``evt_handlers`` of the SCP, each bound to its dependencies."""
    return [
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_DATA_SENT, handle_sent),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, fallback]),
    ]
