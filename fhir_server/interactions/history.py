"""history at instance, type and system level (http://hl7.org/fhir/R4/http.html#history).

Versions are listed newest first. Paging is keyset-based: the ``next`` link carries an opaque
cursor holding the position of the last entry and the instant the first page was made, so pages
stay exact while new versions are written (new versions sort before the cursor and past the
snapshot, and never shift what a client has still to read).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import check_type, parse_count, run_read
from fhir_server.storage import cursors
from fhir_server.storage.repository import StoredResource, Tx, format_instant, utc_now

_CURSOR_PURPOSE = "history"

_STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "204 No Content"}


def parse_instant(value: str, name: str) -> datetime:
    """Parse a FHIR instant/dateTime/date query value into an aware UTC datetime (400 if bad)."""
    try:
        parsed = datetime.fromisoformat(value.replace(" ", "+"))
    except ValueError:
        raise FhirError(
            400, "invalid", f"{name}={value} is not a valid instant", code="MSO-REST-010"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def page_size(ctx: InteractionContext, req: FhirRequest) -> int:
    """``_count`` bounded by the settings (default when absent)."""
    raw = req.param("_count")
    if raw is None:
        return ctx.settings.default_page_size
    count = parse_count(raw)
    if count is None:
        raise FhirError(400, "invalid", "_count is not a non-negative integer", code="MSO-REST-011")
    return min(count, ctx.settings.max_page_size)


def history(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """GET [base]/_history, [base]/[type]/_history, [base]/[type]/[id]/_history."""
    res_type = check_type(req.resource_type) if req.resource_type else None
    res_id = req.resource_id
    since = _opt_instant(req, "_since")
    at = _opt_instant(req, "_at")
    count = page_size(ctx, req)
    cursor = _decode_cursor(ctx, req.param("_cursor"))
    snapshot = cursor["snapshot"] if cursor else utc_now()
    before = cursor["before"] if cursor else None

    def work(tx: Tx) -> tuple[list[StoredResource], int | None]:
        # 404 for an instance that never existed; a deleted one still has a history.
        if res_id is not None and not tx.exists_any(res_type or "", res_id):
            tx.read(res_type or "", res_id)
        versions = tx.history(
            res_type=res_type,
            res_id=res_id,
            since=since,
            at=at,
            before=before,
            snapshot=snapshot,
            limit=count + 1,
        )
        total = None
        if at is None and (res_id is not None or req.param("_total") == "accurate"):
            total = tx.history_count(
                res_type=res_type, res_id=res_id, since=since, snapshot=snapshot
            )
        return versions, total

    versions, total = run_read(ctx, work)
    has_more = len(versions) > count
    versions = versions[:count]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = _links(ctx, req, versions, has_more, snapshot)
    bundle["entry"] = [_entry(ctx, v) for v in versions]
    return FhirResponse(resource=bundle)


def _opt_instant(req: FhirRequest, name: str) -> datetime | None:
    raw = req.param(name)
    return parse_instant(raw, name) if raw is not None else None


def _entry(ctx: InteractionContext, version: StoredResource) -> dict[str, Any]:
    method = version.method or "PUT"
    url = version.res_type if method == "POST" else f"{version.res_type}/{version.res_id}"
    entry: dict[str, Any] = {"fullUrl": f"{ctx.base_url}/{version.res_type}/{version.res_id}"}
    if version.content is not None:
        entry["resource"] = orjson.Fragment(version.content)
    entry["request"] = {"method": method, "url": url}
    entry["response"] = {
        "status": _STATUS.get(method, "200 OK"),
        "etag": version.etag,
        "lastModified": format_instant(version.last_updated),
    }
    return entry


def _links(
    ctx: InteractionContext,
    req: FhirRequest,
    versions: list[StoredResource],
    has_more: bool,
    snapshot: datetime,
) -> list[dict[str, str]]:
    path = "/".join(p for p in (req.resource_type, req.resource_id) if p)
    base = f"{ctx.base_url}/{path}/_history" if path else f"{ctx.base_url}/_history"
    keep = [(k, v) for k, v in req.params if k != "_cursor"]
    links = [{"relation": "self", "url": link_url(base, req.params)}]
    if has_more and versions:
        last = versions[-1]
        token = _encode_cursor(ctx, last, snapshot)
        links.append({"relation": "next", "url": link_url(base, [*keep, ("_cursor", token)])})
    return links


def link_url(base: str, params: list[tuple[str, str]]) -> str:
    """A Bundle link: ``base`` with ``params`` as its query string."""
    return f"{base}?{urlencode(params)}" if params else base


def _encode_cursor(ctx: InteractionContext, last: StoredResource, snapshot: datetime) -> str:
    data = [last.last_updated.isoformat(), last.pid, last.version, snapshot.isoformat()]
    return cursors.seal(data, cursors.cursor_key(ctx.repo.engine), _CURSOR_PURPOSE)


def _decode_cursor(ctx: InteractionContext, token: str | None) -> dict[str, Any] | None:
    if token is None:
        return None
    data = cursors.unseal(token, cursors.cursor_key(ctx.repo.engine), _CURSOR_PURPOSE)
    try:
        lu, pid, version, snapshot = data  # type: ignore[misc]
        return {
            "before": (datetime.fromisoformat(lu), int(pid), int(version)),
            "snapshot": datetime.fromisoformat(snapshot),
        }
    except (ValueError, TypeError):
        raise FhirError(
            400, "invalid", "_cursor is not a cursor this server issued", code="MSO-REST-012"
        ) from None
