"""SearchParameter registry (owned by the search work)."""

from __future__ import annotations


class SearchRegistry:
    """The SearchParameters the server supports, per resource type."""

    @classmethod
    def load(cls) -> SearchRegistry:
        """Load the R4 SearchParameters and the MSO ones from ``profiles/``."""
        return cls()
