"""Write a resource's search index rows in its own transaction (owned by the search work)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection


def write_index(
    conn: Connection, registry: Any, pid: int, res_type: str | None, resource: dict[str, Any] | None
) -> None:
    """Replace the index rows of ``pid`` with those extracted from ``resource`` (``None``: drop all)."""
    return None
