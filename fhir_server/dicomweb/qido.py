"""QIDO-RS for callers who may see some studies only (DICOM PS3.18 10.6; query keys and
paging: 8.3.4, ``limit`` / ``offset`` 8.3.4.4; UID list matching: PS3.4 C.2.2.2.2).

The bridge adds the caller's visible StudyInstanceUIDs (intersected with any the query names)
to the query as UID lists, asks Orthanc in chunks with no paging, merges the matches, orders
them by their UIDs and pages them itself: the archive never sees a UID outside the caller's
reach, so neither a match nor a count can tell that a hidden study exists. Pure.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fhir_server.fhir.outcome import FhirError

STUDY_UID_TAG = "0020000D"
SERIES_UID_TAG = "0020000E"
SOP_UID_TAG = "00080018"
_STUDY_UID_KEYS = frozenset({"StudyInstanceUID", STUDY_UID_TAG})
_PAGING_KEYS = frozenset({"limit", "offset"})
# the order of merged matches per level: their UIDs from the study down
_ORDER = {
    "studies": (STUDY_UID_TAG,),
    "series": (STUDY_UID_TAG, SERIES_UID_TAG),
    "instances": (STUDY_UID_TAG, SERIES_UID_TAG, SOP_UID_TAG),
}
UID_CHUNK = 50  # UIDs in one Orthanc query (64 characters each at most: a URL under 4 kB)


@dataclass(frozen=True)
class RestrictedQuery:
    """A query narrowed to visible studies: the other query keys, the study UIDs to ask for,
    and the page to cut from the merged matches."""

    params: list[tuple[str, str]]
    uids: list[str]
    offset: int
    limit: int | None

    def chunked(self, size: int = UID_CHUNK) -> Iterator[list[tuple[str, str]]]:
        """The Orthanc queries: the other keys plus one chunk of the study UIDs each."""
        for start in range(0, len(self.uids), size):
            chunk = ",".join(self.uids[start : start + size])
            yield [*self.params, ("StudyInstanceUID", chunk)]


def paging(params: Sequence[tuple[str, str]]) -> tuple[int, int | None]:
    """``offset`` and ``limit`` of a query (400 when not a non-negative integer)."""
    values: dict[str, int] = {}
    for key, value in params:
        if key in _PAGING_KEYS:
            if not value.isdigit():
                raise FhirError(
                    400,
                    "invalid",
                    f"'{key}' must be a non-negative integer",
                    code="MSO-DICOMWEB-400",
                )
            values[key] = int(value)
    return values.get("offset", 0), values.get("limit")


def restrict(params: Sequence[tuple[str, str]], visible: Sequence[str]) -> RestrictedQuery:
    """``params`` narrowed to the ``visible`` study UIDs (and to those the query names)."""
    offset, limit = paging(params)
    allowed = list(visible)
    kept: list[tuple[str, str]] = []
    for key, value in params:
        if key in _PAGING_KEYS:
            continue
        if key in _STUDY_UID_KEYS:
            asked = {v.strip() for v in value.replace("\\", ",").split(",") if v.strip()}
            allowed = [uid for uid in allowed if uid in asked]
            continue
        kept.append((key, value))
    return RestrictedQuery(kept, allowed, offset, limit)


def merge_page(
    answers: Sequence[list[dict[str, Any]]], level: str, offset: int, limit: int | None
) -> list[dict[str, Any]]:
    """The matches of all chunks, ordered by their UIDs, cut to ``offset`` / ``limit``."""
    tags = _ORDER[level]
    merged = [match for answer in answers for match in answer]
    merged.sort(key=lambda match: tuple(_first(match, tag) for tag in tags))
    end = None if limit is None else offset + limit
    return merged[offset:end]


def _first(match: dict[str, Any], tag: str) -> str:
    values = (match.get(tag) or {}).get("Value") or [""]
    return str(values[0])
