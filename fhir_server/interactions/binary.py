"""Binary with raw content (http://hl7.org/fhir/R4/binary.html#rest).

``POST/PUT [base]/Binary`` with any non-FHIR Content-Type stores the bytes as they are: they are
streamed to the content-addressed blob store by the REST layer before this module runs, and the
Binary resource records ``contentType`` while ``binary_content`` points to the blob. A read of a
Binary with a non-FHIR Accept returns the raw bytes with the stored Content-Type; a FHIR read
returns the resource with ``data`` (base64) streamed from the blob.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from fhir_server.fhir.outcome import FhirError
from fhir_server.interactions.base import FhirRequest, FhirResponse, InteractionContext
from fhir_server.interactions.common import run_read, run_write, version_headers, write_response
from fhir_server.storage.blobs import BlobInfo, BlobStore
from fhir_server.storage.repository import StoredResource, Tx

FHIR_JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})


@dataclass(frozen=True, slots=True)
class RawUpload:
    """A raw body already in the blob store, waiting to become a Binary version."""

    blob: BlobInfo
    content_type: str
    security_context: str | None = None


def _binary_resource(upload: RawUpload, res_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Binary", "contentType": upload.content_type}
    if res_id:
        body["id"] = res_id
    if upload.security_context:
        body["securityContext"] = {"reference": upload.security_context}
    return body


def _store(tx: Tx, upload: RawUpload, res_id: str | None) -> tuple[StoredResource, bool]:
    body = _binary_resource(upload, res_id)
    if res_id is None:
        stored, created = tx.create(body), True
    else:
        stored, created = tx.update("Binary", res_id, body)
    tx.attach_blob(
        stored, sha256=upload.blob.sha256, size=upload.blob.size, content_type=upload.content_type
    )
    return stored, created


def create_raw(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """POST [base]/Binary with raw content."""
    upload: RawUpload = req.raw_body
    stored, _ = run_write(ctx, lambda tx: _store(tx, upload, None))
    return write_response(ctx, req, stored, status=201, message=f"Created {stored.reference}")


def update_raw(ctx: InteractionContext, req: FhirRequest) -> FhirResponse:
    """PUT [base]/Binary/[id] with raw content."""
    upload: RawUpload = req.raw_body
    res_id = req.resource_id or ""
    stored, created = run_write(ctx, lambda tx: _store(tx, upload, res_id))
    verb = "Created" if created else "Updated"
    return write_response(
        ctx, req, stored, status=201 if created else 200, message=f"{verb} {stored.reference}"
    )


def read_raw(ctx: InteractionContext, req: FhirRequest, blobs: BlobStore) -> FhirResponse:
    """GET [base]/Binary/[id] (or a version) for a non-FHIR Accept: the bytes themselves."""
    stored, blob = run_read(ctx, lambda tx: _load(tx, req))
    headers = version_headers(ctx, stored, location=False)
    if blob is not None:
        headers["Content-Length"] = str(blob.size)
        return FhirResponse(
            stream=blobs.read(blob.sha256), media_type=blob.content_type, headers=headers
        )
    resource = stored.resource
    data = base64.b64decode(resource.get("data") or "")
    return FhirResponse(
        stream=iter([data]),
        media_type=resource.get("contentType") or "application/octet-stream",
        headers=headers,
    )


def read_json(ctx: InteractionContext, req: FhirRequest, blobs: BlobStore) -> FhirResponse | None:
    """A FHIR JSON read of a blob-backed Binary, with ``data`` streamed; ``None`` if inline."""
    stored, blob = run_read(ctx, lambda tx: _load(tx, req))
    if blob is None:
        return None
    headers = version_headers(ctx, stored, location=False)
    return FhirResponse(
        stream=blobs.json_with_data(stored.content or b"{}", blob.sha256),
        media_type="application/fhir+json",
        headers=headers,
    )


def _load(tx: Tx, req: FhirRequest) -> tuple[StoredResource, Any]:
    res_id = req.resource_id or ""
    if req.version_id is not None:
        if not req.version_id.isdigit():
            raise FhirError(
                404, "not-found", f"Version '{req.version_id}' is not known", code="MSO-REST-405"
            )
        stored = tx.vread("Binary", res_id, int(req.version_id))
    else:
        stored = tx.read("Binary", res_id)
    return stored, tx.blob_of(stored)
