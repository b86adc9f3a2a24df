"""The DICOM gateway against real peers: dcmtk's echoscu/storescu as the modality, a real
Orthanc behind it. C-ECHO, C-STORE in every transfer syntax without transcoding, calling-AE
rejection (PS3.8 9.3.4), Orthanc down while a modality sends, a SIGKILLed gateway resuming its
spool, duplicates, and arrival order per study (Orthanc's change feed)."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1

from dicom_gateway.__main__ import parse_settings
from dicom_gateway.config import GatewaySettings
from dicom_gateway.gateway import Gateway
from tests.dicom_helpers import (
    echoscu,
    make_series,
    send_as_stored,
    store_succeeded,
    storescu,
    until,
)
from tests.orthanc_process import Orthanc, require_orthanc, start_orthanc
from tests.smtp_server import free_port

ROOT = Path(__file__).resolve().parents[2]
# One file per transfer syntax pydicom ships (several share MR_small's SOP Instance UID).
TEST_FILES = [
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "JPEG2000.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle.dcm",
    "image_dfl.dcm",
]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require_orthanc()
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def settings_for(orthanc: Orthanc, spool: Path, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "port": 0,
        "spool_dir": spool,
        "orthanc_url": orthanc.url,
        "retry_max": 0.5,
        "forwarders": 4,
        **overrides,
    }
    return GatewaySettings(_env_file=None, **values)


@pytest.fixture
def gateway(orthanc: Orthanc, tmp_path: Path) -> Iterator[Gateway]:
    with Gateway(settings_for(orthanc, tmp_path / "spool")) as running:
        yield running


def orthanc_id(orthanc: Orthanc, sop_uid: str) -> str | None:
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=sop_uid, timeout=10).json()
    return next((r["ID"] for r in found if r["Type"] == "Instance"), None)


def all_stored(orthanc: Orthanc, sop_uids: list[str]) -> bool:
    return all(orthanc_id(orthanc, uid) for uid in sop_uids)


def arrival_order(orthanc: Orthanc, sop_uids: list[str]) -> list[str]:
    """The SOP Instance UIDs in the order Orthanc logged their NewInstance changes."""
    by_id = {orthanc_id(orthanc, uid): uid for uid in sop_uids}
    changes = httpx.get(f"{orthanc.url}/changes?limit=10000", timeout=10).json()["Changes"]
    return [
        by_id[c["ID"]] for c in changes if c["ChangeType"] == "NewInstance" and c["ID"] in by_id
    ]


def queued_files(spool: Path) -> list[Path]:
    return sorted((spool / "queue").iterdir())


def test_echo_and_every_transfer_syntax_land_in_orthanc_as_sent(
    gateway: Gateway, orthanc: Orthanc, tmp_path: Path
) -> None:
    assert "Received Echo Response (Success)" in echoscu(gateway.port).stderr
    files = [Path(get_testdata_file(name)) for name in TEST_FILES]
    series = make_series(tmp_path / "mf", 2, frames=5, modality="OT", accession="ACC-MF")
    sent = files + series.files

    assert send_as_stored(gateway.port, sent) == len(sent)
    assert gateway.forwarders.wait_idle(20)
    assert gateway.status()["failed"] == 0
    syntaxes = set()
    by_sop: dict[str, list] = {}
    for path in sent:
        original = dcmread(path)
        by_sop.setdefault(original.SOPInstanceUID, []).append(original)
    for sop_uid, originals in by_sop.items():  # Orthanc keeps the first of equal SOP UIDs
        stored_id = orthanc_id(orthanc, sop_uid)
        assert stored_id
        body = httpx.get(f"{orthanc.url}/instances/{stored_id}/file", timeout=10).content
        stored = dcmread(io.BytesIO(body))
        syntax = stored.file_meta.TransferSyntaxUID
        original = next(o for o in originals if o.file_meta.TransferSyntaxUID == syntax)
        syntaxes.add(syntax)
        if syntax.is_compressed:  # encapsulated frames byte for byte: never decoded
            assert stored.PixelData == original.PixelData
    assert {JPEGBaseline8Bit, JPEGLosslessSV1, DeflatedExplicitVRLittleEndian} <= syntaxes
    multi_frame = orthanc_id(orthanc, series.sop_uids[0])
    frames = httpx.get(f"{orthanc.url}/instances/{multi_frame}/frames", timeout=10).json()
    assert len(frames) == 5


def test_an_unknown_calling_ae_is_rejected(orthanc: Orthanc, tmp_path: Path) -> None:
    settings = settings_for(orthanc, tmp_path / "spool", allowed_aes="CT1, MR1")
    with Gateway(settings) as gateway:
        refused = echoscu(gateway.port, calling="INTRUDER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr
        assert "Received Echo Response (Success)" in echoscu(gateway.port, calling="MR1").stderr


def test_orthanc_down_the_modality_is_answered_and_everything_lands_in_order(
    gateway: Gateway, orthanc: Orthanc, tmp_path: Path
) -> None:
    first = make_series(tmp_path / "a", 6, accession="ACC-A")
    second = make_series(tmp_path / "b", 4, accession="ACC-B", modality="MR")
    orthanc.stop()
    try:
        result = storescu(gateway.port, first.files + second.files)
        assert store_succeeded(result, 10), result.stderr
        assert len(queued_files(gateway.settings.spool_dir)) == 10
        until(lambda: gateway.status()["retry_delay"] > 0, timeout=5)
    finally:
        orthanc.restart()
    assert gateway.forwarders.wait_idle(20)
    assert queued_files(gateway.settings.spool_dir) == []
    assert arrival_order(orthanc, first.sop_uids) == first.sop_uids
    assert arrival_order(orthanc, second.sop_uids) == second.sop_uids


def test_a_spool_that_cannot_write_sends_straight_to_orthanc_else_refuses(
    gateway: Gateway, orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Success only when the instance was persisted somewhere: the spool, else Orthanc at once;
    with both unable, the modality is told Out of Resources (0xA700) and keeps it."""

    def disk_full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gateway.spool, "put_bytes", disk_full)
    series = make_series(tmp_path / "full", 2)
    assert store_succeeded(storescu(gateway.port, series.files), 2)
    assert all_stored(orthanc, series.sop_uids)  # already there: stored within the association
    assert queued_files(gateway.settings.spool_dir) == []
    refused = make_series(tmp_path / "refused", 1)
    orthanc.stop()
    try:
        result = storescu(gateway.port, refused.files)
        assert not store_succeeded(result, 1)
        assert "Refused: OutOfResources" in result.stderr
    finally:
        orthanc.restart()
    assert not all_stored(orthanc, refused.sop_uids)


def test_a_duplicate_instance_is_a_success_and_stored_once(
    gateway: Gateway, orthanc: Orthanc, tmp_path: Path
) -> None:
    series = make_series(tmp_path / "dup", 3)
    assert store_succeeded(storescu(gateway.port, series.files), 3)
    assert gateway.forwarders.wait_idle(10)
    count = orthanc.instance_count()
    assert store_succeeded(storescu(gateway.port, series.files), 3)
    assert gateway.forwarders.wait_idle(10)
    assert orthanc.instance_count() == count
    assert gateway.status() | {"retry_delay": 0} == {
        "received": 6,
        "forwarded": 6,
        "pending": 0,
        "failed": 0,
        "retry_delay": 0,
    }


def test_what_orthanc_rejects_goes_to_failed(gateway: Gateway) -> None:
    gateway.spool.put_bytes(b"not a DICOM file", study_uid="1.2.3", sop_uid="1.2.3.4")
    assert gateway.forwarders.wait_idle(10)
    assert len(list((gateway.settings.spool_dir / "failed").iterdir())) == 1


def start_gateway_process(orthanc: Orthanc, spool: Path, port: int) -> subprocess.Popen[str]:
    flags = {
        "--port": str(port),
        "--spool-dir": str(spool),
        "--orthanc-url": orthanc.url,
        "--retry-max": "0.5",
        "--allowed-aes": "MODALITY",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_gateway", *(x for pair in flags.items() for x in pair)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MSO_DICOM_")},
    )

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    until(listening, timeout=15)
    return proc


def test_a_killed_gateway_resumes_its_spool(orthanc: Orthanc, tmp_path: Path) -> None:
    spool, port = tmp_path / "spool", free_port()
    series = make_series(tmp_path / "k", 5, accession="ACC-K")
    orthanc.stop()
    try:
        gateway = start_gateway_process(orthanc, spool, port)
        try:
            assert store_succeeded(storescu(port, series.files), 5)
        finally:
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(10)
        assert len(queued_files(spool)) == 5
        (spool / "tmp" / "unacknowledged.part").write_bytes(b"half")
    finally:
        orthanc.restart()

    gateway = start_gateway_process(orthanc, spool, port)
    try:
        until(lambda: all_stored(orthanc, series.sop_uids))
        assert arrival_order(orthanc, series.sop_uids) == series.sop_uids
        until(lambda: queued_files(spool) == [], timeout=5)
        assert list((spool / "tmp").iterdir()) == []
    finally:
        gateway.send_signal(signal.SIGTERM)
        _, log = gateway.communicate(timeout=20)
    assert gateway.returncode == 0
    assert f"listening on 127.0.0.1:{port}" in log and "5 pending" in log
    assert "Test^Patient" not in log and "MSO-TEST-1" not in log


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSO_DICOM_PORT", "4242")
    monkeypatch.setenv("MSO_DICOM_AET", "FROMENV")
    settings, level = parse_settings(["--port", "5555", "--allowed-aes", "CT1,MR1"])
    assert (settings.port, settings.aet, settings.allowed, level) == (
        5555,
        "FROMENV",
        frozenset({"CT1", "MR1"}),
        "INFO",
    )


def test_mso_dicom_gateway_needs_no_fhir_database(tmp_path: Path) -> None:
    env = dict(os.environ, MSO_DATABASE_URL=f"sqlite:///{tmp_path}/absent/mso.db")
    result = subprocess.run(
        [sys.executable, "-m", "fhir_server.cli", "dicom-gateway", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "MSO_DICOM_ALLOWED_AES" in result.stdout and "database" not in result.stderr
    assert not (tmp_path / "absent").exists()
