"""The resource paths of the DICOMweb bridge (DICOM PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6
QIDO-RS, and the URI templates of their resources, PS3.18 Table 10.4.1-1 / 10.6.1-2).

:func:`parse` turns the part of a request path after ``/dicomweb`` into a :class:`Target`: what
kind of transaction it is, and which study, series and instance it names. Pure.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from fhir_server.fhir.outcome import FhirError

# PS3.5 9.1: a UID is digits in dot-separated components, 64 characters at most
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64
# what may follow a study, series or instance in a WADO-RS path (PS3.18 10.4.1)
LEVELS = ("studies", "series", "instances")
_RETRIEVE_TAILS = frozenset({"metadata", "rendered", "thumbnail", "frames", "bulk", "bulkdata"})


class Kind(enum.Enum):
    """The transaction a path and method name."""

    QUERY = "QIDO-RS"
    RETRIEVE = "WADO-RS"
    STORE = "STOW-RS"


@dataclass(frozen=True)
class Target:
    """One parsed bridge path. ``level`` is the level a query searches (``studies``,
    ``series``, ``instances``); ``tail`` what follows the most specific UID of a retrieve
    (``("metadata",)``, ``("frames", "1,2")`` …); ``path`` the path below the DICOMweb root."""

    kind: Kind
    path: str
    level: str | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    tail: tuple[str, ...] = ()

    @property
    def is_series_metadata(self) -> bool:
        """``/studies/{s}/series/{x}/metadata``: the answer the metadata cache keeps."""
        return (
            self.kind is Kind.RETRIEVE
            and self.series is not None
            and self.instance is None
            and self.tail == ("metadata",)
        )

    @property
    def is_metadata(self) -> bool:
        """A metadata retrieve (a DICOM JSON answer) at any level."""
        return self.kind is Kind.RETRIEVE and self.tail == ("metadata",)


def is_uid(text: str) -> bool:
    """True when ``text`` is a well-formed DICOM UID."""
    return len(text) <= _UID_MAX and _UID.fullmatch(text) is not None


def not_found() -> FhirError:
    """The one answer for an unknown path, an unknown study and a study the caller may not
    see (a 403 would tell that the study exists)."""
    return FhirError(404, "not-found", "No such DICOMweb resource", code="MSO-DICOMWEB-404")


def parse(method: str, path: str) -> Target:
    """The :class:`Target` of ``method`` on ``path`` (below ``/dicomweb``); 404 for a path that
    names no DICOMweb resource, 405 for a method the resource does not take."""
    segments = [s for s in path.split("/") if s]
    full = "/" + "/".join(segments)
    if len(segments) == 1 and segments[0] in LEVELS:
        if method == "POST" and segments[0] == "studies":
            return Target(Kind.STORE, full)
        return _allowed(method, Target(Kind.QUERY, full, level=segments[0]))
    if len(segments) < 2 or segments[0] != "studies":
        raise not_found()
    study, rest = _uid(segments[1]), segments[2:]
    if rest in (["series"], ["instances"]):
        return _allowed(method, Target(Kind.QUERY, full, level=rest[0], study=study))
    series = instance = None
    if rest[:1] == ["series"]:
        series, rest = _uid(rest[1]), rest[2:]
        if rest == ["instances"]:
            query = Target(Kind.QUERY, full, level="instances", study=study, series=series)
            return _allowed(method, query)
        if rest[:1] == ["instances"]:
            instance, rest = _uid(rest[1]), rest[2:]
    if rest and rest[0] not in _RETRIEVE_TAILS:
        raise not_found()
    if method == "POST" and series is None and not rest:
        return Target(Kind.STORE, full, study=study)
    retrieve = Target(Kind.RETRIEVE, full, None, study, series, instance, tuple(rest))
    return _allowed(method, retrieve)


def _uid(text: str) -> str:
    if not is_uid(text):
        raise not_found()
    return text


def _allowed(method: str, target: Target) -> Target:
    if method not in ("GET", "HEAD"):
        raise FhirError(
            405,
            "not-supported",
            f"{target.kind.value} takes GET here",
            code="MSO-DICOMWEB-405",
        )
    return target
