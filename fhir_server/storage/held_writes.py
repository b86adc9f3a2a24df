"""What a unit of work holds back while it batches a transaction Bundle's writes.

:meth:`Tx.batched_writes` stores the rows of many writes together: the index and access rows
of every write (both databases), and on PostgreSQL the resource and history rows too (first
versions with pids drawn beforehand, later versions of rows locked since read). This object
keeps them until the unit stores them, with the pids drawn and the current rows prefetched
(:meth:`Tx.prefetch_current`). It runs no statement: the unit decides when to store.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir_server.storage import indexer
from fhir_server.storage.records import StoredResource


@dataclass(frozen=True, slots=True)
class HeldRows:
    """The index and access rows of one write, not yet stored."""

    index: indexer.IndexWrite | None  # None: stored with the resource row
    scopes: Any  # the access indexer's rows (None: none)


class HeldWrites:
    """The held-back rows of one unit (see the module docstring)."""

    __slots__ = ("active", "expected", "moves", "pids", "prefetched", "rows", "versions")

    def __init__(self) -> None:
        self.active = False  # inside Tx.batched_writes
        self.expected = 0  # how many writes the batch expects (pids drawn at once)
        self.rows: list[HeldRows] = []  # index and access rows not yet stored
        self.versions: list[dict[str, Any]] = []  # first versions not yet stored
        self.moves: list[dict[str, Any]] = []  # later versions not yet stored
        self.pids: deque[int] = deque()  # pids drawn for first versions held back
        self.prefetched: dict[tuple[str, str], StoredResource | None] = {}

    @property
    def holds_versions(self) -> bool:
        """True when resource rows are held back."""
        return bool(self.versions or self.moves)

    @property
    def holds_anything(self) -> bool:
        """True when any row is held back."""
        return bool(self.rows or self.versions or self.moves)

    def hold_first(
        self, values: dict[str, Any], method: str, draw: Callable[[int], list[int]]
    ) -> int:
        """Hold back a first version; its pid, drawn with the others the batch expects
        (``draw(count)``: one round trip for a transaction Bundle)."""
        if not self.pids:
            count = max(self.expected, 16)
            self.expected = 0
            self.pids.extend(draw(count))
        pid = self.pids.popleft()
        self.versions.append({**values, "pid": pid, "h_method": method})
        return pid

    def hold_move(self, values: dict[str, Any], method: str) -> None:
        """Hold back a later version (a move from the version read)."""
        self.moves.append({**values, "h_method": method})

    def take_versions(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The held-back first and later versions, no longer held."""
        versions, moves = self.versions, self.moves
        self.versions, self.moves = [], []
        return versions, moves

    def take_rows(self) -> list[HeldRows]:
        """The held-back index and access rows, no longer held."""
        rows, self.rows = self.rows, []
        return rows
