"""DICOM test data and peers for the imaging tests.

:func:`make_series` writes a small, valid DICOM Part-10 series (PS3.10) with pydicom: one file
per instance, single- or multi-frame, with the patient, study and accession given, so a test
can find what it sent. :func:`storescu` and :func:`echoscu` run dcmtk's tools as the real peer
(callers skip first with :func:`tests.orthanc_process.require_orthanc`).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from bench.dicom_data import set_grayscale16
from dicom_gateway.keygen import ensure_key
from fhir_server.config import Settings
from tests.auth_helpers import auth_server

SINGLE_FRAME_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
SUCCESS_LINE = "Received Store Response (Success)"
# storescu's option proposing a compressed transfer syntax (with the uncompressed ones)
PROPOSE = {
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
    DeflatedExplicitVRLittleEndian: "-xd",
}


@dataclass(frozen=True)
class Series:
    """What :func:`make_series` wrote: the files (in instance order) and their UIDs."""

    files: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]


def make_series(
    folder: Path,
    n: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "MSO-TEST-1",
    patient_name: str = "Test^Patient",
    accession: str = "",
    modality: str = "CT",
    frames: int = 1,
    rows: int = 16,
    columns: int = 16,
    study_date: str = "20260101",
) -> Series:
    """Write ``n`` instances of one series into ``folder`` (created), as ``0001.dcm``, …

    Single-frame instances are CT or MR Image Storage (Secondary Capture for other
    modalities); with ``frames`` > 1, Multi-frame Grayscale Word Secondary Capture. Pixel
    values are 16-bit, distinct per instance and frame."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    if frames > 1:
        sop_class = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    else:
        sop_class = SINGLE_FRAME_CLASSES.get(modality, SecondaryCaptureImageStorage)
    files, sop_uids = [], []
    for number in range(1, n + 1):
        sop_uid = generate_uid()
        ds = _instance(sop_class, sop_uid, rows=rows, columns=columns, frames=frames)
        ds.update(
            {
                "PatientID": patient_id,
                "PatientName": patient_name,
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": series_uid,
                "AccessionNumber": accession,
                "Modality": modality,
                "StudyDate": study_date,
                "StudyTime": "120000",
                "StudyID": "1",
                "SeriesNumber": 1,
                "InstanceNumber": number,
            }
        )
        ds.PixelData = bytes(
            (number + frame) % 256 for frame in range(frames) for _ in range(rows * columns * 2)
        )
        path = folder / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sop_uids.append(sop_uid)
    return Series(files, study_uid, series_uid, sop_uids)


def _instance(sop_class: str, sop_uid: str, *, rows: int, columns: int, frames: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    set_grayscale16(ds, rows, columns)
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = "MODALITY",
    called: str = "MSO",
    host: str = "127.0.0.1",
    propose: str = "-x=",
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association with dcmtk's storescu (verbose output captured).

    ``-R`` proposes only the SOP classes of the files; ``propose`` is storescu's transfer
    syntax option (``-x=``: uncompressed; see :data:`PROPOSE` for compressed files)."""
    return subprocess.run(
        ["storescu", "-v", "-R", propose, "-aet", calling, "-aec", called, host, str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def send_as_stored(port: int, files: Sequence[Path], **options: Any) -> int:
    """Send ``files`` with storescu in their own transfer syntax (one association per syntax,
    proposing it as :data:`PROPOSE` says); the number of Success responses."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = read_file_meta_info(path).TransferSyntaxUID
        groups.setdefault(PROPOSE.get(syntax, "-x="), []).append(path)
    return sum(
        storescu(port, group, propose=flag, **options).stderr.count(SUCCESS_LINE)
        for flag, group in groups.items()
    )


def store_succeeded(result: subprocess.CompletedProcess[str], count: int) -> bool:
    """Whether storescu sent ``count`` instances and each got a Success response."""
    return result.returncode == 0 and result.stderr.count(SUCCESS_LINE) == count


def echoscu(
    port: int, *, calling: str = "MODALITY", called: str = "MSO", host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with dcmtk's echoscu."""
    return subprocess.run(
        ["echoscu", "-v", "-aet", calling, "-aec", called, host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def until(check: Callable[[], Any], *, timeout: float = 30, step: Callable[[], Any] | None = None):
    """Run ``step`` then ``check`` until ``check`` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.3)


def register_gateway_client(database_url: str, folder: Path, client_id: str, scope: str) -> Path:
    """A signing key for the gateway under ``folder`` (``python -m dicom_gateway.keygen``'s
    :func:`~dicom_gateway.keygen.ensure_key`) and its backend-services client ``client_id``
    registered in the server's database: the private key file, for ``private_key``."""
    private, public = folder / "gateway-key.json", folder / "gateway-public.json"
    ensure_key(private, public)
    auth_server(Settings(database_url=database_url)).clients.create(
        client_id=client_id, kind="backend", jwks=json.loads(public.read_text()), scope=scope
    )
    return private
