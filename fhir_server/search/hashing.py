"""Hashes and normalized values computed at write time (HAPI-style), leading every index.

http://hl7.org/fhir/R4/search.html#string: string search is case- and accent-insensitive, so
each string is stored normalized (NFKD, combining marks dropped, case-folded, whitespace
collapsed). Never change :func:`hash64` or :func:`normalize`: stored rows depend on them
(a change needs ``mso reindex``).
"""

from __future__ import annotations

import unicodedata
from hashlib import blake2b

NORM_LENGTH = 200
_SEP = "\x1f"


def hash64(*parts: str) -> int:
    """A stable signed 64-bit hash of ``parts`` (fits a BIGINT column on every database)."""
    digest = blake2b(_SEP.join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def normalize(value: str) -> str:
    """Case- and accent-insensitive form of a string, truncated to :data:`NORM_LENGTH`."""
    if value.isascii():
        text = value.lower()
    else:
        decomposed = unicodedata.normalize("NFKD", value)
        text = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join(text.split())[:NORM_LENGTH]


def prefix_successor(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix`` (binary order)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
