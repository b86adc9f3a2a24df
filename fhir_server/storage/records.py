"""What the store hands out and the small rules every layer shares about it.

:class:`StoredResource` (one stored version), the instants of ``meta.lastUpdated`` (UTC,
milliseconds; http://hl7.org/fhir/R4/datatypes.html#instant), logical ids
(http://hl7.org/fhir/R4/datatypes.html#id) and the ``If-Match`` version check
(http://hl7.org/fhir/R4/http.html#concurrency). No engine, no session: search execution, the
access policy and the workflow import it without the repository.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from fhir_server.fhir.outcome import FhirError, gone
from fhir_server.storage.resource_schema import resource, resource_history

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def utc_now() -> datetime:
    """Now in UTC, truncated to milliseconds (what ``meta.lastUpdated`` shows is what is stored)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC (a naive datetime, as SQLite returns them, is taken as UTC)."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def format_instant(value: datetime) -> str:
    """Render a datetime as a FHIR instant with milliseconds, e.g. ``2026-01-02T03:04:05.678Z``."""
    v = as_utc(value)  # formatted by hand: strftime is a hot spot on every request
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        f".{v.microsecond // 1000:03d}Z"
    )


def new_id() -> str:
    """A server-assigned logical id."""
    return str(uuid.uuid4())


def check_id(resource_id: str) -> str:
    """``resource_id``, or a 400 when it is not a valid FHIR id (``[A-Za-z0-9\\-.]{1,64}``):
    no resource can have it, and it never reaches SQL (PostgreSQL refuses a NUL in text). The
    text does not quote it (it is whatever the client sent)."""
    if not ID_PATTERN.match(resource_id):
        raise FhirError(
            400,
            "value",
            "The id is not a valid FHIR id ([A-Za-z0-9-.], 1 to 64 characters)",
            code="MSO-REST-002",
            expression=["id"],
        )
    return resource_id


@dataclass(slots=True)
class StoredResource:
    """One stored version of a resource; ``content`` is its JSON (``None`` when deleted)."""

    pid: int
    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    deleted: bool
    content: bytes | None
    method: str | None = None
    _parsed: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def resource(self) -> dict[str, Any]:
        """The resource as a dict (parsed once, on first use)."""
        if self._parsed is None:
            if self.content is None:
                raise gone(self.res_type, self.res_id, self.version)
            self._parsed = orjson.loads(self.content)
        return self._parsed

    @property
    def etag(self) -> str:
        """The weak ETag of this version."""
        return f'W/"{self.version}"'

    @property
    def reference(self) -> str:
        """``Type/id``."""
        return f"{self.res_type}/{self.res_id}"


def check_version(current: StoredResource, if_match: int | None) -> None:
    """412 when an ``If-Match`` version is given and is not the current one."""
    if if_match is not None and if_match != current.version:
        raise FhirError(
            412,
            "conflict",
            f"{current.reference} is at version {current.version}, not {if_match}",
            code="MSO-REST-412",
            headers={"ETag": current.etag},
        )


# The columns a StoredResource is read from (current rows; history rows add ``method``).
CURRENT_COLUMNS = (
    resource.c.pid,
    resource.c.res_type,
    resource.c.res_id,
    resource.c.version,
    resource.c.last_updated,
    resource.c.deleted,
    resource.c.content,
)
HISTORY_COLUMNS = (
    resource_history.c.pid,
    resource_history.c.res_type,
    resource_history.c.res_id,
    resource_history.c.version,
    resource_history.c.last_updated,
    resource_history.c.deleted,
    resource_history.c.content,
    resource_history.c.method,
)


def stored_from_row(row: Any) -> StoredResource:
    """A :class:`StoredResource` from a row of :data:`CURRENT_COLUMNS` or
    :data:`HISTORY_COLUMNS`."""
    return StoredResource(
        pid=row.pid,
        res_type=row.res_type,
        res_id=row.res_id,
        version=row.version,
        last_updated=as_utc(row.last_updated),
        deleted=row.deleted,
        content=bytes(row.content) if row.content is not None else None,
        method=getattr(row, "method", None),
    )
