"""Loading the MSO conformance resources into a real database (SQLite and PostgreSQL): idempotent,
race-safe, served over REST, and seen by ``:in`` / ``:not-in`` / ``:below`` searches."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fhir_server import codes
from fhir_server.conformance import ConformanceResource, install, read_resources
from fhir_server.storage.repository import Repository, Tx
from fhir_server.storage.schema import resource_history
from tests.conftest import make_settings

CANONICAL_TYPES = tuple(sorted({r.res_type for r in read_resources()}))
"""Every type the conformance files hold (CodeSystem, ValueSet, ChargeItemDefinition …)."""


def _repository(db_url: str, tmp_path: Path) -> Repository:
    from fhir_server.wiring import build_repository

    return build_repository(make_settings(db_url, tmp_path, db_pool_size=4))


@pytest.fixture
def repo(fresh_db_url: str, tmp_path: Path) -> Iterator[Repository]:
    """A repository over a new, empty database."""
    repository = _repository(fresh_db_url, tmp_path)
    yield repository
    repository.engine.dispose()


def _versions(repo: Repository) -> int:
    """Rows in resource_history of the canonical types."""
    stmt = (
        select(func.count())
        .select_from(resource_history)
        .where(resource_history.c.res_type.in_(CANONICAL_TYPES))
    )
    return repo.read_only(lambda tx: int(tx.conn.execute(stmt).scalar_one()))


def _by_url(repo: Repository, res_type: str, url: str) -> list[Any]:
    return repo.read_only(lambda tx: tx.find(res_type, [("url", url)]))


def _search(repo: Repository, res_type: str, params: list[tuple[str, str]]) -> set[str]:
    return {s.res_id for s in repo.read_only(lambda tx: tx.find(res_type, params))}


def test_load_twice_writes_nothing_the_second_time(repo: Repository) -> None:
    items = read_resources()
    first = install(repo)
    assert sorted(first.created) == sorted(i.key for i in items)
    assert first.updated == [] and first.unchanged == []
    assert _versions(repo) == len(items)

    second = install(repo)
    assert second.created == [] and second.updated == []
    assert sorted(second.unchanged) == sorted(i.key for i in items)
    assert _versions(repo) == len(items)
    (stored,) = _by_url(repo, "CodeSystem", codes.CASE_STATUS_SYSTEM)
    assert stored.res_id == "mso-case-status" and stored.version == 1


def test_changed_content_or_version_updates_in_place(repo: Repository) -> None:
    install(repo)
    items = read_resources()
    index = next(i for i, item in enumerate(items) if item.url == codes.SPECIALTY_SYSTEM)
    changed = copy.deepcopy(items[index].resource)
    changed["description"] += " Edited."
    items[index] = ConformanceResource(items[index].source, changed)

    result = install(repo, items)
    assert result.updated == ["CodeSystem/mso-specialty"] and result.created == []
    assert install(repo, items).updated == []  # no-op again

    bumped = copy.deepcopy(changed)
    bumped["version"] = "0.2.0"
    items[index] = ConformanceResource(items[index].source, bumped)
    assert install(repo, items).updated == ["CodeSystem/mso-specialty"]
    (stored,) = _by_url(repo, "CodeSystem", codes.SPECIALTY_SYSTEM)
    assert stored.version == 3 and stored.resource["version"] == "0.2.0"


def test_a_deleted_resource_is_restored(repo: Repository) -> None:
    install(repo)
    repo.write(lambda tx: tx.delete("Questionnaire", "mso-feedback"))
    assert _by_url(repo, "Questionnaire", codes.FEEDBACK_QUESTIONNAIRE) == []
    assert install(repo).created == ["Questionnaire/mso-feedback"]
    (stored,) = _by_url(repo, "Questionnaire", codes.FEEDBACK_QUESTIONNAIRE)
    assert stored.version == 3


def test_a_copy_stored_under_another_id_is_updated_not_duplicated(repo: Repository) -> None:
    item = next(i for i in read_resources() if i.url == codes.DOCUMENT_CATEGORY_SYSTEM)
    other = copy.deepcopy(item.resource)
    other["description"] = "An older copy posted by hand."
    repo.write(lambda tx: tx.create(other, res_id="hand-made"))
    result = install(repo)
    assert "CodeSystem/hand-made" in result.updated
    (stored,) = _by_url(repo, "CodeSystem", codes.DOCUMENT_CATEGORY_SYSTEM)
    assert stored.res_id == "hand-made"
    assert stored.resource["description"] == item.resource["description"]


def test_concurrent_loads_create_each_resource_once(fresh_db_url: str, tmp_path: Path) -> None:
    repos = [_repository(fresh_db_url, tmp_path) for _ in range(2)]
    barrier = threading.Barrier(len(repos))
    results: list[Any] = []
    errors: list[BaseException] = []

    def load(repository: Repository) -> None:
        try:
            barrier.wait(timeout=30)
            results.append(install(repository))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(r,)) for r in repos]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        items = read_resources()
        created = [key for result in results for key in result.created]
        assert sorted(created) == sorted(i.key for i in items)
        assert not any(result.updated for result in results)
        assert _versions(repos[0]) == len(items)
        for item in items:
            assert len(_by_url(repos[0], item.res_type, item.url)) == 1, item.key
    finally:
        for repository in repos:
            repository.engine.dispose()


def _case_task(status: codes.CaseStatus) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": codes.TASK_STATUS_OF_CASE_STATUS[status],
        "intent": "order",
        "code": codes.concept(codes.TASK_CODE_SYSTEM, codes.TASK_CODE_CASE),
        "businessStatus": codes.concept(codes.CASE_STATUS_SYSTEM, status),
    }


def test_business_status_in_and_not_in_mso_valuesets(repo: Repository) -> None:
    install(repo)

    def create(tx: Tx) -> dict[str, str]:
        return {s: tx.create(_case_task(s)).res_id for s in codes.CaseStatus}

    ids = repo.write(create)
    active = {ids[s] for s in codes.CaseStatus if s not in codes.CLOSED_CASE_STATUSES}
    closed = {ids[s] for s in codes.CLOSED_CASE_STATUSES}
    vs = codes.CASE_STATUS_ACTIVE_VALUESET
    assert _search(repo, "Task", [("business-status:in", vs)]) == active
    assert _search(repo, "Task", [("business-status:not-in", vs)]) == closed
    everything = _search(repo, "Task", [("business-status:in", codes.CASE_STATUS_VALUESET)])
    assert everything == set(ids.values())


def test_specialty_below_follows_the_mso_hierarchy(repo: Repository) -> None:
    install(repo)

    def role(code: str) -> dict[str, Any]:
        return {
            "resourceType": "PractitionerRole",
            "specialty": [codes.concept(codes.SPECIALTY_SYSTEM, code)],
        }

    ids = repo.write(
        lambda tx: {c: tx.create(role(c)).res_id for c in ("cardiology", "medical-oncology")}
    )
    system = codes.SPECIALTY_SYSTEM
    below = "specialty:below"
    assert _search(repo, "PractitionerRole", [(below, f"{system}|internal-medicine")]) == {
        ids["cardiology"]
    }
    assert _search(repo, "PractitionerRole", [(below, f"{system}|oncology")]) == {
        ids["medical-oncology"]
    }
    above = _search(repo, "PractitionerRole", [("specialty:above", f"{system}|surgery")])
    assert above == set()


@pytest.mark.parametrize("role", ["admin", "requester"])
def test_served_over_rest(repo: Repository, fresh_db_url: str, tmp_path: Path, role: str) -> None:
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from tests.auth_helpers import token_for

    install(repo)
    app = create_app(make_settings(fresh_db_url, tmp_path))
    token = token_for(app, role=role, organization="org-conformance-test")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        found = client.get("/fhir/CodeSystem", params={"url": codes.CASE_STATUS_SYSTEM})
        assert found.status_code == 200, found.text
        (entry,) = found.json()["entry"]
        assert entry["resource"]["id"] == "mso-case-status"
        intake = client.get("/fhir/Questionnaire/mso-intake")
        assert intake.status_code == 200, intake.text
        assert intake.json()["url"] == codes.INTAKE_QUESTIONNAIRE
        profile = client.get("/fhir/StructureDefinition", params={"url": codes.PROFILE_CASE})
        assert profile.json()["entry"][0]["resource"]["type"] == "ServiceRequest"


def test_cli_load_conformance(fresh_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fhir_server.cli import main

    count = len(read_resources())
    assert main(["--database-url", fresh_db_url, "load-conformance"]) == 0
    assert f"{count} created, 0 updated, 0 unchanged" in capsys.readouterr().out
    assert main(["--database-url", fresh_db_url, "load-conformance"]) == 0
    assert f"0 created, 0 updated, {count} unchanged" in capsys.readouterr().out
