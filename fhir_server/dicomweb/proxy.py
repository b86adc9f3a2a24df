"""The bridge's client of Orthanc's DICOMweb plugin: one ``httpx.AsyncClient`` (one connection
pool per process, built by :func:`fhir_server.app.create_app`, closed at shutdown) that
streams bodies both ways (DICOM PS3.18 8.6 and 8.7: media types and transfer syntaxes are
negotiated with ``Accept`` / ``Content-Type``, passed through untouched).

Failures of the archive become OperationOutcome errors with texts that name no patient data:
unreachable 502, too slow 504, its own 5xx 502; its 4xx keep their status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import orjson

from fhir_server.config import Settings
from fhir_server.fhir.outcome import FhirError

log = logging.getLogger(__name__)

# request headers a DICOMweb client's request carries on to Orthanc
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "content-length")
# response headers of Orthanc the bridge answers with
FORWARDED_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "content-location",
    "etag",
    "last-modified",
)
_UPSTREAM_4XX = {
    400: ("invalid", "The image archive refused the request as malformed"),
    404: ("not-found", "No such DICOMweb resource"),
    406: ("not-supported", "The image archive cannot answer in the media type asked for"),
    409: ("conflict", "The image archive refused the stored instances"),
    413: ("too-costly", "The image archive refused the request as too large"),
    415: ("not-supported", "The image archive does not accept this media type"),
}


class OrthancProxy:
    """Requests to Orthanc's DICOMweb root; ``None`` settings URL means no archive."""

    def __init__(self, settings: Settings) -> None:
        assert settings.orthanc_url, "OrthancProxy needs MSO_ORTHANC_URL"
        self.root_path = "/" + settings.orthanc_dicomweb_path.strip("/")
        self.base = settings.orthanc_url.rstrip("/") + self.root_path
        auth = None
        if settings.orthanc_user:
            password = (
                settings.orthanc_password.get_secret_value() if settings.orthanc_password else ""
            )
            auth = httpx.BasicAuth(settings.orthanc_user, password)
        self.client = httpx.AsyncClient(
            auth=auth,
            timeout=httpx.Timeout(300.0, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=False,
        )

    async def close(self) -> None:
        """Close the connection pool (application shutdown)."""
        await self.client.aclose()

    async def open(
        self,
        method: str,
        path: str,
        *,
        params: Iterable[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
        body: AsyncIterator[bytes] | None = None,
    ) -> httpx.Response:
        """Send a request and return Orthanc's response with its body still unread (the
        caller streams it on and closes it). A status of 400 or more raises the matching
        :class:`FhirError` (its body is read and dropped: it may name patient data), except
        409, whose DICOM JSON body a STOW-RS client needs."""
        request = self.client.build_request(
            method, self.base + path, params=list(params), headers=headers or {}, content=body
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise FhirError(
                504, "timeout", "The image archive did not answer in time", code="MSO-DICOMWEB-504"
            ) from None
        except httpx.HTTPError as exc:
            log.warning("Orthanc unreachable: %s", type(exc).__name__)
            raise FhirError(
                502,
                "transient",
                "The image archive cannot be reached",
                code="MSO-DICOMWEB-502",
            ) from None
        if response.status_code >= 400 and response.status_code != 409:
            await response.aclose()
            raise upstream_error(response.status_code)
        return response

    async def json(
        self,
        path: str,
        *,
        params: Iterable[tuple[str, str]] = (),
        accept: str = "application/dicom+json",
    ) -> tuple[int, Any]:
        """GET ``path`` as DICOM JSON: (status, parsed body; ``[]`` for an empty 204)."""
        response = await self.open("GET", path, params=params, headers={"accept": accept})
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, _parse(content)

    async def read_all(self, response: httpx.Response) -> Any:
        """The parsed DICOM JSON body of an opened response (closed afterwards)."""
        try:
            return _parse(await response.aread())
        finally:
            await response.aclose()


def upstream_error(status: int) -> FhirError:
    """The error the bridge answers for an Orthanc failure ``status``."""
    if status in _UPSTREAM_4XX:
        issue, text = _UPSTREAM_4XX[status]
        return FhirError(status, issue, text, code=f"MSO-DICOMWEB-{status}")
    if status in (401, 403):
        log.error("Orthanc refused the bridge's credentials (HTTP %s)", status)
    return FhirError(
        502, "exception", f"The image archive failed (HTTP {status})", code="MSO-DICOMWEB-502"
    )


def _parse(content: bytes) -> Any:
    if not content.strip():
        return []
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        raise FhirError(
            502, "exception", "The image archive answered malformed JSON", code="MSO-DICOMWEB-502"
        ) from None
