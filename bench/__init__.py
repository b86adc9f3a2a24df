"""Benchmarks of the MSO FHIR server: ``python -m bench <name> [options]``.

Each benchmark is a module ``bench/<name>.py`` with a ``main(argv) -> int``; shared pieces
(throw-away database, server subprocess, wrk runner, tables) live in :mod:`bench.common`.
"""
