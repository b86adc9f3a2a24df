"""The FHIR REST endpoint: HTTP in, :class:`FhirRequest` to a handler, HTTP out.

Only transport concerns live here (http://hl7.org/fhir/R4/http.html#general): media types and
``_format`` (JSON only: XML is a 406), body size limits (413), ``Prefer``, ``_pretty``, header
names, streaming raw Binary content to the blob store, and turning every error into an
OperationOutcome with its status. Routing uses the same table as transaction entries
(:mod:`fhir_server.interactions.table`).

Every request except ``metadata`` must carry a valid bearer token (SMART App Launch): the
token's principal becomes the caller the repository applies the access policy to, before the
body is even read. Every request that gets that far is audited (``fhir_server.audit``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from fhir_server.audit.events import Interaction
from fhir_server.auth.principal import Principal
from fhir_server.config import Settings
from fhir_server.fhir import jsonio
from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions import binary, capabilities, create, read, search, update
from fhir_server.interactions.base import (
    BlobStore,
    FhirRequest,
    FhirResponse,
    InteractionContext,
    Prefer,
    Repository,
    Services,
    Written,
)
from fhir_server.interactions.table import ROUTER, Route, interaction_of, resolve_route
from fhir_server.search.budget import SearchBudget, SearchLimits, budget_scope, current_budget

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json; charset=utf-8"
PATCH_TYPES = frozenset({"application/json-patch+json"})
FORM = "application/x-www-form-urlencoded"
_JSON_FORMATS = frozenset(
    {"json", "application/json", "application/fhir+json", "application/json+fhir"}
)
_TRANSPORT_PARAMS = frozenset({"_format", "_pretty"})
# ``\u0000`` escaped in JSON text, not preceded by an escaped backslash: a NUL in a string,
# which no FHIR string may hold (http://hl7.org/fhir/R4/datatypes.html#string) and PostgreSQL's
# text and jsonb refuse.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_INLINE = (read.read, read.vread)
_SEARCHES = (search.search_type, search.search_system)
# Search parameters whose values name the patient a search is about (audit entity).
_PATIENT_PARAMS = frozenset({"patient", "subject", "_id"})
# Searches whose values are not written to the audit trail (they could quote chat text).
_PRIVATE_QUERY_TYPES = frozenset({"Communication"})


class _Seen:
    """What the audit record of a request needs, filled in as the request is handled."""

    __slots__ = ("principal", "req", "route", "written")

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.route: Route | None = None
        self.req: FhirRequest | None = None
        self.written: tuple[Written, ...] = ()


def _mime(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _wants_fhir(request: Request) -> bool:
    """True unless the client asked (by ``_format`` or Accept) for something other than JSON."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        return fmt.split(";")[0].strip().lower() in _JSON_FORMATS
    accept = request.headers.get("accept")
    if not accept:
        return True
    types = {_mime(part) for part in accept.split(",")}
    return bool(types & (_JSON_FORMATS | {"*/*", "application/*"}))


class FhirEndpoint:
    """Holds what every request needs and handles them."""

    def __init__(
        self,
        repo: Repository,
        settings: Settings,
        blobs: BlobStore,
        *,
        tokens: Any = None,
        audit: Any = None,
        services: Services | None = None,
        on_admit: Callable[[Principal], None] | None = None,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.blobs = blobs
        self.tokens = tokens
        self.audit = audit
        self.services = services if services is not None else Services()
        self.on_admit = on_admit
        self.search_limits = _search_limits(settings)
        self._threads: ThreadPoolExecutor | None = None

    def base_url(self, request: Request) -> str:
        """The public FHIR base URL (configured, or derived from the request)."""
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/fhir"

    async def handle(self, request: Request, path: str) -> Response:
        """Serve one FHIR request; every failure becomes an OperationOutcome."""
        pretty = request.query_params.get("_pretty") == "true"
        seen = _Seen()
        message: str | None = None
        try:
            budget = SearchBudget(self.search_limits, self.settings.search_timeout_ms)
            with budget_scope(budget):
                response = await self._handle(request, path, pretty, seen)
        except FhirError as exc:
            response = _outcome_response(exc, pretty)
            message = exc.message
        except Exception:
            log.exception("Unhandled error serving %s %s", request.method, request.url.path)
            response = _outcome_response(
                FhirError(500, "exception", "Internal server error", code="MSO-REST-500"), pretty
            )
            message = "Internal server error"
        if self.audit is not None and seen.req is not None:
            if seen.route is None and seen.principal is None:
                seen.principal = await self._identify(request)
            self._audit(request, seen, response.status_code, message)
        return response

    async def _identify(self, request: Request) -> Principal | None:
        """Who sent a request that no route serves (refused before authentication), for its
        audit record; ``None`` without a valid token. Only on that error path."""
        header = request.headers.get("authorization")
        if self.tokens is None or not header:
            return None
        try:
            authenticate = functools.partial(
                self.tokens.authenticate,
                header,
                source=request.client.host if request.client else None,
                audience=self.base_url(request),
            )
            return await self._in_thread(authenticate)
        except FhirError:
            return None

    def _audit(self, request: Request, seen: _Seen, status: int, message: str | None) -> None:
        """Queue the AuditEvent of a request (never for ``metadata``), also of one that no
        route serves (a 404 or 405, an id that is not an id: no interaction code then).

        A write's event names what it wrote (``Type/id/_history/vid``, see
        :attr:`FhirResponse.written`), which a create's URL does not. A transaction or batch
        gets its own event and one more per resource an entry wrote, each with that entry's
        interaction, so that ``AuditEvent?entity=…`` finds every write.
        """
        route, req = seen.route, seen.req
        assert req is not None
        if route is not None and route.handler is capabilities.capabilities:
            return
        code = interaction_of(route, req) if route is not None else None
        source = request.client.host if request.client else None
        query = None
        patients: list[str] = []
        if code is not None and code.startswith(("search", "history")):
            private = req.resource_type in _PRIVATE_QUERY_TYPES
            query = "&".join(f"{k}={'…' if private else v}" for k, v in req.params)
            patients = _patients_in(req)
        if req.resource_type == "Patient" and req.resource_id:
            patients.append(req.resource_id)
        per_entry = code in ("transaction", "batch")
        entities = [] if per_entry else [w.reference for w in seen.written]
        self.audit.interaction(
            seen.principal,
            Interaction(
                interaction=code,
                status=status,
                resource_type=req.resource_type,
                resource_id=req.resource_id,
                version_id=req.version_id,
                operation=req.operation,
                query=query,
                source=source,
                message=message,
                patients=sorted(set(patients + _patients_of(entities))),
                entities=entities,
            ),
        )
        if not per_entry:
            return
        for wrote in seen.written:
            self.audit.interaction(
                seen.principal,
                Interaction(
                    interaction=wrote.interaction,
                    status=status,
                    resource_type=wrote.reference.split("/", 1)[0],
                    source=source,
                    patients=_patients_of([wrote.reference]),
                    entities=[wrote.reference],
                ),
            )

    async def _handle(self, request: Request, path: str, pretty: bool, seen: _Seen) -> Response:
        method = request.method
        params = [
            (k, v) for k, v in request.query_params.multi_items() if k not in _TRANSPORT_PARAMS
        ]
        headers = {k.lower(): v for k, v in request.headers.items()}
        req = FhirRequest(
            method=method,
            params=params,
            headers=headers,
            prefer=Prefer.parse(headers.get("prefer")),
        )
        seen.req = req  # audited even when no route serves it
        route = resolve_route(method, path, req)
        handler = route.handler
        seen.route = route
        ctx = InteractionContext(
            repo=self.repo,
            settings=self.settings,
            base_url=self.base_url(request),
            services=self.services,
            router=ROUTER,
        )
        authenticate = None
        if self.tokens is not None and handler is not capabilities.capabilities:
            authenticate = functools.partial(
                self.tokens.authenticate,
                headers.get("authorization"),
                source=request.client.host if request.client else None,
                audience=ctx.base_url,
            )
        inline = handler in _INLINE and self.settings.inline_reads
        fhir_accept = _wants_fhir(request)
        if (
            not inline
            and fhir_accept
            and method not in _BODY_METHODS
            and req.resource_type != "Binary"
        ):
            # A request without a body (search, history, delete …): authentication (its
            # revocation lookup is a database round trip) and the handler share one trip to a
            # worker thread.
            response = await _cancelled_when_gone(
                request,
                current_budget(),
                self._in_thread(self._admit_and_handle, ctx, req, seen, authenticate, handler),
            )
            return self._render(response, pretty, seen)
        if authenticate is not None:
            if inline:
                self._admit(ctx, seen, authenticate())
            else:
                self._admit(ctx, seen, await self._in_thread(authenticate))
        if req.resource_type == "Binary":
            special = await self._binary(request, req, ctx, handler, fhir_accept)
            if special is not None:
                return self._render(special, pretty, seen)
        if not fhir_accept:
            raise FhirError(
                406, "not-supported", "This server speaks FHIR JSON only", code="MSO-REST-406"
            )
        if method in _BODY_METHODS:
            await self._read_body(request, req, handler)
        if inline:
            # A read by id is one indexed point lookup (well under a millisecond): handing it
            # to a worker thread costs more CPU than running it here.
            response = handler(ctx, req)
        else:
            response = await self._in_thread(handler, ctx, req)
        return self._render(response, pretty, seen)

    def _admit(self, ctx: InteractionContext, seen: _Seen, principal: Principal) -> None:
        """Make ``principal`` the request's caller."""
        seen.principal = ctx.caller = principal
        if self.on_admit is not None:
            self.on_admit(principal)

    def _admit_and_handle(
        self,
        ctx: InteractionContext,
        req: FhirRequest,
        seen: _Seen,
        authenticate: Callable[[], Principal] | None,
        handler: Callable[[InteractionContext, FhirRequest], FhirResponse],
    ) -> FhirResponse:
        if authenticate is not None:
            self._admit(ctx, seen, authenticate())
        return handler(ctx, req)

    async def _in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        """Run blocking ``work`` on this endpoint's worker threads.

        A plain executor rather than Starlette's ``run_in_threadpool``: anyio's capacity
        limiter and cancel-scope checkpoints around each call cost about 4% of a search's CPU.
        As many threads as the database pool has connections (with overflow). ``work`` runs in
        a copy of the request's context (its search budget: ``search.budget``).
        """
        if self._threads is None:
            self._threads = ThreadPoolExecutor(
                max_workers=2 * self.settings.db_pool_size, thread_name_prefix="fhir"
            )
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(context.run, work, *args)
        )

    def close(self) -> None:
        """Stop the worker threads (application shutdown)."""
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    async def _binary(
        self,
        request: Request,
        req: FhirRequest,
        ctx: InteractionContext,
        handler: Any,
        fhir_accept: bool,
    ) -> FhirResponse | None:
        """Raw Binary uploads and downloads; ``None`` when the request is plain FHIR JSON."""
        content_type = _mime(request.headers.get("content-type"))
        raw_write = (
            request.method in ("POST", "PUT")
            and content_type
            and content_type not in binary.FHIR_JSON_TYPES
        )
        instance_read = handler in (read.read, read.vread)
        if raw_write and handler in (create.create, update.update):
            self._check_length(request, self.settings.max_binary_bytes, _file_too_large)
            try:
                blob = await self.blobs.put_async(
                    request.stream(), max_bytes=self.settings.max_binary_bytes
                )
            except ClientDisconnect:  # the blob store has removed its partial file
                raise _client_gone(request) from None
            req.raw_body = binary.RawUpload(
                blob, request.headers["content-type"], request.headers.get("x-security-context")
            )
            work = binary.create_raw if req.resource_id is None else binary.update_raw
            return await self._in_thread(work, ctx, req)
        if instance_read and not fhir_accept:
            return await self._in_thread(binary.read_raw, ctx, req, self.blobs)
        if instance_read:
            return await self._in_thread(binary.read_json, ctx, req, self.blobs)
        return None

    def _check_length(
        self, request: Request, limit: int, error: Callable[[int], FhirError]
    ) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise error(limit)

    async def _read_body(self, request: Request, req: FhirRequest, handler: Any) -> None:
        limit = self.settings.max_resource_bytes
        self._check_length(request, limit, _body_too_large)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _body_too_large(limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise _client_gone(request) from None
        raw = b"".join(chunks)
        content_type = _mime(request.headers.get("content-type"))
        if content_type == FORM and handler in _SEARCHES:
            # POST [base]/[type]/_search: form parameters join the query's.
            req.params.extend(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
            return
        if not raw.strip():
            if req.method == "POST" and req.operation:
                return
            raise FhirError(400, "required", "The request body is empty", code="MSO-REST-003")
        patch_document = req.method == "PATCH" and content_type in PATCH_TYPES
        if not content_type:
            # A body says what it is (http://hl7.org/fhir/R4/http.html#mime-type); only an
            # operation's empty POST (above) may come without one.
            raise _unsupported_media("The request body has no Content-Type")
        if content_type not in binary.FHIR_JSON_TYPES and not patch_document:
            raise _unsupported_media(f"Content-Type '{content_type}' is not supported")
        if _NUL_ESCAPE.search(raw):
            raise FhirError(
                400,
                "invalid",
                "A string in the body holds a NUL character (\\u0000), which FHIR strings may not",
                code="MSO-REST-014",
            )
        if req.method == "PATCH":
            req.body = jsonio.loads(raw)
            return
        req.body = jsonio.parse_resource(raw)

    def _render(self, response: FhirResponse, pretty: bool, seen: _Seen) -> Response:
        seen.written = response.written
        headers = response.headers
        if response.stream is not None:
            stream = response.stream
            if not hasattr(stream, "__aiter__"):
                stream = iterate_in_threadpool(stream)
            return StreamingResponse(
                stream, status_code=response.status, headers=headers, media_type=response.media_type
            )
        if response.body is not None:
            body = response.body
            if pretty:
                body = jsonio.dumps(orjson.loads(body), pretty=True)
            return Response(
                body, status_code=response.status, headers=headers, media_type=FHIR_JSON
            )
        if response.resource is not None:
            return Response(
                jsonio.dumps(response.resource, pretty=pretty),
                status_code=response.status,
                headers=headers,
                media_type=FHIR_JSON,
            )
        return Response(status_code=response.status, headers=headers)


def _search_limits(settings: Settings) -> SearchLimits:
    """The search limits of ``settings`` (``MSO_SEARCH_MAX_*``)."""
    return SearchLimits(
        max_criteria=settings.search_max_criteria,
        max_values=settings.search_max_values,
        max_chain_depth=settings.search_max_chain_depth,
        max_includes=settings.search_max_includes,
        max_included=settings.search_max_included,
    )


async def _cancelled_when_gone(
    request: Request, budget: SearchBudget | None, work: Awaitable[Any]
) -> Any:
    """Await ``work`` (a request without a body, handled on a worker thread); should the
    client disconnect first, cancel the search statements running for it (``budget``), so
    that the database stops working for nobody and the thread returns."""
    if budget is None:
        return await work
    watch = asyncio.ensure_future(_cancel_on_disconnect(request.receive, budget))
    try:
        return await work
    finally:
        watch.cancel()


async def _cancel_on_disconnect(
    receive: Callable[[], Awaitable[Any]], budget: SearchBudget
) -> None:
    """Wait for ``http.disconnect`` (the request has no body to read), then cancel ``budget``
    (on a thread: a PostgreSQL cancel request opens a connection)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    await asyncio.get_running_loop().run_in_executor(None, budget.cancel)


def _patients_of(references: list[str]) -> list[str]:
    """The ids of the Patients among versioned references (``Patient/id/_history/vid``)."""
    return [ref.split("/", 2)[1] for ref in references if ref.startswith("Patient/")]


def _patients_in(req: FhirRequest) -> list[str]:
    """Patient ids a search names (``patient=``, ``subject=Patient/…``, ``Patient?_id=``)."""
    out: list[str] = []
    for name, value in req.params:
        if name not in _PATIENT_PARAMS:
            continue
        if name == "_id" and req.resource_type != "Patient":
            continue
        for item in value.split(","):
            ref = item.strip()
            if ref.startswith("Patient/"):
                out.append(ref.split("/", 1)[1])
            elif ref and "/" not in ref and (name != "subject"):
                out.append(ref)
    return out


def _client_gone(request: Request) -> FhirError:
    """A client that disconnected before its body was complete: one log line, no traceback
    (a dropped connection is no server error); nothing is stored. The error is only audited,
    as nobody is left to read it."""
    log.info("Client disconnected during the body of %s %s", request.method, request.url.path)
    return FhirError(
        400,
        "incomplete",
        "The client disconnected before the request body was complete",
        code="MSO-REST-499",
    )


def _unsupported_media(problem: str) -> FhirError:
    """415 for a body without a Content-Type or with one this server does not read."""
    return FhirError(
        415,
        "not-supported",
        f"{problem}; send application/fhir+json (a PATCH also application/json-patch+json)",
        code="MSO-REST-415",
    )


def _body_too_large(limit: int) -> FhirError:
    """413 for a FHIR JSON body over ``MSO_MAX_RESOURCE_BYTES``: it says how a large file goes."""
    return FhirError(
        413,
        "too-costly",
        f"The FHIR JSON body is larger than the limit of {limit} bytes. Upload a large file "
        "as raw content with POST [base]/Binary (Content-Type: the file's media type, e.g. "
        "application/pdf) and reference it from the attachment with "
        "attachment.url = 'Binary/<id>' (the id the upload answers in Location)",
        code="MSO-REST-413",
    )


def _file_too_large(limit: int) -> FhirError:
    """413 for a raw Binary upload over ``MSO_MAX_BINARY_BYTES``."""
    return FhirError(
        413,
        "too-costly",
        f"The file is larger than the limit of {limit} bytes for a Binary",
        code="MSO-REST-413",
    )


def _outcome_response(exc: FhirError, pretty: bool) -> Response:
    return Response(
        jsonio.dumps(exc.to_outcome(), pretty=pretty),
        status_code=exc.status,
        headers=exc.headers,
        media_type=FHIR_JSON,
    )


class FhirASGI:
    """A bare ASGI app for the FHIR API, mounted at ``/fhir``.

    Routing is the interaction table's, so FastAPI's per-route machinery (dependency solving,
    body-limit and exit-stack middlewares) would only add cost on every request.
    """

    def __init__(self, endpoint: FhirEndpoint, prefix: str = "/fhir") -> None:
        self.endpoint = endpoint
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one HTTP request."""
        path = scope["path"]
        if path.startswith(self.prefix):
            path = path[len(self.prefix) :]
        request = Request(scope, receive)
        # every method goes through the route table: one it has on no path is a 405 (with
        # Allow) there, and audited like any other request
        response = await self.endpoint.handle(request, path.strip("/"))
        await response(scope, receive, send)
