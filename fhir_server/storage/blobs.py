"""Content-addressed blob store on disk for large Binary content.

A blob is named by the SHA-256 of its bytes and stored once at ``<root>/ab/cd/<sha256>``.
Content is streamed in through a temporary file in the same folder and moved into place with an
atomic rename, so a reader never sees a half-written blob and nothing is ever held whole in
memory. Identical uploads share one file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fhir_server.fhir.outcome import FhirError

CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the store knows of a blob once written."""

    sha256: str
    size: int


class _Writer:
    """Hashes and writes chunks to a temporary file, enforcing a size limit."""

    def __init__(self, store: BlobStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        store.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        self.file = os.fdopen(fd, "wb")
        self.temp = Path(name)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise FhirError(
                413,
                "too-costly",
                f"Content is larger than the limit of {self.max_bytes} bytes",
                code="MSO-REST-413",
            )
        self.digest.update(chunk)
        self.file.write(chunk)

    def finish(self) -> BlobInfo:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        sha = self.digest.hexdigest()
        target = self.store.path_of(sha)
        if target.exists():
            self.temp.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.temp, target)
        return BlobInfo(sha, self.size)

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


class BlobStore:
    """Blobs under ``root``, addressed by SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        """Where the blob with this digest lives."""
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, chunks: Iterable[bytes], *, max_bytes: int) -> BlobInfo:
        """Store the concatenated ``chunks``; 413 (and nothing kept) past ``max_bytes``."""
        writer = _Writer(self, max_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.finish()

    async def put_async(self, chunks: AsyncIterable[bytes], *, max_bytes: int) -> BlobInfo:
        """Like :meth:`put`, for an async stream such as an HTTP request body."""
        writer = _Writer(self, max_bytes)
        try:
            async for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.finish()

    def read(self, sha256: str, *, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream a blob's bytes."""
        with self.path_of(sha256).open("rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def read_base64(self, sha256: str) -> Iterator[bytes]:
        """Stream a blob as base64 (chunks of a multiple of 3 bytes, so the pieces concatenate)."""
        import base64

        yield from (base64.b64encode(chunk) for chunk in self.read(sha256, chunk_size=3 * 65536))

    def json_with_data(self, content: bytes, sha256: str) -> Iterator[bytes]:
        """The stored JSON ``content`` of a blob-backed Binary with its ``data`` element
        (base64 of blob ``sha256``) spliced in before the closing brace, streamed."""
        yield content[:-1]
        yield b',"data":"'
        yield from self.read_base64(sha256)
        yield b'"}'
