"""The gateway's FHIR side: ImagingStudy sync, case uploads and priors, each on its own thread.

``build_sync(settings, spool)`` assembles, from :class:`~dicom_gateway.config.GatewaySettings`,
one SMART Backend Services FHIR client (:mod:`dicom_gateway.fhir_client`) and four loops that
each poll every ``poll_interval`` seconds:

* :class:`~dicom_gateway.change_feed.ChangeFeed`: Orthanc's change feed -> ImagingStudy
  (FHIR R4 ImagingStudy, from the DICOM JSON model of PS3.18 F.2);
* :class:`~dicom_gateway.uploads.UploadPoller`: DICOM case documents -> the spool, linked;
* :class:`~dicom_gateway.priors.PriorsWorker`: ``import-priors`` Tasks -> C-FIND / C-MOVE
  (PS3.4 C.4) from the hospital PACS, linked;
* :class:`~dicom_gateway.deidentify_task.DeidentifyWorker`: ``deidentify-imaging`` Tasks -> a
  de-identified copy (PS3.15 Annex E) through the spool, linked.

The gateway's ``gateway.py`` calls ``svc.start()`` after its SCP and forwarders and
``svc.stop()`` on shutdown. A loop survives any error of one pass (logged; the next pass tries
again) so a down server or Orthanc only delays the sync.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_gateway.change_feed import ChangeFeed
from dicom_gateway.config import GatewaySettings
from dicom_gateway.deidentify_task import DeidentifyWorker
from dicom_gateway.fhir_client import FhirClient, load_key
from dicom_gateway.links import StudyLinks
from dicom_gateway.orthanc import OrthancClient
from dicom_gateway.priors import PriorsWorker
from dicom_gateway.state import secret_key
from dicom_gateway.study_sync import PatientSystems, StudySync
from dicom_gateway.uploads import SpoolLike, UploadPoller

log = logging.getLogger(__name__)


def dicomweb_base(settings: GatewaySettings) -> str:
    """The public DICOMweb base for Endpoints: the setting, else the FHIR base's ``/fhir``
    replaced by ``/dicomweb``."""
    if settings.dicomweb_url:
        return settings.dicomweb_url.rstrip("/")
    base = (settings.fhir_base_url or "").rstrip("/")
    head, sep, _ = base.rpartition("/fhir")
    return f"{head}/dicomweb" if sep else f"{base}/dicomweb"


@dataclass
class Loop:
    """One polling thread: ``step`` every ``interval`` seconds until stopped."""

    name: str
    step: Callable[[], object]
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"sync-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("%s pass failed; trying again", self.name)
            self._stop.wait(self.interval)


@dataclass
class SyncService:
    """The sync loops and what they share."""

    fhir: FhirClient
    orthanc: OrthancClient
    feed: ChangeFeed
    uploads: UploadPoller
    priors: PriorsWorker
    deidentify: DeidentifyWorker
    loops: list[Loop]

    def start(self) -> None:
        """Start every loop."""
        for loop in self.loops:
            loop.start()
        log.info("ImagingStudy sync started")

    def stop(self) -> None:
        """Stop the loops (each finishes its current pass) and close the clients."""
        for loop in self.loops:
            loop.stop()
        self.fhir.close()
        self.orthanc.close()

    def run_once(self) -> None:
        """One pass of every loop, in order (tests, one-shot runs)."""
        self.uploads.poll_once()
        self.priors.poll_once()
        self.deidentify.run_once()
        self.feed.poll_once()


def build_sync(settings: GatewaySettings, spool: SpoolLike) -> SyncService:
    """The sync service for ``settings`` (``fhir_base_url``, ``client_id`` and
    ``private_key`` are required), spooling uploads into ``spool``."""
    if not (settings.fhir_base_url and settings.client_id and settings.private_key):
        raise ValueError("the sync needs fhir_base_url, client_id and private_key")
    fhir = FhirClient(
        settings.fhir_base_url,
        client_id=settings.client_id,
        private_key=load_key(settings.private_key),
        scope=settings.scope,
    )
    password = settings.orthanc_password.get_secret_value() if settings.orthanc_password else None
    orthanc = OrthancClient(settings.orthanc_url, user=settings.orthanc_user, password=password)
    links = StudyLinks(settings.spool_dir)
    patients = PatientSystems.parse(settings.patient_id_system, settings.issuer_systems)
    studies = StudySync(
        fhir=fhir,
        orthanc=orthanc,
        links=links,
        patients=patients,
        dicomweb_url=dicomweb_base(settings),
    )
    feed = ChangeFeed(
        orthanc=orthanc,
        studies=studies,
        spool_dir=settings.spool_dir,
        retry_interval=max(30.0, settings.poll_interval),
    )
    uploads = UploadPoller(fhir=fhir, spool=spool, links=links, spool_dir=settings.spool_dir)
    priors = PriorsWorker(
        fhir=fhir,
        links=links,
        patients=patients,
        remote=settings.remote_pacs,
        aet=settings.aet,
    )
    deidentify = DeidentifyWorker(
        fhir=fhir,
        orthanc=orthanc,
        spool=spool,
        links=links,
        secret=secret_key(settings.spool_dir, "deidentify"),
    )
    interval = settings.poll_interval
    loops = [
        Loop("orthanc-changes", feed.poll_once, interval),
        Loop("uploads", uploads.poll_once, interval),
        Loop("priors", priors.poll_once, interval),
        Loop("deidentify", deidentify.run_once, interval),
    ]
    return SyncService(fhir, orthanc, feed, uploads, priors, deidentify, loops)
