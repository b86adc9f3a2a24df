"""Persistence: tables, engines, the repository (the only place transactions open), blobs."""
