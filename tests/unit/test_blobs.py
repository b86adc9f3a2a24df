"""The content-addressed blob store: naming, deduplication, limits, streaming."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from fhir_server.fhir.outcome import FhirError
from fhir_server.storage.blobs import BlobStore


def test_put_names_by_digest_and_deduplicates(tmp_path):
    store = BlobStore(tmp_path)
    data = b"abc" * 100_000
    first = store.put(iter([data[:1000], data[1000:]]), max_bytes=10**7)
    second = store.put(iter([data]), max_bytes=10**7)
    assert first == second
    assert first.sha256 == hashlib.sha256(data).hexdigest() and first.size == len(data)
    assert b"".join(store.read(first.sha256)) == data
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [store.path_of(first.sha256)]


def test_limit_is_enforced_while_streaming_and_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(FhirError) as caught:
        store.put(iter([b"x" * 600, b"y" * 600]), max_bytes=1000)
    assert caught.value.status == 413
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_async_put_and_base64_stream(tmp_path):
    store = BlobStore(tmp_path)

    async def chunks():
        for piece in (b"hello ", b"world", b"!" * 200_000):
            yield piece

    info = asyncio.run(store.put_async(chunks(), max_bytes=10**6))
    encoded = b"".join(store.read_base64(info.sha256))
    assert base64.b64decode(encoded) == b"hello world" + b"!" * 200_000
