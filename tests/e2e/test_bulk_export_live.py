"""Bulk Data export with real processes on PostgreSQL (issue 17): ``mso serve`` without its
own worker thread and separate ``mso worker`` processes sharing the database and the output
folder.

* A worker SIGKILLed in the middle of an export leaves a lease that runs out; other workers
  resume the job from its last checkpoint and the export holds exactly the database's
  resources: none twice, none missing.
* A resource with a ~40 MB inline attachment is exported by a worker whose peak RSS
  (``VmHWM``) stays bounded, and the exported line equals the stored resource.

https://hl7.org/fhir/uv/bulkdata/STU3/export.html
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from tests.conftest import authorized
from tests.e2e.conftest import start_server, stop_server
from tests.integration.bulk_helpers import (
    accepted,
    check_manifest,
    download,
    job_id_of,
    kick_off,
    register_backend_client,
    token_endpoint,
    wait_manifest,
)

# PostgreSQL only (SKIP LOCKED queues shared by processes): SQLite is not a parameter here.
pytestmark = pytest.mark.parametrize(
    "fresh_db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)

RSS_BOUND_MB = 300
ATTACHMENT_BYTES = 40 * 1024 * 1024


def _pg(db_url: str) -> str:
    return db_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _env(db_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MSO_DATABASE_URL": db_url,
        "MSO_DATA_DIR": str(data_dir),
        "MSO_BULK_DIR": str(data_dir / "bulk"),
        "MSO_BULK_WORKER": "false",
        **extra,
    }
    env.pop("MSO_BASE_URL", None)
    return env


class Workers:
    """``mso worker`` processes started by one test, stopped (or killed) at its end."""

    def __init__(self, db_url: str, data_dir: Path, **env: str) -> None:
        self.env = _env(db_url, data_dir, **env)
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = (self.data_dir / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_server.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-1500:]
            for p in sorted(self.data_dir.glob("worker-*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def live(fresh_db_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(database URL, FHIR base URL, data folder) of a live ``mso serve`` without a worker
    thread, able to take a ~55 MB resource."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {
        "MSO_BULK_WORKER": "false",
        "MSO_BULK_DIR": str(data_dir / "bulk"),
        "MSO_MAX_RESOURCE_BYTES": str(96 * 1024 * 1024),
    }
    proc, base = start_server(fresh_db_url, data_dir, workers=1, env=env)
    try:
        yield fresh_db_url, base, data_dir
    finally:
        stop_server(proc)


def _platform_headers(http: httpx.Client, db_url: str, base: str) -> dict[str, str]:
    """A real backend client (no organization) of the live server and its token."""
    from fhir_server.auth.clients import ClientStore
    from fhir_server.storage.engine import build_engine

    engine = build_engine(db_url)
    try:
        client = register_backend_client(ClientStore(engine), token_endpoint(http, base))
    finally:
        engine.dispose()
    return client.headers(http, "system/*.rs")


def _load(http: httpx.Client, base: str, headers: dict[str, str], patients: int, per: int) -> None:
    """``patients`` Patients with ``per`` Observations each, in transaction Bundles."""
    entries: list[dict[str, Any]] = []

    def flush() -> None:
        if entries:
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            response = http.post(f"{base}", json=bundle, headers=headers, timeout=120)
            assert response.status_code == 200, response.text[:2000]
            entries.clear()

    for n in range(patients):
        full = f"urn:uuid:{uuid.uuid4()}"
        entries.append(
            {
                "fullUrl": full,
                "resource": {"resourceType": "Patient", "name": [{"family": f"Load{n}"}]},
                "request": {"method": "POST", "url": "Patient"},
            }
        )
        for k in range(per):
            entries.append(
                {
                    "resource": {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                        "subject": {"reference": full},
                        "valueQuantity": {"value": 60 + k, "unit": "/min"},
                        "note": [{"text": "x" * 200}],
                    },
                    "request": {"method": "POST", "url": "Observation"},
                }
            )
        if len(entries) >= 500:
            flush()
    flush()


def _database_refs(db_url: str) -> set[str]:
    with psycopg.connect(_pg(db_url)) as conn:
        rows = conn.execute("SELECT res_type, res_id FROM resource WHERE NOT deleted").fetchall()
    return {f"{t}/{i}" for t, i in rows}


def _exported_refs(
    http: httpx.Client, manifest: dict[str, Any], headers: dict[str, str]
) -> list[str]:
    refs: list[str] = []
    for item in manifest["output"]:
        resources = download(http, item["url"], headers)
        assert len(resources) == item["count"], item
        assert all(r["resourceType"] == item["type"] for r in resources)
        refs += [f"{r['resourceType']}/{r['id']}" for r in resources]
    return refs


def _exported_so_far(response: httpx.Response) -> int:
    match = re.search(r"\d+", response.headers.get("x-progress", ""))
    return int(match.group()) if match else 0


def test_a_worker_killed_mid_export_loses_and_repeats_nothing(live, tmp_path: Path) -> None:
    db_url, base, data_dir = live
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        _load(http, base, authorized(db_url, base), patients=500, per=5)
        headers = _platform_headers(http, db_url, base)
        truth = _database_refs(db_url)
        assert len(truth) >= 3000
        status_url = accepted(kick_off(http, f"{base}/$export", headers))
        workers = Workers(
            db_url,
            data_dir,
            MSO_BULK_LEASE_SECONDS="3",
            MSO_BULK_POLL_INTERVAL="0.2",
            MSO_BULK_BATCH_SIZE="10",
            MSO_BULK_FILE_MAX_BYTES=str(16 * 1024),
        )
        try:
            first = workers.start()
            deadline = time.monotonic() + 30
            while True:
                status = http.get(status_url, headers=headers)
                assert status.status_code == 202, f"done before the kill: {status.text[:300]}"
                if _exported_so_far(status) > 0:
                    break
                assert first.poll() is None, workers.logs()
                assert time.monotonic() < deadline, workers.logs()
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            at_kill = _exported_so_far(http.get(status_url, headers=headers))
            assert 0 < at_kill < len(truth)
            # the job is not lost: others take it over once the lease ran out
            workers.start()
            workers.start()
            # a bound against a hang, not a speed figure (the export took 35-46 s here)
            manifest = wait_manifest(http, status_url, headers, timeout=90)
        finally:
            workers.stop_all()
        check_manifest(manifest)
        assert manifest["error"] == []
        assert len(manifest["output"]) > 10, "few files: the split size was not honoured"
        refs = _exported_refs(http, manifest, headers)
        assert len(refs) == len(set(refs)), "resources exported twice"
        assert set(refs) == truth
        with psycopg.connect(_pg(db_url)) as conn:
            row = conn.execute(
                "SELECT attempts FROM bulk_job WHERE id = %s", (job_id_of(status_url),)
            ).fetchone()
        assert row is not None and row[0] >= 2, "the job was not claimed again after the kill"
    assert time.monotonic() - started < 60


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def test_40mb_attachments_are_exported_with_bounded_worker_memory(live) -> None:
    """A Media with the attachment inline in its JSON, and a Binary uploaded raw (its bytes in
    the blob store), each ~40 MB: the worker's peak RSS stays bounded, each exported line is
    the stored resource."""
    db_url, base, data_dir = live
    started = time.monotonic()
    raw = os.urandom(ATTACHMENT_BYTES)
    encoded = base64.b64encode(raw).decode()
    media = {
        "resourceType": "Media",
        "status": "completed",
        "content": {"contentType": "application/octet-stream", "data": encoded, "title": "scan"},
    }
    with httpx.Client(timeout=120) as http:
        writer = authorized(db_url, base)
        created = http.post(
            f"{base}/Media",
            content=orjson.dumps(media),
            headers={**writer, "Content-Type": "application/fhir+json"},
        )
        assert created.status_code == 201, created.text[:500]
        media_id = created.json()["id"]
        del created, media
        uploaded = http.post(
            f"{base}/Binary",
            content=raw,
            headers={**writer, "Content-Type": "application/octet-stream"},
        )
        assert uploaded.status_code == 201, uploaded.text[:500]
        binary_id = uploaded.headers["location"].split("/Binary/")[1].split("/")[0]
        small = {
            "resourceType": "Media",
            "status": "completed",
            "content": {"contentType": "text/plain", "data": "aGk="},
        }
        assert http.post(f"{base}/Media", json=small, headers=writer).status_code == 201
        headers = _platform_headers(http, db_url, base)
        status_url = accepted(
            kick_off(http, f"{base}/$export", headers, params={"_type": "Media,Binary"})
        )
        workers = Workers(db_url, data_dir, MSO_BULK_POLL_INTERVAL="0.2")
        try:
            worker = workers.start()
            manifest = wait_manifest(http, status_url, headers, timeout=45)
            assert worker.poll() is None, workers.logs()
            peak = _peak_rss_mb(worker.pid)
            print(f"worker peak RSS {peak:.0f} MB")  # shown with pytest -s
        finally:
            workers.stop_all()
        check_manifest(manifest)
        lines: dict[str, dict[str, Any]] = {}
        for item in manifest["output"]:
            for resource in download(http, item["url"], headers):
                lines[f"{resource['resourceType']}/{resource['id']}"] = resource
        assert len(lines) == 3, sorted(lines)
        stored = http.get(f"{base}/Media/{media_id}", headers=writer)
        assert stored.status_code == 200
        assert lines[f"Media/{media_id}"] == stored.json()
        assert lines[f"Media/{media_id}"]["content"]["data"] == encoded
        exported_binary = lines[f"Binary/{binary_id}"]
        assert exported_binary["contentType"] == "application/octet-stream"
        assert exported_binary["data"] == encoded
    assert peak < RSS_BOUND_MB, f"worker peak RSS {peak:.0f} MB"
    assert time.monotonic() - started < 60
