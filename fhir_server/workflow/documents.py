"""Case documents: categories, content types checked by content, size and count limits.

DESIGN.md (FHIR model: the case's ``supportingInfo`` -> documents; uploaded document): a case
document is a DocumentReference linked to a case ServiceRequest, with ``category``
doctors-letter, image, lab-report or other, and one or more ``content.attachment`` s whose bytes
are a Binary on this server (``url`` = ``Binary/<id>``, its bytes inline or in the blob store;
the way for large files: ``POST Binary`` raw, then the DocumentReference) or inline ``data``.

A document is a case document however it is linked: the case ServiceRequest lists it in
``supportingInfo`` (the link of the ``mso-case`` profile), the document names the case in
``context.related`` (the ``case-document`` profile), or it claims the ``case-document``
profile. The server records a ``supportingInfo`` link in the document's ``context.related``
too (:func:`with_case`), so a case's documents are found, counted and shared one way. The
rules hold on every path (single writes, transaction Bundles in any order, PUT/PATCH of the
ServiceRequest or of the DocumentReference; see :mod:`fhir_server.workflow.guards`):

* the type is decided by the bytes (magic numbers), never by the name or the declared
  ``contentType``: PDF, DOCX (a ZIP holding ``[Content_Types].xml`` and ``word/``), JPEG, PNG,
  TIFF, DICOM (``DICM`` after the 128-byte preamble); the declared type must agree;
* at most :data:`~fhir_server.codes.MAX_DOCUMENT_BYTES` a file (actual and declared);
* at most :data:`~fhir_server.codes.MAX_DOCUMENTS_PER_CASE` documents a case;
* added or changed only while the case is New, Assigned or Returned (409 otherwise).

A violation is a 422 (409 for the case status) naming the document by id and content index
(never its title or other content) and the rule, so a transaction Bundle fails as a whole with
the entry named. Errors: ``MSO-DOC-420`` category, ``MSO-DOC-421`` content type / disguised
file, ``MSO-DOC-422`` size, ``MSO-DOC-423`` too many documents, ``MSO-DOC-424`` content missing
or not on this server, or a link to something that is not a case or not a known document,
``MSO-DOC-409`` case status, ``MSO-DOC-410`` a case document's Binary replaced.

A chat message's attachments are held to the same type and size checks, with the same codes
(:func:`check_attachment`), and an uploaded Binary becomes readable by the case's other party
the same way (:func:`secure_binaries`): see :mod:`fhir_server.messaging.chat`.
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fhir_server.codes import (
    DOCUMENT_CATEGORY_SYSTEM,
    DOCUMENT_CONTENT_TYPES,
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENTS_PER_CASE,
    PROFILE_CASE_DOCUMENT,
    DocumentCategory,
)
from fhir_server.fhir.outcome import FhirError
from fhir_server.workflow.status import ref_id

if TYPE_CHECKING:
    from fhir_server.storage.blobs import BlobStore
    from fhir_server.storage.repository import Tx

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
JPEG = "image/jpeg"
PNG = "image/png"
TIFF = "image/tiff"
DICOM = "application/dicom"
SNIFF_BYTES = 132
"""How many leading bytes decide the type (the DICOM preamble and its ``DICM``)."""


def sniff(head: bytes, open_zip: Callable[[], zipfile.ZipFile] | None = None) -> str | None:
    """The media type the leading bytes ``head`` show (``None``: not an accepted type).

    ``open_zip`` opens the whole file as a ZIP, to tell a DOCX from any other ZIP.
    """
    if head.startswith(b"%PDF-"):
        return PDF
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    if head.startswith(b"PK\x03\x04") and open_zip is not None:
        try:
            with open_zip() as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if "[Content_Types].xml" in names and any(n.startswith("word/") for n in names):
            return DOCX
    return None


def is_case_document(body: dict[str, Any]) -> bool:
    """A DocumentReference about a case (related to a ServiceRequest) or claiming the profile.

    A document listed only in a case's ``supportingInfo`` is one too: :func:`with_case` records
    that link here when the case is written.
    """
    if case_ids(body):
        return True
    return PROFILE_CASE_DOCUMENT in ((body.get("meta") or {}).get("profile") or ())


def case_ids(body: dict[str, Any]) -> list[str]:
    """The case ServiceRequests a DocumentReference names in ``context.related``."""
    related = (body.get("context") or {}).get("related") or ()
    return [cid for r in related if (cid := ref_id(r, "ServiceRequest"))]


def check_still_linked(body: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """A case document stays with its cases: a write may not drop a case from
    ``context.related`` (the document would leave the case's rules and count)."""
    dropped = set(case_ids(previous or {})) - set(case_ids(body))
    if dropped:
        raise _invalid(
            "MSO-DOC-425",
            f"{document_name(body)} is a document of ServiceRequest/{min(dropped)} and stays "
            "linked to it; delete the document instead",
            "DocumentReference.context.related",
        )


def supporting_documents(request: dict[str, Any] | None) -> set[str]:
    """The ids of the DocumentReferences a ServiceRequest lists in ``supportingInfo``."""
    return {
        doc_id
        for info in (request or {}).get("supportingInfo") or ()
        if (doc_id := ref_id(info, "DocumentReference"))
    }


def with_case(body: dict[str, Any], case_id: str) -> dict[str, Any]:
    """``body`` with ``ServiceRequest/<case_id>`` added to ``context.related`` (a new dict)."""
    context = dict(body.get("context") or {})
    related = list(context.get("related") or ())
    related.append({"reference": f"ServiceRequest/{case_id}"})
    context["related"] = related
    return {**body, "context": context}


def document_name(body: dict[str, Any], index: int | None = None) -> str:
    """How errors name a document: its id (when it has one) and the content's index.

    Never its title or description: error texts carry no resource content (patient data).
    """
    name = f"DocumentReference/{body['id']}" if body.get("id") else "DocumentReference"
    return name if index is None else f"{name} content[{index}]"


def _invalid(code: str, message: str, expression: str) -> FhirError:
    return FhirError(422, "business-rule", message, code=code, expression=[expression])


def check_category(body: dict[str, Any]) -> None:
    """Exactly one MSO document category."""
    codes = [
        (c or {}).get("code")
        for concept in body.get("category") or ()
        for c in (concept or {}).get("coding") or ()
        if (c or {}).get("system") == DOCUMENT_CATEGORY_SYSTEM
    ]
    allowed = {c.value for c in DocumentCategory}
    if len(codes) != 1 or codes[0] not in allowed:
        raise _invalid(
            "MSO-DOC-420",
            f"{document_name(body)}: category must be one of "
            f"{', '.join(sorted(allowed))} ({DOCUMENT_CATEGORY_SYSTEM})",
            "DocumentReference.category",
        )


class ContentReader:
    """Reads an attachment's bytes: inline ``data``, or the Binary its ``url`` names."""

    def __init__(self, tx: Tx, blobs: BlobStore) -> None:
        self.tx = tx
        self.blobs = blobs

    def inspect(self, attachment: dict[str, Any], name: str, where: str) -> tuple[str | None, int]:
        """(sniffed media type, size in bytes) of an attachment's content."""
        if attachment.get("data") is not None:
            return self._inline(attachment["data"], name, where)
        url = attachment.get("url") or ""
        binary_id = ref_id(url, "Binary")
        if binary_id is None:
            raise _invalid(
                "MSO-DOC-424",
                f"{name}: the content must be inline data or a Binary on this server",
                where,
            )
        with self.tx.internal():
            stored = self.tx.current("Binary", binary_id)
        # a document may carry only content its writer can read: linking would share it
        if stored is None or stored.deleted or not self.tx.visible(stored):
            raise _invalid(
                "MSO-DOC-424",
                f"{name}: Binary/{binary_id} is not known",
                where,
            )
        blob = self.tx.blob_of(stored)
        if blob is None:
            return self._inline(stored.resource.get("data") or "", name, where)
        path = self.blobs.path_of(blob.sha256)
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
        return sniff(head, lambda: zipfile.ZipFile(path)), int(blob.size)

    def _inline(self, data: str, name: str, where: str) -> tuple[str | None, int]:
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise _invalid("MSO-DOC-421", f"{name}: data is not base64", where) from None
        return sniff(raw[:SNIFF_BYTES], lambda: zipfile.ZipFile(io.BytesIO(raw))), len(raw)


def check_contents(body: dict[str, Any], reader: ContentReader) -> None:
    """Every attachment: an accepted type by content agreeing with its declaration; sizes."""
    contents = body.get("content") or ()
    if not contents:
        raise _invalid("MSO-DOC-424", f"{document_name(body)} has no content", "DocumentReference")
    for index, content in enumerate(contents):
        attachment = (content or {}).get("attachment") or {}
        where = f"DocumentReference.content[{index}].attachment"
        check_attachment(attachment, reader, name=document_name(body, index), where=where)


def check_attachment(
    attachment: dict[str, Any], reader: ContentReader, *, name: str, where: str
) -> None:
    """One attachment of a case document (or of a chat message): an accepted type by content
    agreeing with its declared ``contentType``, within the size limit (declared and actual).

    ``name`` says which file it is in an error (no resource content) and ``where`` is the
    FHIRPath of the attachment element.
    """
    declared = attachment.get("contentType")
    if declared not in DOCUMENT_CONTENT_TYPES:
        raise _invalid(
            "MSO-DOC-421",
            f"{name}: the declared content type is not accepted (PDF, DOCX, JPEG, "
            "PNG, TIFF or DICOM)",
            f"{where}.contentType",
        )
    size = attachment.get("size")
    if isinstance(size, int) and size > MAX_DOCUMENT_BYTES:
        raise _too_large(name, size, where)
    sniffed, actual = reader.inspect(attachment, name, where)
    if actual > MAX_DOCUMENT_BYTES:
        raise _too_large(name, actual, where)
    if sniffed is None:
        raise _invalid(
            "MSO-DOC-421",
            f"{name}: its content is not a PDF, DOCX, JPEG, PNG, TIFF or DICOM "
            "file (the type is checked by content, not by name)",
            where,
        )
    if sniffed != declared:
        raise _invalid(
            "MSO-DOC-421",
            f"{name}: declared as '{declared}' but its content is '{sniffed}'",
            f"{where}.contentType",
        )


def _too_large(name: str, size: int, where: str) -> FhirError:
    return _invalid(
        "MSO-DOC-422",
        f"{name} is {size} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes a file",
        where,
    )


def check_count(tx: Tx, case_id: str, body: dict[str, Any]) -> None:
    """At most :data:`MAX_DOCUMENTS_PER_CASE` documents in a case, counting this one.

    A document already stored (its check is deferred to the end of a transaction that wrote
    several) counts by its place in the order of writing, so the one over the limit is named.
    """
    with tx.internal():
        existing = tx.find("DocumentReference", [("related", f"ServiceRequest/{case_id}")])
    own = next((d for d in existing if d.res_id == body.get("id")), None)
    earlier = [d for d in existing if own is None or d.pid <= own.pid]
    position = len(earlier) + (1 if own is None else 0)
    if position > MAX_DOCUMENTS_PER_CASE:
        raise _invalid(
            "MSO-DOC-423",
            f"{document_name(body)}: a case holds at most {MAX_DOCUMENTS_PER_CASE} documents",
            "DocumentReference.context.related",
        )


def secure_contents(tx: Tx, doc_id: str, body: dict[str, Any]) -> None:
    """Give each Binary a case document's attachments name, and that has no
    ``securityContext`` (a raw upload: ``POST [base]/Binary``), the document as its security
    context: see :func:`secure_binaries`."""
    attachments = [(content or {}).get("attachment") or {} for content in body.get("content") or ()]
    secure_binaries(tx, attachments, f"DocumentReference/{doc_id}")


def secure_binaries(tx: Tx, attachments: Iterable[dict[str, Any]], context: str) -> None:
    """Give each Binary on this server that ``attachments`` name by ``url``, and that has no
    ``securityContext`` yet (a raw upload: ``POST [base]/Binary``), the resource ``context``
    (``Type/id``: the document or chat message carrying it) as its security context
    (http://hl7.org/fhir/R4/binary.html#security), so whoever may read that resource may read
    its content: the other party of the case as well as the uploader. The raw content is kept
    (the new version points at the same blob)."""
    for attachment in attachments:
        binary_id = ref_id(attachment.get("url") or "", "Binary")
        if binary_id is None:
            continue
        with tx.internal():
            stored = tx.current("Binary", binary_id, for_update=True)
            if stored is None or stored.deleted or stored.resource.get("securityContext"):
                continue
            blob = tx.blob_of(stored)
            secured = {**stored.resource, "securityContext": {"reference": context}}
            updated, _ = tx.update("Binary", binary_id, secured, if_match=stored.version)
            if blob is not None:
                tx.attach_blob(
                    updated, sha256=blob.sha256, size=int(blob.size), content_type=blob.content_type
                )


def documents_pointing_at(tx: Tx, binary_id: str) -> bool:
    """True when a DocumentReference's attachment names ``Binary/<binary_id>``."""
    with tx.internal():
        return bool(tx.find("DocumentReference", [("location", f"Binary/{binary_id}")], limit=1))


def binary_replaced(binary_id: str) -> FhirError:
    """The error for replacing the content of a case document's Binary."""
    return FhirError(
        409,
        "business-rule",
        f"Binary/{binary_id} is the content of a case document and cannot be replaced; "
        "upload a new Binary and DocumentReference",
        code="MSO-DOC-410",
    )
