"""Execute compiled searches against the index tables (owned by the search work)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from fhir_server.fhir.outcome import FhirError


def find_pids(
    conn: Connection, registry: Any, res_type: str, params: list[tuple[str, str]], *, limit: int | None
) -> list[int]:
    """Pids of current, non-deleted ``res_type`` resources matching ``params`` (strict)."""
    raise FhirError(501, "not-supported", "Search is not available yet", code="MSO-SEARCH-501")
