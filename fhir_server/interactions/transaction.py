"""transaction and batch Bundles (http://hl7.org/fhir/R4/http.html#transaction).

A transaction runs every entry in one database transaction: all succeed or nothing is stored.
Entries are processed in the spec's order (DELETE, POST, PUT/PATCH, GET) whatever their order in
the Bundle; the response lists them in request order. Before anything is written, each POST
entry gets its id (or, with ``ifNoneExist``, the existing match), each conditional PUT its
target, and each conditional reference (``Patient?identifier=…``) its single match; then every
``fullUrl`` (``urn:uuid:…`` or otherwise) and conditional reference in the Bundle is rewritten
to the ``Type/id`` it now stands for. Entries other than POST re-enter the same handlers as
plain REST calls (found through the route table the context carries,
:attr:`~fhir_server.interactions.base.InteractionContext.router`), inside the transaction's
unit of work. The response names what every entry wrote (``FhirResponse.written``): the audit
trail records an event per written resource.

A batch runs each entry on its own; a failure becomes that entry's OperationOutcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhir_server.fhir.definitions import is_resource_type
from fhir_server.fhir.outcome import FhirError, Issue
from fhir_server.interactions import audit_events
from fhir_server.interactions.base import (
    FhirRequest,
    FhirResponse,
    Handler,
    InteractionContext,
    Written,
)
from fhir_server.interactions.common import criteria_names, write_response
from fhir_server.interactions.create import existing_response, if_none_exist_match
from fhir_server.storage.repository import Tx, check_id, new_id

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
}


@dataclass
class _Entry:
    """One Bundle entry, parsed."""

    index: int
    method: str
    path: str
    params: list[tuple[str, str]]
    full_url: str | None
    resource: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    target_id: str | None = None  # POST: the id to create with
    existing: bool = False  # POST with ifNoneExist that matched
    visible: bool = True  # … a match the caller may see (else only its id is told)


def transaction_or_batch(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base] with a Bundle of type transaction or batch."""
    bundle = req.body
    if bundle is None or bundle.get("resourceType") != "Bundle":
        raise FhirError(
            400,
            "invalid",
            "POST to the base URL takes a transaction or batch Bundle",
            code="MSO-TX-001",
        )
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        raise FhirError(
            400,
            "invalid",
            f"Bundle.type must be 'transaction' or 'batch', not '{kind}'",
            code="MSO-TX-002",
            expression=["Bundle.type"],
        )
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise FhirError(400, "structure", "Bundle.entry must be an array", code="MSO-TX-003")
    if kind == "batch":
        return _batch(ctx, req, raw_entries)
    entries = [_parse_entry(i, raw) for i, raw in enumerate(raw_entries)]
    _check_overlaps(entries)
    responses, wrote = ctx.repo.write(
        lambda tx: _run_transaction(ctx, req, tx, entries), caller=ctx.caller
    )
    return FhirResponse(resource=_response_bundle("transaction-response", responses), written=wrote)


# -- transaction ----------------------------------------------------------------------------


def _run_transaction(
    ctx: InteractionContext, req: FhirRequest, tx: Tx, entries: list[_Entry]
) -> tuple[list[dict[str, Any]], tuple[Written, ...]]:
    """The response entries, in request order, and what the entries wrote (for the audit)."""
    sub_ctx = replace(ctx, tx=tx)
    mapping = _assign_identities(tx, entries)
    for entry in entries:
        if entry.resource is not None:
            _rewrite(tx, entry, entry.resource, mapping)
    # the resources PUT by id: looked up and locked in one statement, not one per entry
    by_id = [e.path.partition("/") for e in entries if e.method == "PUT" and e.path.count("/") == 1]
    absent = tx.prefetch_current([(res_type, res_id) for res_type, _, res_id in by_id])
    # what the unit may create: POSTs, conditional PUTs, PUTs of ids not found
    creates = sum(e.method == "POST" or (e.method == "PUT" and "/" not in e.path) for e in entries)
    results: dict[int, dict[str, Any]] = {}
    wrote: dict[int, tuple[Written, ...]] = {}
    with tx.batched_writes(expected=creates + absent):
        for entry in sorted(entries, key=lambda e: (_ORDER[e.method], e.index)):
            tx.error_context = partial(_in_entry, entry=entry)
            try:
                response = _execute(sub_ctx, req, tx, entry)
            except FhirError as exc:
                raise _in_entry(exc, entry) from exc
            finally:
                tx.error_context = None
            if response.status >= 400:
                raise FhirError(
                    response.status,
                    "processing",
                    f"Entry {entry.index} failed",
                    code="MSO-TX-010",
                )
            results[entry.index] = _response_entry(ctx, entry, response)
            wrote[entry.index] = response.written
    # rules spanning entries (a case document and its case) see the whole Bundle written
    tx.run_deferred()
    return [results[e.index] for e in entries], tuple(w for e in entries for w in wrote[e.index])


def _assign_identities(tx: Tx, entries: list[_Entry]) -> dict[str, str]:
    """Decide what every fullUrl will stand for, before anything is written."""
    mapping: dict[str, str] = {}
    for entry in entries:
        if entry.method == "POST":
            res_type = entry.path
            condition = entry.headers.get("if-none-exist")
            if condition:
                try:
                    match, entry.visible = if_none_exist_match(tx, res_type, condition)
                except FhirError as exc:
                    raise _in_entry(exc, entry) from exc
                if match is not None:
                    entry.target_id, entry.existing = match.res_id, True
            if entry.target_id is None:
                entry.target_id = new_id()
            if entry.full_url:
                mapping[entry.full_url] = f"{res_type}/{entry.target_id}"
        elif entry.method == "PUT" and entry.full_url and "/" not in entry.path:
            # Conditional update: the match (or the new resource) is what fullUrl stands for.
            matches = tx.find(entry.path, entry.params, limit=2)
            if len(matches) == 1:
                mapping[entry.full_url] = matches[0].reference
            elif not matches:
                new = (entry.resource or {}).get("id") or new_id()
                if entry.resource is not None:
                    entry.resource["id"] = new
                mapping[entry.full_url] = f"{entry.path}/{new}"
        elif entry.full_url and entry.method in ("PUT", "PATCH"):
            mapping[entry.full_url] = entry.path
    return mapping


def _rewrite(
    tx: Tx, entry: _Entry, value: dict[str, Any] | list[Any], mapping: dict[str, str]
) -> None:
    """Replace fullUrls and conditional references throughout a resource, in place (it is the
    request's own copy); only containers are descended into, scalars are looked at once."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in list(items):
        if isinstance(item, str):
            if (
                key == "reference"
                and "?" in item
                and not item.startswith(("http:", "https:", "urn:"))
            ):
                value[key] = _resolve_conditional_reference(tx, entry, item)  # type: ignore[index]
            elif item in mapping:
                value[key] = mapping[item]  # type: ignore[index]
        elif isinstance(item, (dict, list)):
            _rewrite(tx, entry, item, mapping)


def _resolve_conditional_reference(tx: Tx, entry: _Entry, reference: str) -> str:
    # The texts name the type and the parameters, never the values (patient data).
    res_type, _, query = reference.partition("?")
    if not is_resource_type(res_type):
        raise _in_entry(
            FhirError(
                400,
                "invalid",
                "A conditional reference names no resource type before '?'",
                code="MSO-TX-020",
            ),
            entry,
        )
    params = parse_qsl(query, keep_blank_values=True)
    matches = tx.find(res_type, params, limit=2)
    if len(matches) != 1:
        found = "no" if not matches else "more than one"
        raise _in_entry(
            FhirError(
                412 if matches else 404,
                "not-found" if not matches else "multiple-matches",
                f"A conditional reference to {res_type} (parameters: {criteria_names(params)}) "
                f"matches {found} resource",
                code="MSO-TX-021",
            ),
            entry,
        )
    return matches[0].reference


def _execute(ctx: InteractionContext, req: FhirRequest, tx: Tx, entry: _Entry) -> FhirResponse:
    sub = FhirRequest(
        method=entry.method,
        params=entry.params,
        headers={
            **entry.headers,
            "content-type": entry.headers.get("content-type", "application/fhir+json"),
        },
        body=entry.resource,
        prefer=req.prefer,
    )
    if entry.method == "POST":
        return _post(ctx, sub, tx, entry)
    return _route(ctx, entry, sub)(ctx, sub)


def _post(ctx: InteractionContext, sub: FhirRequest, tx: Tx, entry: _Entry) -> FhirResponse:
    res_type = entry.path
    if not is_resource_type(res_type):
        raise FhirError(
            404, "not-supported", f"Unknown resource type '{res_type}'", code="MSO-REST-001"
        )
    if entry.existing:
        with tx.internal():
            stored = tx.read(res_type, entry.target_id or "")
        return existing_response(ctx, sub, stored, visible=entry.visible)
    body = entry.resource
    if body is None or body.get("resourceType") != res_type:
        raise FhirError(
            400, "invalid", f"POST {res_type} needs a {res_type} resource", code="MSO-REST-004"
        )
    if res_type == audit_events.TYPE:
        return audit_events.create_in(ctx, sub, tx, body)
    stored = tx.create(body, res_id=entry.target_id)
    return write_response(ctx, sub, stored, status=201, message=f"Created {stored.reference}")


# -- batch ----------------------------------------------------------------------------------


def _batch(ctx: InteractionContext, req: FhirRequest, raw_entries: list[Any]) -> FhirResponse:
    results = []
    wrote: list[Written] = []
    for index, raw in enumerate(raw_entries):
        try:
            entry = _parse_entry(index, raw)
            response = _batch_entry(ctx, req, entry)
            results.append(_response_entry(ctx, entry, response))
            wrote.extend(response.written)
        except FhirError as exc:
            results.append(_error_entry(exc))
    return FhirResponse(resource=_response_bundle("batch-response", results), written=tuple(wrote))


def _batch_entry(ctx: InteractionContext, req: FhirRequest, entry: _Entry) -> FhirResponse:
    """Run one batch entry through the same route table as a plain REST call."""
    sub = FhirRequest(
        method=entry.method,
        params=entry.params,
        headers=entry.headers,
        body=entry.resource,
        prefer=req.prefer,
    )
    return _route(ctx, entry, sub)(ctx, sub)


def _route(ctx: InteractionContext, entry: _Entry, sub: FhirRequest) -> Handler:
    """The handler of an entry, from the route table the context carries."""
    if ctx.router is None:
        raise FhirError(
            500,
            "exception",
            f"No route table to run {entry.method} entries with",
            code="MSO-TX-030",
        )
    return ctx.router.resolve(entry.method, entry.path, sub)


# -- parsing and responses ------------------------------------------------------------------


def _parse_entry(index: int, raw: Any) -> _Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(
            400, "structure", f"{where} is not an object", code="MSO-TX-004", expression=[where]
        )
    request = raw.get("request")
    if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
        raise FhirError(
            400,
            "required",
            f"{where}.request needs a method and a url",
            code="MSO-TX-005",
            expression=[f"{where}.request"],
        )
    method = str(request["method"]).upper()
    if method not in _ORDER:
        raise FhirError(
            400,
            "invalid",
            f"{where}.request.method '{method}' is not supported",
            code="MSO-TX-006",
            expression=[f"{where}.request.method"],
        )
    parts = urlsplit(request["url"])
    path = parts.path
    if "/fhir/" in path and parts.scheme:
        path = path.split("/fhir/", 1)[1]
    path = path.strip("/")
    headers = {}
    for field_name, header in (
        ("ifMatch", "if-match"),
        ("ifNoneMatch", "if-none-match"),
        ("ifModifiedSince", "if-modified-since"),
        ("ifNoneExist", "if-none-exist"),
    ):
        if request.get(field_name):
            headers[header] = str(request[field_name])
    resource = raw.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise FhirError(400, "structure", f"{where}.resource is not an object", code="MSO-TX-007")
    if method in ("POST", "PUT") and resource is None:
        raise FhirError(400, "required", f"{where} ({method}) has no resource", code="MSO-TX-008")
    if method == "PATCH" and resource is not None and resource.get("resourceType") == "Binary":
        resource, headers["content-type"] = _binary_patch(resource), "application/json-patch+json"
    elif method == "PATCH":
        headers["content-type"] = "application/fhir+json"
    if method == "POST" and ("/" in path or not path):
        raise FhirError(
            400, "invalid", f"{where}: POST url must be a resource type", code="MSO-TX-009"
        )
    return _Entry(
        index=index,
        method=method,
        path=path,
        params=parse_qsl(parts.query, keep_blank_values=True),
        full_url=raw.get("fullUrl"),
        resource=resource,
        headers=headers,
    )


def _binary_patch(resource: dict[str, Any]) -> Any:
    """A JSON Patch carried in a transaction as a Binary (the R4 convention)."""
    import base64

    try:
        return orjson.loads(base64.b64decode(resource.get("data") or ""))
    except (ValueError, orjson.JSONDecodeError):
        raise FhirError(
            400, "invalid", "PATCH entry's Binary does not hold a JSON Patch", code="MSO-TX-011"
        ) from None


def _check_overlaps(entries: list[_Entry]) -> None:
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.method in ("PUT", "PATCH", "DELETE") and entry.path.count("/") == 1:
            check_id(entry.path.split("/")[1])
            if entry.path in seen:
                raise FhirError(
                    400,
                    "invalid",
                    f"Entries {seen[entry.path]} and {entry.index} both change {entry.path}",
                    code="MSO-TX-012",
                )
            seen[entry.path] = entry.index
    full_urls = [e.full_url for e in entries if e.full_url]
    if len(full_urls) != len(set(full_urls)):
        raise FhirError(400, "invalid", "Two entries share one fullUrl", code="MSO-TX-013")


def _in_entry(exc: FhirError, entry: _Entry) -> FhirError:
    """Re-raise an entry's error naming the entry (the whole transaction fails with it)."""
    prefix = f"Bundle.entry[{entry.index}] ({entry.method} {entry.path}): "
    issues = [
        Issue(i.severity, i.code, prefix + i.diagnostics, i.expression, i.error_code)
        for i in exc.all_issues()
    ]
    return FhirError(
        exc.status,
        exc.issue_code,
        prefix + exc.message,
        exc.code,
        exc.expression,
        issues,
        exc.headers,
    )


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, '')}".strip()


def _response_entry(
    ctx: InteractionContext, entry: _Entry, response: FhirResponse
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    location = response.headers.get("Location")
    if location:
        out["fullUrl"] = location.split("/_history/")[0]
    result: dict[str, Any] = {"status": _status_line(response.status)}
    if response.body is not None:
        out["resource"] = orjson.Fragment(response.body)
    elif response.resource is not None:
        if response.resource.get("resourceType") == "OperationOutcome":
            result["outcome"] = response.resource  # Bundle.entry.response.outcome
        else:
            out["resource"] = response.resource
    if location:
        result["location"] = location
    if "ETag" in response.headers:
        result["etag"] = response.headers["ETag"]
    if response.last_updated:
        result["lastModified"] = response.last_updated
    out["response"] = result
    return out


def _error_entry(exc: FhirError) -> dict[str, Any]:
    return {"response": {"status": _status_line(exc.status), "outcome": exc.to_outcome()}}


def _response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
