"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb`` packages) on free loopback ports.

:func:`start_orthanc` writes a configuration into a folder, starts ``Orthanc`` with the DICOMweb
plugin and waits until its REST API answers; :func:`missing_imaging_tools` says why that cannot
work here (the packages, or dcmtk's ``storescu``, missing). Used by ``python -m bench dicom`` and,
through ``tests/orthanc_process.py``, by the imaging tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import free_port

ORTHANC_BIN = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
START_TIMEOUT = 30.0  # seconds for Orthanc to answer GET /system


def missing_imaging_tools() -> str | None:
    """Why Orthanc cannot run here, or None when Orthanc, its DICOMweb plugin and dcmtk are
    installed."""
    if not Path(ORTHANC_BIN).exists():
        return "Orthanc is not installed (Debian package orthanc)"
    if not any(Path(d, "libOrthancDicomWeb.so").exists() for d in PLUGIN_DIRS):
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    for tool in ("storescu", "findscu", "movescu"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package dcmtk)"
    return None


@dataclass
class Orthanc:
    """A running Orthanc: its REST base, DICOMweb root, DICOM port and AE title."""

    proc: subprocess.Popen
    folder: Path
    http_port: int
    dicom_port: int
    aet: str
    config: dict = field(default_factory=dict)
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """Root of the DICOMweb plugin."""
        return f"{self.url}/dicom-web"

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        """Start it again on the same ports and storage (after :meth:`stop`)."""
        self.stop()
        self.proc = _launch(self.folder, self.url, self.env)

    def instance_count(self) -> int:
        """Instances stored (``/statistics`` CountInstances)."""
        return int(httpx.get(f"{self.url}/statistics", timeout=10).json()["CountInstances"])


def start_orthanc(
    folder: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, list] | None = None,
    extra: dict | None = None,
    env: dict[str, str] | None = None,
) -> Orthanc:
    """Start an Orthanc storing under ``folder`` on free loopback ports; ``modalities`` are its
    known DICOM peers (name -> [AET, host, port]) for C-MOVE targets; ``extra`` overrides or
    adds configuration keys (a None value removes one); ``env`` is added to its environment
    (``TCP_NODELAY=1``: its DICOM toolkit turns Nagle's algorithm off)."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    plugins = [d for d in PLUGIN_DIRS if Path(d, "libOrthancDicomWeb.so").exists()][:1]
    config = {
        "Name": aet,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [str(Path(p, "libOrthancDicomWeb.so")) for p in plugins],
        "DicomModalities": modalities or {},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 2,
        "ConcurrentJobs": 2,
        "HttpVerbose": False,
        "DicomScpTimeout": 30,
        **(extra or {}),
    }
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    url = f"http://127.0.0.1:{http_port}"
    proc = _launch(folder, url, env)
    return Orthanc(proc, folder, http_port, dicom_port, aet, config, env)


def _launch(folder: Path, url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start Orthanc on ``folder/orthanc.json`` (output in ``folder/orthanc.log``) and wait
    until ``url`` answers."""
    log = (folder / "orthanc.log").open("ab")
    proc = subprocess.Popen(
        [ORTHANC_BIN, str(folder / "orthanc.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env} if env else None,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"Orthanc did not start within {START_TIMEOUT:g} s")
