"""Demo data: organizations, specialists, and patients, so a new install shows a living system.

The data is a transaction Bundle of conditional creates (``demo-bundle.json``), so loading it
twice changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from fhir_server.config import Settings

DEMO_BUNDLE = Path(__file__).with_name("demo-bundle.json")


def seed_demo(settings: Settings) -> int:
    """Load the demo Bundle through the transaction interaction; returns the entries created."""
    from fhir_server.app import build_repository
    from fhir_server.interactions.base import FhirRequest, InteractionContext
    from fhir_server.interactions.transaction import transaction_or_batch

    repo = build_repository(settings)
    try:
        ctx = InteractionContext(repo=repo, settings=settings, base_url=settings.base_url or "")
        bundle = orjson.loads(DEMO_BUNDLE.read_bytes())
        response = transaction_or_batch(ctx, FhirRequest(method="POST", body=bundle))
        entries = (response.resource or {}).get("entry", [])
        return sum(1 for e in entries if e["response"]["status"].startswith("201"))
    finally:
        repo.engine.dispose()
