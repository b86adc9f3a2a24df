"""The fuzz suite's Hypothesis profiles and its world: a case, users of every role, credentials.

Profiles (``MSO_FUZZ_PROFILE``, default ``ci``):

- ``ci``: derandomized (the same examples on every run, so a CI failure reproduces with the
  same command), 20 examples per route (tests scale it with :func:`examples`), a 5 s deadline
  per request, no example database, one bug reported per test (shrunk within Hypothesis' own
  bound). About 35-45 s per database on two cores.
- ``deep``: random, 500 examples per route, no deadline, the example database kept in
  ``.hypothesis/`` so a failure found once is replayed first: for a local hunt.

The world is built once per database and worker: the MSO workflow's organizations, roles and
patient (``tests.integration.workflow_world``), one submitted case (its Task is what the
``$`` operations of Task aim at), and the credentials a fuzz request can carry.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import issue_token
from tests.fuzz.probe import Probe
from tests.fuzz.strategies import TYPES, Known, fresh_id
from tests.integration.workflow_world import build_world

_SLOW_IS_FINE = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.function_scoped_fixture,
]
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=5000,
    derandomize=True,
    database=None,
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=_SLOW_IS_FINE,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
settings.register_profile(
    "deep",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.load_profile(os.environ.get("MSO_FUZZ_PROFILE", "ci"))


def examples(weight: float) -> int:
    """``weight`` times the profile's examples per route (at least one)."""
    return max(1, round(settings().max_examples * weight))


@dataclass(repr=False)
class FuzzWorld:
    """What the fuzz tests aim at and send with."""

    probe: Probe
    known: Known
    patient: str

    def __repr__(self) -> str:  # Hypothesis prints it with every failing example
        return f"FuzzWorld(patient={self.patient!r}, task={self.known.task!r})"


def _credentials(app: Any, world_headers: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """Authorization header values by the credential names of ``strategies.AUTH_KINDS``."""
    system = issue_token(app.state.settings.database_url)
    head, payload, signature = system.split(".")
    forged_payload = base64.urlsafe_b64encode(b'{"sub":"root","scope":"system/*.cruds"}')
    return {
        "system": f"Bearer {system}",
        "admin": world_headers["admin"]["Authorization"],
        "requester": world_headers["reqA"]["Authorization"],
        "provider": world_headers["prov1"]["Authorization"],
        "patient": world_headers["patient"]["Authorization"],
        "none": None,
        "forged": f"Bearer eyJhbGciOiJub25lIn0.{forged_payload.decode().rstrip('=')}.",
        "tampered": f"Bearer {head}.{payload}.{signature[::-1]}",
        "garbage": "Basic dXNlcjpwYXNz",
    }


@pytest.fixture(scope="session")
def fuzz(app, client) -> Iterator[FuzzWorld]:
    """The fuzz world on the session database (see the module docstring)."""
    world = build_world(app, client)
    sr_id, task_id = world.submit()
    registry = app.state.repo.registry
    search_params = tuple((t, tuple(sorted(registry.params_for(t)))) for t in TYPES)
    known = Known(
        ids=(world.patient, world.org, world.prov1, sr_id, task_id, fresh_id()),
        task=task_id,
        search_params=search_params,
    )
    probe = Probe(app, _credentials(app, world.headers))
    yield FuzzWorld(probe=probe, known=known, patient=world.patient)
    probe.close()
