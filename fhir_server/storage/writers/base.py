"""The writer interface (:class:`ResourceWriter`) and the race it reports
(:class:`ConcurrentCreate`); see :mod:`fhir_server.storage.writers`."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import Connection

from fhir_server.storage.records import StoredResource


class ConcurrentCreate(Exception):
    """A unit found that an id it created (its rows held back) was taken by another writer in
    the meantime: :meth:`Repository.write` runs the unit again, where the write becomes an
    update of that resource."""


class ResourceWriter(Protocol):
    """Stores resource and history rows of one dialect (see the module docstring).

    ``values`` of a version carry the columns ``res_type``, ``res_id``, ``version``,
    ``last_updated``, ``deleted`` and ``content``; those of a move ``b_pid`` and ``b_version``
    (the row and the version it was read at), ``version``, ``last_updated``, ``deleted`` and
    ``content``.
    """

    chains_index: bool  # a single write stores the search index rows with the resource row
    holds_versions: bool  # resource rows can be held back and stored together (batched)

    def insert_first(
        self, conn: Connection, values: dict[str, Any], method: str, body: dict[str, Any]
    ) -> int | None:
        """Insert version 1 and its history row (and, if :attr:`chains_index`, the index rows
        of ``body``); the new pid, or ``None`` when a create-on-update (``method`` PUT) finds
        the id taken (then nothing is written)."""
        ...

    def move(
        self,
        conn: Connection,
        current: StoredResource,
        values: dict[str, Any],
        method: str,
        body: dict[str, Any] | None,
    ) -> bool:
        """Move ``current``'s row to a later version (``body`` ``None``: a deletion) and record
        it in the history (and, if :attr:`chains_index`, replace the index rows by those of
        ``body``); False when another writer moved the row first."""
        ...

    def draw_pids(self, conn: Connection, count: int) -> list[int]:
        """``count`` new pids for first versions held back (:attr:`holds_versions` only)."""
        ...

    def insert_versions(self, conn: Connection, versions: list[dict[str, Any]]) -> None:
        """Insert held-back first versions (``values`` plus ``pid`` and ``h_method``) and their
        history rows; :class:`ConcurrentCreate` when an id was taken meanwhile."""
        ...

    def move_versions(self, conn: Connection, moves: list[dict[str, Any]]) -> None:
        """Store held-back later versions (move ``values`` plus ``h_method``); 409 when a row
        was moved meanwhile."""
        ...
