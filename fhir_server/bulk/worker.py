"""Export workers: ``mso worker`` processes and the thread ``mso serve`` runs
(https://hl7.org/fhir/uv/bulkdata/STU3/export.html).

A worker claims one job at a time from the queue (:mod:`.jobs`), runs it (:mod:`.export`) and
settles it: completed with its files, failed with a reason after :data:`MAX_ATTEMPTS` claims
that each ended in an error, or dropped when the client cancelled it. Workers coordinate only
through the database, so any number of them can run on any host that reaches it; one that is
killed leaves a lease that runs out, and another resumes its job. When the queue is empty a
worker removes expired jobs and their files, then sleeps ``bulk_poll_interval`` seconds (or
until :meth:`ExportWorker.wake`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence

from fhir_server.bulk import jobs
from fhir_server.bulk.export import ExportRun, JobLost
from fhir_server.bulk.files import OutputStore
from fhir_server.config import Settings
from fhir_server.storage.blobs import BlobStore
from fhir_server.storage.repository import Repository
from fhir_server.wiring import build_repository

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # claims of a job that end in an error before it is failed
PURGE_INTERVAL = 60.0


class ExportWorker:
    """Runs the export jobs of ``repo``'s database with ``settings``."""

    def __init__(self, repo: Repository, settings: Settings, *, name: str | None = None) -> None:
        self.repo = repo
        self.settings = settings
        self.store = OutputStore(settings.bulk_path)
        self.blobs = BlobStore(settings.blob_path)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._purged = 0.0

    # -- one job --------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and run one job; False when none was waiting."""
        lease = self.settings.bulk_lease_seconds
        job = jobs.claim(self.repo.engine, owner=self.name[:128], lease=lease)
        if job is None:
            return False
        run = ExportRun(
            self.repo,
            job,
            store=self.store,
            blobs=self.blobs,
            lease=lease,
            file_max_bytes=self.settings.bulk_file_max_bytes,
            batch_size=self.settings.bulk_batch_size,
            batch_max_bytes=self.settings.bulk_batch_max_bytes,
        )
        retention = self.settings.bulk_retention_hours * 3600
        try:
            state = run.run()
        except JobLost:
            self._lost(job)
            return True
        except Exception as exc:
            # the class only: a message could quote resource content
            log.error(
                "export job %s failed on attempt %d: %s", job.id, job.attempts, type(exc).__name__
            )
            if job.attempts >= MAX_ATTEMPTS:
                jobs.fail(
                    self.repo.engine,
                    job,
                    f"The export stopped on an internal error ({type(exc).__name__}) "
                    f"{job.attempts} times",
                    retention=retention,
                )
            else:  # let the next claim (this worker's or another's) retry from the checkpoint
                jobs.save(self.repo.engine, job, lease=0)
            return True
        if not jobs.finish(
            self.repo.engine, job, checkpoint=state, exported=state["exported"], retention=retention
        ):
            self._lost(job)
        return True

    def _lost(self, job: jobs.Job) -> None:
        current = jobs.get(self.repo.engine, job.id)
        if current is None or current.status is jobs.JobStatus.CANCELLED:
            self.store.remove(job.id)  # cancelled meanwhile: its files go too
        log.info("export job %s is no longer this worker's", job.id)

    def run_pending(self) -> int:
        """Run every waiting job in the calling thread; how many ran (tests, one-off runs)."""
        ran = 0
        while self.run_once():
            ran += 1
        return ran

    def purge(self) -> int:
        """Remove the files and rows of expired and cancelled jobs; how many."""
        expired = jobs.expired(self.repo.engine)
        for job_id in expired:
            self.store.remove(job_id)
        jobs.forget(self.repo.engine, expired)
        return len(expired)

    # -- the loop -------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run jobs until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._purged > PURGE_INTERVAL:
                    self._purged = time.monotonic()
                    self.purge()
                if self.run_once():
                    continue
            except Exception as exc:  # the database away: wait and try again
                log.error("export worker: %s", type(exc).__name__)
            self._wake.wait(self.settings.bulk_poll_interval)
            self._wake.clear()

    def wake(self) -> None:
        """Look at the queue now (a job was just queued)."""
        self._wake.set()

    def start(self) -> None:
        """Run :meth:`serve` in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.serve, name="bulk-export", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to stop and wait for it (a running job keeps its checkpoint)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def run(settings: Settings, *, once: bool = False) -> int:
    """Run export jobs of ``settings``' database until SIGTERM or SIGINT (``once``: the
    waiting ones, then return)."""
    repo = build_repository(settings)
    worker = ExportWorker(repo, settings)
    try:
        if once:
            worker.run_pending()
            return 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: worker.stop(timeout=0))
        log.info("export worker %s: waiting for jobs", worker.name)
        worker.serve()
        return 0
    finally:
        repo.dispose()


def build_parser() -> argparse.ArgumentParser:
    """The options of a worker process (``mso worker`` adds ``--database-url``)."""
    parser = argparse.ArgumentParser(
        prog="mso worker",
        description="Run bulk export jobs from the database queue (any number of workers, on "
        "any host that reaches the database). Settings come from the MSO_* environment.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker's options to ``parser``."""
    parser.add_argument(
        "--once", action="store_true", help="run the waiting jobs, then exit (no polling)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fhir_server.bulk``: a worker process with settings from the environment."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(Settings(), once=args.once)
