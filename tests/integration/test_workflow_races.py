"""Concurrent case operations (issue 5): two simultaneous ``$assign`` or ``$accept`` on one case
from threads — exactly one wins, the loser gets a 409 and changes nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server.codes import CASE_STATUS_SYSTEM
from tests.integration.workflow_world import World, build_world


@pytest.fixture
def world(app: Any, client: Any) -> World:
    return build_world(app, client)


def _race(world: World, calls: list[tuple[str, str, str, dict[str, Any]]]) -> list[int]:
    """Run the operations at once, each from its own thread and client; their statuses."""
    barrier = threading.Barrier(len(calls))
    results: list[int] = [0] * len(calls)

    def run(index: int, who: str, task_id: str, name: str, params: dict[str, Any]) -> None:
        parameters = [{"name": k, "valueReference": {"reference": v}} for k, v in params.items()]
        body = {"resourceType": "Parameters", "parameter": parameters}
        http = TestClient(world.app, base_url="http://testserver")
        barrier.wait()
        response = http.post(f"/fhir/Task/{task_id}/${name}", json=body, headers=world.as_(who))
        results[index] = response.status_code

    threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _statuses(world: World, task_id: str) -> list[str]:
    history = world.get("admin", f"Task/{task_id}/_history").json()
    return [
        next(
            c["code"]
            for c in e["resource"]["businessStatus"]["coding"]
            if c["system"] == CASE_STATUS_SYSTEM
        )
        for e in reversed(history["entry"])
    ]


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_assign_one_wins(world: World, attempt: int) -> None:
    _, task_id = world.submit()
    results = _race(
        world,
        [
            ("admin", task_id, "assign", {"provider": f"PractitionerRole/{world.prov1}"}),
            ("admin", task_id, "assign", {"provider": f"PractitionerRole/{world.prov2}"}),
        ],
    )
    assert sorted(results) == [200, 409], results
    task = world.task(task_id)
    assert task["meta"]["versionId"] == "2"
    winner = world.prov1 if results[0] == 200 else world.prov2
    assert task["owner"] == {"reference": f"PractitionerRole/{winner}"}
    assert _statuses(world, task_id) == ["new", "assigned"]
    request = world.get("admin", task["focus"]["reference"]).json()
    assert request["performer"] == [{"reference": f"PractitionerRole/{winner}"}]


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_accept_one_wins(world: World, attempt: int) -> None:
    _, task_id = world.submit()
    assigned = world.op("admin", task_id, "assign", provider=f"PractitionerRole/{world.prov1}")
    assert assigned.status_code == 200
    results = _race(world, [("prov1", task_id, "accept", {}), ("prov1", task_id, "accept", {})])
    assert sorted(results) == [200, 409], results
    assert _statuses(world, task_id) == ["new", "assigned", "accepted"]
