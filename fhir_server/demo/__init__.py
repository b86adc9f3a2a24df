"""Demo data, so a new install shows a living system (``mso seed-demo``; issue 5, Demo data).

1. the conformance resources (prices for the invoices of Done cases come from them);
2. ``demo-bundle.json``: organizations, specialists with their specialties, requesters'
   PractitionerRoles and patients — a transaction Bundle of conditional creates, run as
   server work;
3. a user of every role with a known password (:mod:`fhir_server.demo.accounts`) and the
   viewer's public SMART client ``demo-viewer``;
4. one case in every status, made through the real workflow by those users
   (:mod:`fhir_server.demo.cases`).

Every step finds what exists and creates only what is missing, so running it twice creates
nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from fhir_server.auth.principal import Principal
from fhir_server.config import Settings
from fhir_server.demo.accounts import DemoUser

DEMO_BUNDLE = Path(__file__).with_name("demo-bundle.json")


@dataclass
class SeedResult:
    """What one run of :func:`seed_demo` did."""

    resources: int = 0
    """Resources of the demo bundle created."""
    users: list[tuple[DemoUser, bool]] = field(default_factory=list)
    """Every demo user, with whether this run created it."""
    client_created: bool = False
    cases_submitted: int = 0
    moves: int = 0
    """Case operations run ($assign, $accept …)."""

    @property
    def created_anything(self) -> bool:
        """False when the run found everything in place."""
        return bool(
            self.resources
            or any(created for _, created in self.users)
            or self.client_created
            or self.cases_submitted
            or self.moves
        )


def seed_demo(settings: Settings) -> SeedResult:
    """Load the demo data into the database of ``settings`` (migrated already)."""
    from fhir_server.app import create_app
    from fhir_server.conformance import install
    from fhir_server.demo import accounts
    from fhir_server.demo.cases import CaseSeeder
    from fhir_server.interactions.base import FhirRequest, InteractionContext
    from fhir_server.interactions.table import ROUTER
    from fhir_server.interactions.transaction import transaction_or_batch

    app = create_app(settings)
    repo, auth, services = app.state.repo, app.state.auth, app.state.services
    result = SeedResult()
    try:
        install(repo)
        ctx = InteractionContext(
            repo=repo,
            settings=settings,
            base_url=settings.base_url or "",
            services=services,
            router=ROUTER,
        )
        bundle = orjson.loads(DEMO_BUNDLE.read_bytes())
        response = transaction_or_batch(ctx, FhirRequest(method="POST", body=bundle))
        entries = (response.resource or {}).get("entry", [])
        result.resources = sum(1 for e in entries if e["response"]["status"].startswith("201"))

        result.users = accounts.ensure_users(repo, auth.users)
        result.client_created = accounts.ensure_viewer_client(auth.clients)

        def principal(username: str) -> Principal:
            user = auth.users.get(username)
            if user is None:
                raise LookupError(f"demo user {username} is missing")
            return accounts.principal_of(user)

        seeder = CaseSeeder(
            repo=repo,
            settings=settings,
            services=services,
            principal=principal,
            find_id=lambda rtype, system, value: accounts.find_id(repo, rtype, system, value),
        )
        result.cases_submitted, result.moves = seeder.run()
    finally:
        app.state.audit.close()
        repo.engine.dispose()
    return result


def credentials_text(result: SeedResult, base_url: str) -> str:
    """The demo accounts and how to log in, for the operator (printed by ``mso seed-demo``)."""
    from fhir_server.demo.accounts import VIEWER_CLIENT_ID, VIEWER_REDIRECT_URI

    width = max(len(user.username) for user, _ in result.users)
    lines = [
        f"Demo accounts (SMART client '{VIEWER_CLIENT_ID}', redirect {VIEWER_REDIRECT_URI}):",
    ]
    for user, created in result.users:
        note = "" if created else "  (existed: password as it was set)"
        lines.append(f"  {user.username:<{width}}  {user.password:<20}  {user.description}{note}")
    lines.append(
        f"Token without a browser: mso token issue --client-id {VIEWER_CLIENT_ID} --user admin"
        f"  (FHIR base {base_url})"
    )
    return "\n".join(lines)


__all__ = ["DEMO_BUNDLE", "SeedResult", "credentials_text", "seed_demo"]
