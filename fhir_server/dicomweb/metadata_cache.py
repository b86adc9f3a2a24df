"""The series metadata cache: WADO-RS series metadata (DICOM PS3.18 10.4.1.1.2, the DICOM
JSON model of F.2) kept gzip-compressed in the database
(:mod:`fhir_server.storage.dicomweb_schema`).

Orthanc builds a series' metadata from every instance file on each request: seconds on a large
series, the slowest call a viewer makes. The bridge answers it from here, filled on the first
request (and warmed by the DICOM gateway, which asks for it after each sync). An entry is keyed
by study, series and bridge base URL (its URLs point at that base) and is valid for one version
of the study's ImagingStudy: when the ImagingStudy changes (the gateway updates it as instances
arrive) the next request refills it; when the ImagingStudy is deleted, or stops naming a study,
the study's entries go in the same transaction (:func:`forget_on_write`: they hold the
patient's data). Blocking (database): callers run it on a worker thread.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from fhir_server.hooks import HookEvent, HookPoint, Hooks
from fhir_server.storage.dicomweb_schema import dicomweb_metadata_cache as table


@dataclass(frozen=True)
class CacheKey:
    """What an entry is for: a series, seen through one bridge base URL."""

    study: str
    series: str
    base: str

    @property
    def base_key(self) -> str:
        """The base URL's digest (the key column)."""
        return hashlib.sha256(self.base.encode()).hexdigest()


@dataclass(frozen=True)
class CachedMetadata:
    """One entry: the gzip-compressed DICOM JSON and its entity tag."""

    gzipped: bytes
    etag: str
    source_version: str

    def plain(self) -> bytes:
        """The DICOM JSON, decompressed (for clients that do not accept gzip)."""
        return gzip.decompress(self.gzipped)


class MetadataCache:
    """Read and fill entries; a stale or missing entry reads as ``None``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, key: CacheKey, source_version: str) -> CachedMetadata | None:
        """The entry of ``key`` if it was filled for ``source_version``."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(table.c.content, table.c.etag, table.c.source_version).where(
                    table.c.study_uid == key.study,
                    table.c.series_uid == key.series,
                    table.c.base_key == key.base_key,
                )
            ).first()
        if row is None or row.source_version != source_version:
            return None
        return CachedMetadata(bytes(row.content), row.etag, row.source_version)

    def put(self, key: CacheKey, source_version: str, plain: bytes) -> CachedMetadata:
        """Store ``plain`` (DICOM JSON) compressed for ``key`` and ``source_version``,
        replacing any older entry; a concurrent fill of the same entry wins harmlessly."""
        gzipped = gzip.compress(plain, compresslevel=6, mtime=0)
        entry = CachedMetadata(gzipped, hashlib.sha256(gzipped).hexdigest()[:32], source_version)
        where = (
            table.c.study_uid == key.study,
            table.c.series_uid == key.series,
            table.c.base_key == key.base_key,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(table).where(*where))
                conn.execute(
                    insert(table).values(
                        study_uid=key.study,
                        series_uid=key.series,
                        base_key=key.base_key,
                        source_version=source_version,
                        etag=entry.etag,
                        size=len(plain),
                        content=gzipped,
                        filled=datetime.now(UTC),
                    )
                )
        except IntegrityError:
            pass  # another process filled it at the same moment: the same answer
        return entry


def forget_studies(conn: Connection, study_uids: set[str]) -> None:
    """Remove every entry of these studies (all series, all base URLs)."""
    if study_uids:
        conn.execute(delete(table).where(table.c.study_uid.in_(sorted(study_uids))))


def forget_on_write(hooks: Hooks, study_uids_of: Callable[[dict[str, Any]], list[str]]) -> None:
    """Register the hooks removing a study's entries when its ImagingStudy is deleted or no
    longer names it (``study_uids_of``: an ImagingStudy body -> its StudyInstanceUIDs)."""

    def forget(event: HookEvent) -> None:
        if event.resource_type != "ImagingStudy" or event.tx is None:
            return
        gone = set(study_uids_of(event.previous or {}))
        if event.point is HookPoint.AFTER_UPDATE:
            gone -= set(study_uids_of(event.resource or {}))
        forget_studies(event.tx.conn, gone)

    hooks.register(HookPoint.AFTER_UPDATE, forget)
    hooks.register(HookPoint.AFTER_DELETE, forget)
