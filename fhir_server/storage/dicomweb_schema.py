"""The DICOMweb bridge's series metadata cache (:mod:`fhir_server.dicomweb.metadata_cache`).

One row per series and bridge base URL: the series' WADO-RS metadata answer (DICOM PS3.18
10.4.1.1.2 "Series metadata", the JSON model of PS3.18 F.2) with every URL already pointing at
the bridge, gzip-compressed. ``base_key`` is the SHA-256 of the bridge's public base URL (the
same series seen through two host names has two answers). ``source_version`` names the
``ImagingStudy`` version the row was filled for (``<id>/<versionId>``): a row whose version is
no longer the study's current one is stale and filled again. ``etag`` is the answer's entity
tag (a digest of the compressed bytes).
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, LargeBinary, String, Table

from fhir_server.storage.base_schema import metadata

dicomweb_metadata_cache = Table(
    "dicomweb_metadata_cache",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("series_uid", String(64), primary_key=True),
    Column("base_key", String(64), primary_key=True),
    Column("source_version", String(128), nullable=False),
    Column("etag", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("filled", DateTime(timezone=True), nullable=False),
)
