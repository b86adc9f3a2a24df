"""Search index tables, one per SearchParameter type (owned by the search work, issue 3)."""
