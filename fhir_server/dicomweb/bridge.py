"""The DICOMweb bridge service: authenticate, check access per study, proxy to Orthanc, rebase
URLs, audit (DICOM PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6 QIDO-RS; errors as FHIR
OperationOutcomes, http://hl7.org/fhir/R4/http.html).

Every request needs the caller's SMART access token (the FHIR API's own, audience the FHIR
base URL). Searching needs search access to ImagingStudy, retrieving read access, storing
create access. Callers the access policy hides no ImagingStudy from get Orthanc's answers as
they are (URLs rebased); others see only the studies of their visible ImagingStudies: a search
is narrowed to them (:mod:`.qido`) and any path below ``/studies/{uid}`` of another study answers
404, as for a study that does not exist. Bulk answers (studies, series, instances, frames,
rendered images, bulk data) are streamed through; DICOM JSON answers are read, rebased
(:mod:`.rewrite`) and sent; series metadata comes from :mod:`.metadata_cache`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fhir_server.audit.events import Interaction
from fhir_server.auth.policy import AccessPolicy
from fhir_server.auth.principal import Principal
from fhir_server.auth.scopes import Permission
from fhir_server.config import Settings
from fhir_server.dicomweb.access import StudyAccess, StudyRecord, study_uids
from fhir_server.dicomweb.metadata_cache import (
    CachedMetadata,
    CacheKey,
    MetadataCache,
    forget_on_write,
)
from fhir_server.dicomweb.paths import Kind, Target, not_found, parse
from fhir_server.dicomweb.proxy import (
    FORWARDED_REQUEST_HEADERS,
    FORWARDED_RESPONSE_HEADERS,
    OrthancProxy,
)
from fhir_server.dicomweb.qido import merge_page, paging, restrict
from fhir_server.dicomweb.rewrite import rebase_urls
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.capabilities import dicomweb_url
from fhir_server.storage.repository import Repository

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
FHIR_JSON = "application/fhir+json; charset=utf-8"
_JSON_ACCEPTS = ("*/*", "application/*", DICOM_JSON, "application/json")
_PERMISSION = {Kind.QUERY: Permission.SEARCH, Kind.RETRIEVE: Permission.READ}
_AUDIT_CODE = {Kind.QUERY: "search-type", Kind.RETRIEVE: "read", Kind.STORE: "create"}


@dataclass
class _Call:
    """One request as the bridge sees it (and audits it)."""

    request: Request
    target: Target | None = None
    principal: Principal | None = None
    study: StudyRecord | None = None
    public_base: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class DicomwebBridge:
    """Serves ``/dicomweb/...``; built once by :func:`build_bridge`."""

    def __init__(
        self,
        settings: Settings,
        *,
        access: StudyAccess,
        tokens: Any,
        audit: Any,
        cache: MetadataCache,
        proxy: OrthancProxy | None,
    ) -> None:
        self.settings = settings
        self.access = access
        self.tokens = tokens
        self.audit = audit
        self.cache = cache
        self.proxy = proxy

    async def close(self) -> None:
        """Close Orthanc's connection pool (application shutdown)."""
        if self.proxy is not None:
            await self.proxy.close()

    # -- the request -----------------------------------------------------------------------

    async def handle(self, request: Request, path: str) -> Response:
        """Serve one DICOMweb request; every failure becomes an OperationOutcome."""
        call = _Call(request)
        message = None
        try:
            response = await self._handle(call, path)
        except FhirError as exc:
            response = outcome_response(exc)
            message = exc.message
        except Exception:
            log.exception("Unhandled error serving a DICOMweb %s", request.method)
            error = FhirError(500, "exception", "Internal server error", code="MSO-DICOMWEB-500")
            response = outcome_response(error)
            message = error.message
        if call.principal is not None and call.target is not None:
            self._audit(call, response.status_code, message)
        return response

    async def _handle(self, call: _Call, path: str) -> Response:
        request = call.request
        if self.proxy is None:
            raise FhirError(
                503,
                "not-supported",
                "Imaging is not configured on this server (no image archive: MSO_ORTHANC_URL)",
                code="MSO-DICOMWEB-503",
            )
        fhir_base = self.fhir_base(request)
        call.principal = await run_in_threadpool(
            self.tokens.authenticate,
            request.headers.get("authorization"),
            source=request.client.host if request.client else None,
            audience=fhir_base,
        )
        call.target = target = parse(request.method, path)
        call.public_base = dicomweb_url(fhir_base)
        if target.kind is Kind.STORE:
            return await self._store(call, self.proxy)
        self.access.require(call.principal, _PERMISSION[target.kind])
        sees_all = self.access.sees_every_study(call.principal)
        if target.study is not None:
            call.study = await run_in_threadpool(self.access.find, call.principal, target.study)
            if call.study is None and not sees_all:
                raise not_found()
        if target.kind is Kind.QUERY:
            if target.study is None and not sees_all:
                return await self._restricted_query(call, self.proxy)
            return await self._json(call, self.proxy, dict(request.query_params.multi_items()))
        if target.is_series_metadata and call.study is not None:
            return await self._series_metadata(call, self.proxy, call.study)
        if target.is_metadata:
            return await self._json(call, self.proxy, {})
        return await self._stream(call, self.proxy)

    def fhir_base(self, request: Request) -> str:
        """The public FHIR base URL (configured, or derived from the request): the tokens'
        audience."""
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/fhir"

    # -- QIDO-RS and DICOM JSON answers ----------------------------------------------------

    async def _json(self, call: _Call, proxy: OrthancProxy, params: Any) -> Response:
        """A DICOM JSON answer of Orthanc (search or metadata), URLs rebased."""
        assert call.target is not None
        _require_json(call.request)
        items = params.items() if isinstance(params, dict) else params
        if call.target.kind is Kind.QUERY:
            items = list(call.request.query_params.multi_items())
            paging(items)  # 400 before asking the archive
        status, body = await proxy.json(call.target.path, params=items)
        rebase_urls(body, proxy.root_path, call.public_base)
        return _dicom_json(status, body)

    async def _restricted_query(self, call: _Call, proxy: OrthancProxy) -> Response:
        """A root-level search narrowed to the caller's visible studies (:mod:`.qido`)."""
        assert call.target is not None and call.target.level is not None
        _require_json(call.request)
        params = list(call.request.query_params.multi_items())
        visible = await run_in_threadpool(self.access.visible_uids, call.principal)
        query = restrict(params, visible)
        answers = await asyncio.gather(
            *(proxy.json(call.target.path, params=chunk) for chunk in query.chunked())
        )
        lists = [body for _, body in answers if isinstance(body, list)]
        matches = merge_page(lists, call.target.level, query.offset, query.limit)
        rebase_urls(matches, proxy.root_path, call.public_base)
        return _dicom_json(200, matches)

    async def _series_metadata(
        self, call: _Call, proxy: OrthancProxy, study: StudyRecord
    ) -> Response:
        """Series metadata from the cache, filled from Orthanc when missing or stale."""
        target = call.target
        assert target is not None and target.study and target.series
        _require_json(call.request)
        key = CacheKey(target.study, target.series, call.public_base)
        entry = await run_in_threadpool(self.cache.get, key, study.source_version)
        state = "hit"
        if entry is None:
            state = "miss"
            _, body = await proxy.json(target.path)
            rebase_urls(body, proxy.root_path, call.public_base)
            entry = await run_in_threadpool(
                self.cache.put, key, study.source_version, orjson.dumps(body)
            )
        return _cached_response(call.request, entry, state)

    # -- WADO-RS bulk answers --------------------------------------------------------------

    async def _stream(self, call: _Call, proxy: OrthancProxy) -> Response:
        """Orthanc's answer streamed through as it comes (studies, frames, rendered …)."""
        assert call.target is not None
        request = call.request
        headers = _forwarded(request)
        headers["accept-encoding"] = request.headers.get("accept-encoding", "identity")
        upstream = await proxy.open(
            request.method,
            call.target.path,
            params=request.query_params.multi_items(),
            headers=headers,
        )
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers=_answer_headers(upstream.headers),
            background=BackgroundTask(upstream.aclose),
        )

    # -- STOW-RS ---------------------------------------------------------------------------

    async def _store(self, call: _Call, proxy: OrthancProxy) -> Response:
        """STOW-RS: the request body streamed to Orthanc. A caller who does not see every
        study stores into a study it sees only (``POST /studies/{uid}``; Orthanc refuses
        instances of another study in that request, PS3.18 10.5.1)."""
        target, request = call.target, call.request
        assert target is not None
        self.access.require(call.principal, Permission.CREATE)
        sees_all = self.access.sees_every_study(call.principal)
        if target.study is not None:
            call.study = await run_in_threadpool(self.access.find, call.principal, target.study)
            if call.study is None and not sees_all:
                raise not_found()
        elif not sees_all:
            raise FhirError(
                403,
                "forbidden",
                "Store into a study of your cases: POST /dicomweb/studies/{StudyInstanceUID}",
                code="MSO-DICOMWEB-403",
            )
        limit = self.settings.max_binary_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit)
        upstream = await proxy.open(
            "POST",
            target.path,
            headers=_forwarded(request),
            body=_capped(request.stream(), limit),
        )
        body = await proxy.read_all(upstream)
        rebase_urls(body, proxy.root_path, call.public_base)
        return _dicom_json(upstream.status_code, body)

    # -- audit -----------------------------------------------------------------------------

    def _audit(self, call: _Call, status: int, message: str | None) -> None:
        """An AuditEvent like a FHIR read, search or create of the study's ImagingStudy; the
        DICOMweb request line is its query entity."""
        if self.audit is None:
            return
        target, request = call.target, call.request
        assert target is not None
        query = f"{request.method} /dicomweb{target.path}"
        if request.url.query:
            query += f"?{request.url.query}"
        study = call.study
        self.audit.interaction(
            call.principal,
            Interaction(
                interaction=_AUDIT_CODE[target.kind],
                status=status,
                resource_type="ImagingStudy",
                resource_id=study.id if study else None,
                query=query,
                source=request.client.host if request.client else None,
                message=message,
                patients=[study.patient] if study and study.patient else [],
            ),
        )


def build_bridge(
    settings: Settings, repo: Repository, *, tokens: Any, audit: Any
) -> DicomwebBridge:
    """The bridge of an application: Orthanc's client when ``orthanc_url`` is set."""
    policy = repo.policy
    assert isinstance(policy, AccessPolicy), "the DICOMweb bridge needs the MSO access policy"
    forget_on_write(repo.hooks, study_uids)
    return DicomwebBridge(
        settings,
        access=StudyAccess(repo, policy),
        tokens=tokens,
        audit=audit,
        cache=MetadataCache(repo.engine),
        proxy=OrthancProxy(settings) if settings.orthanc_url else None,
    )


# -- responses -----------------------------------------------------------------------------


def outcome_response(error: FhirError) -> Response:
    """``error`` as an OperationOutcome with its status and headers."""
    return Response(
        orjson.dumps(error.to_outcome()),
        status_code=error.status,
        media_type=FHIR_JSON,
        headers=error.headers,
    )


def _dicom_json(status: int, body: Any) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=DICOM_JSON)


def _cached_response(request: Request, entry: CachedMetadata, state: str) -> Response:
    """The cached metadata: 304 when the client has it, gzip as stored when it accepts gzip."""
    etag = f'W/"{entry.etag}"'
    headers = {
        "ETag": etag,
        "Vary": "Accept-Encoding",
        "Cache-Control": "private, no-cache",
        "X-MSO-Metadata-Cache": state,
    }
    asked = request.headers.get("if-none-match", "")
    if any(tag.strip().removeprefix("W/") == etag[2:] for tag in asked.split(",")):
        return Response(status_code=304, headers=headers)
    if accepts_gzip(request.headers.get("accept-encoding", "")):
        headers["Content-Encoding"] = "gzip"
        return Response(entry.gzipped, media_type=DICOM_JSON, headers=headers)
    return Response(entry.plain(), media_type=DICOM_JSON, headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """True when an ``Accept-Encoding`` value allows gzip (RFC 9110 12.5.3)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and float(q[2:] or 0) == 0)
    return False


def _require_json(request: Request) -> None:
    """406 unless the client accepts DICOM JSON (the bridge answers searches and metadata in
    JSON only: it rewrites their URLs)."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    ranges = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    if not any(r in _JSON_ACCEPTS for r in ranges):
        raise FhirError(
            406,
            "not-supported",
            "The DICOMweb bridge answers searches and metadata as application/dicom+json",
            code="MSO-DICOMWEB-406",
        )


def _forwarded(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}


def _answer_headers(upstream: Any) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}


def _too_large(limit: int) -> FhirError:
    return FhirError(
        413,
        "too-costly",
        f"A STOW-RS request may carry {limit} bytes at most",
        code="MSO-DICOMWEB-413",
    )


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``stream`` passed on chunk by chunk, stopped with a 413 past ``limit`` bytes."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        yield chunk
