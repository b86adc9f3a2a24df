"""DICOM instances for the imaging benchmark, and dcmtk's ``storescu`` as the sending modality.

:func:`write_studies` writes CT-like instances (DICOM PS3.10 files, Explicit VR Little Endian,
16-bit monochrome pixels) with pydicom: a few studies of a few series each, one folder per study.
:func:`send_studies` sends them with ``storescu`` (PS3.4 Annex B, C-STORE), one association per
study, several studies at a time, and times it.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CALLING_AET = "BENCH"


@dataclass(frozen=True)
class SeriesFiles:
    """One series as written: its UID, instance count and bytes on disk."""

    uid: str
    instances: int
    nbytes: int


@dataclass(frozen=True)
class StudyFiles:
    """One study's folder (every file of it, all its series) and its UIDs."""

    folder: Path
    uid: str
    series: tuple[SeriesFiles, ...]

    @property
    def instances(self) -> int:
        """Instances in the study."""
        return sum(s.instances for s in self.series)

    @property
    def nbytes(self) -> int:
        """Bytes of the study's files."""
        return sum(s.nbytes for s in self.series)


def _template(
    study_uid: str, series_uid: str, study_number: int, rows: int, columns: int
) -> Dataset:
    """The attributes every instance of a series shares (PS3.3 CT Image IOD, the minimum a
    PACS indexes)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.PatientID = f"MSO-BENCH-{study_number}"
    ds.PatientName = f"Bench^Patient{study_number}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = str(study_number)
    ds.AccessionNumber = f"BENCH{study_number:04d}"
    ds.Modality = "CT"
    set_grayscale16(ds, rows, columns)
    return ds


def set_grayscale16(ds: Dataset, rows: int, columns: int) -> None:
    """The Image Pixel module (PS3.3 C.7.6.3) of unsigned 16-bit monochrome frames of
    ``rows`` x ``columns`` (the pixel data itself is the caller's)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0


def write_studies(
    root: Path,
    *,
    instances: int,
    studies: int,
    series_per_study: int,
    rows: int = 512,
    columns: int = 512,
) -> list[StudyFiles]:
    """Write ``instances`` files spread evenly over ``studies`` x ``series_per_study`` series
    under ``root/study-NN/``. Pixel data is random bytes (incompressible, like noise), a few
    bytes changed per instance."""
    noise = bytearray(os.urandom(rows * columns * 2))
    groups = studies * series_per_study
    out: list[StudyFiles] = []
    for study_number in range(studies):
        folder = root / f"study-{study_number:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid()
        series: list[SeriesFiles] = []
        for series_number in range(series_per_study):
            group = study_number * series_per_study + series_number
            count = instances // groups + (1 if group < instances % groups else 0)
            series_uid = generate_uid()
            ds = _template(study_uid, series_uid, study_number, rows, columns)
            ds.SeriesNumber = series_number + 1
            nbytes = 0
            for number in range(1, count + 1):
                sop_uid = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.SOPInstanceUID = sop_uid
                ds.InstanceNumber = number
                noise[:8] = number.to_bytes(4, "little") + group.to_bytes(4, "little")
                ds.PixelData = bytes(noise)
                path = folder / f"{series_number:02d}-{number:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                nbytes += path.stat().st_size
            series.append(SeriesFiles(series_uid, count, nbytes))
        out.append(StudyFiles(folder, study_uid, tuple(series)))
    return out


def storescu_command(folder: Path, *, port: int, called_aet: str) -> list[str]:
    """The one ``storescu`` invocation of the benchmark: every file of ``folder`` in one
    association, proposing only the presentation contexts the files need."""
    return [
        "storescu",
        "--scan-directories",
        "--recurse",
        "--required",
        "--aetitle", CALLING_AET,
        "--call", called_aet,
        "127.0.0.1", str(port),
        str(folder),
    ]  # fmt: skip


def send_studies(
    studies: list[StudyFiles],
    *,
    port: int,
    called_aet: str,
    parallel: int,
    timeout: float,
    nodelay: bool = False,
) -> float:
    """Send every study (one ``storescu`` each, ``parallel`` at a time) to the SCP on ``port``;
    the seconds until the last ``storescu`` returned. A failed ``storescu`` raises
    :class:`RuntimeError` with its output. ``nodelay``: storescu turns Nagle's algorithm off
    (dcmtk's ``TCP_NODELAY`` environment variable), as many modalities' stacks do."""
    env = {**os.environ, "TCP_NODELAY": "1"} if nodelay else None

    def one(study: StudyFiles) -> None:
        command = storescu_command(study.folder, port=port, called_aet=called_aet)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"storescu did not finish within {timeout:g} s") from None
        if done.returncode != 0 or "E: " in done.stderr:
            raise RuntimeError(
                f"storescu to {called_aet} failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
            )

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for future in [pool.submit(one, study) for study in studies]:
            future.result()
    return time.perf_counter() - started
