"""A thin, generic helper over Orthanc's REST API (https://orthanc.uclouvain.be/book/users/rest.html)
built on orthanc-api-client: store an instance, follow the change feed, read study metadata.

Errors are sorted into the two kinds a caller acts on: :class:`OrthancRejected` (HTTP 400, the
body is not a DICOM file Orthanc accepts: trying again cannot help) and
:class:`OrthancUnavailable` (Orthanc down, slow, overloaded or misconfigured: try again later).
One :class:`OrthancClient` holds one keep-alive HTTP session; give each thread its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as api_errors

STORE_TIMEOUT = 120.0  # seconds for one instance, large multi-frame ones included
READ_TIMEOUT = 30.0


class OrthancUnavailable(Exception):
    """Orthanc could not be reached or did not store the instance; worth trying again."""


class OrthancRejected(Exception):
    """Orthanc refused the content for good (HTTP 400)."""


@dataclass(frozen=True)
class Stored:
    """Orthanc's answer to a store: its instance id and ``Success`` or ``AlreadyStored``."""

    orthanc_id: str
    status: str


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change feed (``GET /changes``)."""

    seq: int
    change_type: str
    resource_type: str
    orthanc_id: str


class OrthancClient:
    """One Orthanc, one HTTP session (connections are kept alive between calls)."""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api = OrthancApiClient(self.url, user=user, pwd=password)

    def store(self, data: bytes) -> Stored:
        """Store one DICOM Part-10 file (``POST /instances``); storing it again is a success
        with status ``AlreadyStored``."""
        body = self._call(self.api.post, "instances", data=data, timeout=STORE_TIMEOUT)
        return Stored(orthanc_id=body["ID"], status=body.get("Status", "Success"))

    def changes(self, since: int = 0, limit: int = 100) -> tuple[list[Change], int, bool]:
        """Changes after ``since``: (changes, last sequence number, whether the feed is done)."""
        body = self.get_json(f"changes?since={int(since)}&limit={int(limit)}")
        changes = [
            Change(c["Seq"], c["ChangeType"], c["ResourceType"], c["ID"]) for c in body["Changes"]
        ]
        return changes, int(body["Last"]), bool(body["Done"])

    def last_change(self) -> int:
        """The sequence number of the newest change (where a new follower starts)."""
        return int(self.get_json("changes?last")["Last"])

    def study(self, orthanc_id: str) -> dict[str, Any]:
        """``GET /studies/{id}``: MainDicomTags, PatientMainDicomTags, Series, ParentPatient."""
        return self.get_json(f"studies/{orthanc_id}")

    def find_study(self, study_uid: str) -> str | None:
        """The Orthanc id of the study with this StudyInstanceUID, or None."""
        found = self._call(
            self.api.post,
            "tools/lookup",
            data=study_uid.encode("ascii"),
            timeout=READ_TIMEOUT,
        )
        return next((r["ID"] for r in found if r.get("Type") == "Study"), None)

    def study_instances(self, orthanc_id: str) -> list[dict[str, Any]]:
        """``GET /studies/{id}/instances``: every instance with its MainDicomTags."""
        return self.get_json(f"studies/{orthanc_id}/instances")

    def get_json(self, path: str) -> Any:
        """GET any REST path (relative to the Orthanc root) and decode the JSON answer."""
        return self._call(self.api.get, path, timeout=READ_TIMEOUT)

    def is_alive(self) -> bool:
        """Whether Orthanc answers ``GET /system``."""
        return self.api.is_alive(timeout=2)

    def close(self) -> None:
        """Close the HTTP session."""
        self.api.close()

    @staticmethod
    def _call(method: Any, path: str, **kwargs: Any) -> Any:
        try:
            response = method(path, **kwargs)
        except api_errors.HttpError as exc:
            if exc.http_status_code == 400:
                raise OrthancRejected(f"Orthanc answered HTTP 400 to {path}") from exc
            raise OrthancUnavailable(f"Orthanc answered HTTP {exc.http_status_code}") from exc
        except api_errors.OrthancApiException as exc:
            raise OrthancUnavailable(type(exc).__name__) from exc
        if response is None:  # orthanc-api-client swallows some transport errors
            raise OrthancUnavailable(f"no answer from Orthanc to {path}")
        try:
            return response.json()
        except ValueError as exc:
            raise OrthancUnavailable(f"Orthanc answered no JSON to {path}") from exc
