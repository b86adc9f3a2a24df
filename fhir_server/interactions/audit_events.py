"""AuditEvent interactions, served from the audit trail's own table (``fhir_server.audit.store``).

read, vread (every AuditEvent has exactly version 1), search (the BALP parameters, newest
first, keyset paged), instance and type ``_history`` and create (for admins and system clients
that feed their own events). Update, patch and delete, conditional or not, are refused (405):
the trail is append-only. Only admins and system clients may
read it (:meth:`fhir_server.auth.policy.AccessPolicy.require`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from fhir_server.audit import store
from fhir_server.auth.scopes import Permission
from fhir_server.fhir.outcome import FhirError, Issue, not_found, operation_outcome
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import read_response, require_body, write_response
from fhir_server.interactions.history import link_url, page_size
from fhir_server.storage import cursors
from fhir_server.storage.repository import StoredResource

TYPE = "AuditEvent"


def _require(ctx: InteractionContext, permission: Permission) -> None:
    if ctx.repo.policy is not None:
        ctx.repo.policy.require(ctx.caller, TYPE, permission)


def _stored(body: dict[str, Any]) -> StoredResource:
    recorded = datetime.fromisoformat(body["recorded"].replace("Z", "+00:00"))
    return StoredResource(0, TYPE, body["id"], 1, recorded, False, orjson.dumps(body), "POST", body)


def read(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET AuditEvent/[id] and GET AuditEvent/[id]/_history/1."""
    _require(ctx, Permission.READ)
    event_id = req.resource_id or ""
    body = ctx.repo.read_only(lambda tx: store.get(tx.conn, event_id), snapshot=False)
    if body is None or (req.version_id is not None and req.version_id != "1"):
        raise not_found(TYPE, event_id)
    return read_response(ctx, _stored(body))


def create(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST AuditEvent: an event reported by an admin or a system client."""
    body = require_body(req)
    return ctx.repo.write(lambda tx: create_in(ctx, req, tx, body))


def create_in(
    ctx: InteractionContext, req: FhirRequest, tx: Any, body: dict[str, Any]
) -> FhirResponse:
    """Store a reported AuditEvent in ``tx`` (also a transaction Bundle's POST entry)."""
    _require(ctx, Permission.CREATE)
    body.pop("id", None)
    if ctx.repo.validator is not None:
        ctx.repo.validator(body)
    stored = store.append(tx.conn, [body])[0]
    return write_response(
        ctx, req, _stored(stored), status=201, message=f"Created AuditEvent/{stored['id']}"
    )


def refuse_change(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PUT / PATCH / DELETE on AuditEvent: the trail is append-only (405)."""
    _require(ctx, Permission.DELETE if req.method == "DELETE" else Permission.UPDATE)
    raise FhirError(
        405, "not-supported", "AuditEvent records cannot be changed or deleted", code="MSO-AUTH-405"
    )


def search(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET/POST AuditEvent?…: a searchset, newest first."""
    return _list(ctx, req, history=False)


def history(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET AuditEvent/_history (``_since``, ``_count``) and AuditEvent/[id]/_history."""
    if req.resource_id is not None:
        _require(ctx, Permission.READ)
        return _instance_history(ctx, req)
    return _list(ctx, req, history=True)


def _list(ctx: InteractionContext, req: FhirRequest, *, history: bool) -> FhirResponse:
    _require(ctx, Permission.SEARCH)
    params = [(k, v) for k, v in req.params if k != "_since"]
    since = req.param("_since")
    if history and since:
        params.append(("date", f"ge{since}"))
    try:
        where, unknown = store.conditions(params)
    except ValueError as exc:
        raise FhirError(400, "invalid", str(exc), code="MSO-SEARCH-002") from None
    if unknown and req.prefer.handling == "strict":
        raise FhirError(
            400,
            "not-supported",
            f"Unknown search parameter '{unknown[0]}' for AuditEvent",
            code="MSO-SEARCH-003",
            expression=[unknown[0]],
        )
    count = page_size(ctx, req)
    sort = req.param("_sort") or "-date"
    if sort not in ("date", "-date"):
        raise FhirError(
            400, "not-supported", "AuditEvent sorts by date only", code="MSO-SEARCH-006"
        )
    cursor = req.param("_cursor")
    key = cursors.cursor_key(ctx.repo.engine)
    before = cursors.unseal(cursor, key, "audit") if cursor else None
    if cursor and type(before) is not int:
        raise FhirError(
            400,
            "invalid",
            "_cursor is not a paging cursor this server issued",
            code="MSO-SEARCH-005",
        )

    def work(tx: Any) -> tuple[list[tuple[int, dict[str, Any]]], bool, int | None]:
        page, more = store.search(
            tx.conn, where, count=count, before=before, ascending=sort == "date"
        )
        total = store.total(tx.conn, where) if req.param("_total") == "accurate" else None
        return page, more, total

    page, more, total = ctx.repo.read_only(work)
    kept = [(k, v) for k, v in req.params if k not in ("_cursor",) and k not in unknown]
    base = f"{ctx.base_url}/{TYPE}" + ("/_history" if history else "")
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "history" if history else "searchset",
    }
    if total is not None:
        bundle["total"] = total
    links = [{"relation": "self", "url": link_url(base, req.params)}]
    if more and page:
        token = cursors.seal(page[-1][0], key, "audit")
        links.append({"relation": "next", "url": link_url(base, [*kept, ("_cursor", token)])})
    bundle["link"] = links
    entries = [_entry(ctx, body, history) for _, body in page]
    if unknown:
        issues = [
            Issue(
                "warning", "not-supported", f"Search parameter ignored: {n}", [n], "MSO-SEARCH-003"
            )
            for n in unknown
        ]
        entries.append({"resource": operation_outcome(issues), "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return FhirResponse(resource=bundle)


def _instance_history(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    event_id = req.resource_id or ""
    body = ctx.repo.read_only(lambda tx: store.get(tx.conn, event_id), snapshot=False)
    if body is None:
        raise not_found(TYPE, event_id)
    return FhirResponse(
        resource={
            "resourceType": "Bundle",
            "type": "history",
            "total": 1,
            "link": [{"relation": "self", "url": f"{ctx.base_url}/{TYPE}/{event_id}/_history"}],
            "entry": [_entry(ctx, body, True)],
        }
    )


def _entry(ctx: InteractionContext, body: dict[str, Any], history: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": f"{ctx.base_url}/{TYPE}/{body['id']}", "resource": body}
    if history:
        entry["request"] = {"method": "POST", "url": TYPE}
        entry["response"] = {"status": "201", "lastModified": body["recorded"]}
    else:
        entry["search"] = {"mode": "match"}
    return entry
