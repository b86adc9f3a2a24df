"""Follow Orthanc's change feed and sync every stable study to its FHIR ImagingStudy.

Orthanc logs every change in a sequence (``GET /changes?since=N&limit=M``,
https://orthanc.uclouvain.be/book/users/rest.html#tracking-changes); a ``StableStudy`` change
comes once no instance of the study has arrived for ``StableAge`` seconds (Orthanc's
configuration), and again after more instances arrive later. :class:`ChangeFeed` reads the feed
from a cursor persisted in ``spool_dir/state/orthanc-changes.json`` and advances it past a
change only once that change is handled, so a restart resumes where it stopped and a study is
never skipped while Orthanc or the FHIR server is down (it is synced again on the next pass).

A study without a subject yet (:class:`~dicom_gateway.study_sync.NoSubject`: no Patient with its
PatientID, no case) is kept in ``spool_dir/state/pending-studies.json`` and tried again every
``retry_interval`` seconds; a study the server refuses for good is logged and skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicom_gateway.fhir_client import FhirClientError
from dicom_gateway.orthanc import OrthancClient, OrthancUnavailable
from dicom_gateway.state import Cursor, StateFile, state_dir
from dicom_gateway.study_sync import NoSubject, PermanentError, StudySync, is_transient

log = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"
PAGE = 100


class Retry(Exception):
    """Orthanc or the FHIR server is unavailable: stop this pass, try again later."""


class ChangeFeed:
    """The change-feed follower (one thread calls :meth:`poll_once` repeatedly)."""

    def __init__(
        self,
        *,
        orthanc: OrthancClient,
        studies: StudySync,
        spool_dir: Path,
        retry_interval: float = 30.0,
    ) -> None:
        self.orthanc = orthanc
        self.studies = studies
        self.cursor = Cursor(spool_dir, "orthanc-changes", 0)
        self.pending = StateFile(state_dir(spool_dir) / "pending-studies.json", [])
        self.retry_interval = retry_interval
        self._next_retry = 0.0

    def poll_once(self) -> int:
        """Handle the changes after the cursor (and due pending studies); the number of
        changes the cursor moved past. Never raises for an unavailable peer."""
        try:
            self._retry_pending()
            return self._follow()
        except Retry as exc:
            log.warning("sync paused, will retry: %s", exc)
            return 0

    def _follow(self) -> int:
        handled = 0
        while True:
            since = int(self.cursor.value or 0)
            try:
                changes, last, done = self.orthanc.changes(since, PAGE)
            except OrthancUnavailable as exc:
                raise Retry(f"Orthanc: {exc}") from exc
            for change in changes:
                if change.change_type == STABLE_STUDY and change.resource_type == "Study":
                    self._handle(change.orthanc_id)
                self.cursor.advance(change.seq)
                handled += 1
            if done or not changes:
                if last > int(self.cursor.value or 0) and done:
                    self.cursor.advance(last)
                return handled

    def _handle(self, orthanc_id: str) -> None:
        """Sync one study; :class:`Retry` when it must be tried again (cursor stays)."""
        try:
            self.studies.sync(orthanc_id)
        except NoSubject:
            log.info("study %s has no subject yet: kept pending", orthanc_id)
            self._keep_pending(orthanc_id)
        except PermanentError as exc:
            log.error("study %s not synced: %s", orthanc_id, exc)
        except OrthancUnavailable as exc:
            raise Retry(f"Orthanc: {exc}") from exc
        except FhirClientError as exc:
            if is_transient(exc):
                raise Retry(f"FHIR server: {exc}") from exc
            log.error("study %s not synced: %s", orthanc_id, exc)
        else:
            self._drop_pending(orthanc_id)

    def _keep_pending(self, orthanc_id: str) -> None:
        if orthanc_id not in self.pending.data:
            self.pending.save([*self.pending.data, orthanc_id])

    def _drop_pending(self, orthanc_id: str) -> None:
        if orthanc_id in self.pending.data:
            self.pending.save([p for p in self.pending.data if p != orthanc_id])

    def _retry_pending(self, *, force: bool = False) -> None:
        if not self.pending.data or (not force and time.monotonic() < self._next_retry):
            return
        self._next_retry = time.monotonic() + self.retry_interval
        for orthanc_id in list(self.pending.data):
            self._handle(orthanc_id)

    def retry_pending_now(self) -> None:
        """Try the pending studies again at once (a Patient may have been created)."""
        try:
            self._retry_pending(force=True)
        except Retry as exc:
            log.warning("sync paused, will retry: %s", exc)
