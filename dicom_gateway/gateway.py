"""The gateway assembled: spool, forwarders to Orthanc, the optional ImagingStudy sync, and the
DICOM SCP (PS3.8 association acceptor), started and stopped in the order that never loses an
instance.

Start: forwarders (they take over what a previous run left in the spool), then the sync, then
the SCP. Stop: the SCP first (no new association; those in progress get a grace period, then
are aborted: whatever they had been answered Success for is already in the spool), then the
sync, then the forwarders, which finish the attempt they are making.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.config import GatewaySettings
from dicom_gateway.forwarder import ForwarderPool, Uploader
from dicom_gateway.orthanc import OrthancClient
from dicom_gateway.scp import build_ae, start_scp
from dicom_gateway.spool import Spool

log = logging.getLogger(__name__)

ASSOCIATION_GRACE = 10.0  # seconds associations in progress may take to finish on stop
STATUS_EVERY = 60.0  # seconds between status log lines (only when something changed)


class Service(Protocol):
    """A background service the gateway starts and stops (the ImagingStudy sync)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def orthanc_uploader_factory(settings: GatewaySettings) -> Callable[[], Uploader]:
    """A factory of Orthanc clients, one per forwarder thread (each its own HTTP session)."""
    password = settings.orthanc_password.get_secret_value() if settings.orthanc_password else None

    def build() -> Uploader:
        return OrthancClient(settings.orthanc_url, user=settings.orthanc_user, password=password)

    return build


class Gateway:
    """One running gateway built from ``settings``; usable as a context manager."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        uploader_factory: Callable[[], Uploader] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self._uploader_factory = uploader_factory or orthanc_uploader_factory(settings)
        self.forwarders = ForwarderPool(
            self.spool,
            self._uploader_factory,
            threads=settings.forwarders,
            retry_max=settings.retry_max,
        )
        self.ae = build_ae(settings)
        self.sync: Service | None = None
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port the SCP listens on (the real one when ``settings.port`` is 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start forwarding, the sync (when a FHIR server is configured), then the SCP."""
        self.forwarders.start()
        if self.settings.fhir_base_url:
            from dicom_gateway.sync import build_sync

            self.sync = build_sync(self.settings, self.spool)
            self.sync.start()
        self._server = start_scp(self.ae, self.settings, self.spool, fallback=self._store_direct)
        allowed = ",".join(sorted(self.settings.allowed)) or "any"
        orthanc = urlsplit(self.settings.orthanc_url)
        log.info(
            "DICOM gateway %s listening on %s:%d (calling AEs: %s), spool %s (%d pending), "
            "forwarding to %s with %d threads%s",
            self.settings.aet,
            self.settings.host,
            self.port,
            allowed,
            self.spool.root.resolve(),
            self.forwarders.pending(),
            f"{orthanc.scheme}://{orthanc.netloc.rpartition('@')[2]}{orthanc.path}",
            self.settings.forwarders,
            ", ImagingStudy sync on" if self.sync else "",
        )

    def _store_direct(self, data: bytes) -> bool:
        """The SCP's fallback when the spool cannot take an instance: Orthanc, at once (a
        client of its own: associations run on their own threads)."""
        uploader = self._uploader_factory()
        try:
            uploader.store(data)
            return True
        except Exception as exc:  # down, refusing, anything: the modality is told to retry
            log.error(
                "Orthanc did not take an instance the spool could not: %s", type(exc).__name__
            )
            return False
        finally:
            uploader.close()

    def stop(self, grace: float = ASSOCIATION_GRACE) -> None:
        """Stop accepting associations, let those in progress finish (up to ``grace`` s),
        stop the sync and the forwarders."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            deadline = time.monotonic() + grace
            while _established(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            for association in server.active_associations:
                association.abort()
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        self.forwarders.stop()
        self.spool.close()
        log.info("DICOM gateway stopped: %s", self.status())

    def status(self) -> dict[str, Any]:
        """Counts of received, forwarded, pending and failed instances."""
        spool = self.spool.status()
        return {
            "received": spool["received"],
            "forwarded": self.forwarders.forwarded,
            "pending": spool["pending"],
            "failed": spool["failed"],
            "retry_delay": self.forwarders.status()["retry_delay"],
        }

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _established(server: ThreadedAssociationServer) -> bool:
    """Whether an association is in progress (a bare connection that never asked for one,
    such as a port probe, does not count)."""
    return any(assoc.is_established for assoc in server.active_associations)


def run(settings: GatewaySettings) -> int:
    """Run a gateway until SIGTERM or SIGINT, then stop it cleanly; the exit status."""
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        gateway = Gateway(settings)
        gateway.start()
        try:
            last = gateway.status()
            while not stopping.wait(STATUS_EVERY):
                if (now := gateway.status()) != last:
                    log.info("status: %s", now)
                    last = now
        finally:
            gateway.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
