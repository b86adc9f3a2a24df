"""Pages driven from one index (``search.compile.index_driven_criterion``), on both databases.

PostgreSQL runs them on connections keeping one generic plan per statement; the form itself is
plain SQL, so both databases must page through exactly what the classic form returns: every
page forward and back, rare and common values, deleted resources and later pages included.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from fhir_server.auth.principal import Principal, Role
from fhir_server.auth.scopes import ScopeSet
from fhir_server.search.compile import CompileOptions, Position, index_driven_criterion
from fhir_server.search.query import parse_query
from fhir_server.search.registry import SearchRegistry
from fhir_server.storage import search_exec

SYSTEM = "urn:mso:index-driven"


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load()


@pytest.mark.parametrize(
    ("rtype", "params", "driven"),
    [
        ("Patient", [("identifier", "urn:a|1")], True),
        ("Patient", [("identifier", "urn:a|")], True),
        ("Patient", [("identifier", "1")], True),
        ("Patient", [("identifier", "urn:a|1,urn:a|2")], True),
        ("Patient", [("gender", "female")], True),
        ("Patient", [("name", "smi")], True),
        ("Patient", [("name:exact", "Smith")], True),
        ("Patient", [("name:contains", "mit")], True),
        ("Patient", [("birthdate", "ge2000")], True),
        ("Observation", [("subject", "Patient/p1")], True),
        ("Observation", [("subject", "p1")], True),
        ("Patient", [("gender:not", "female")], False),
        ("Patient", [("gender:missing", "true")], False),
        ("Patient", [("_tag", "urn:a|x")], False),  # Resource-level: rows of every type
        ("Patient", [("_id", "p1")], False),
        ("Patient", [("_lastUpdated", "ge2020")], False),
        ("Patient", [("_content", "x")], False),
        ("Patient", [("identifier", "urn:a|1"), ("gender", "male")], False),
        ("Patient", [("identifier", "urn:a|1"), ("_sort", "name")], False),
        ("Observation", [("subject:Patient.name", "x")], False),
        ("Patient", [("_has:Observation:subject:code", "x")], False),
        ("Observation", [("code-value-quantity", "http://loinc.org|8480-6$gt100")], False),
    ],
)
def test_which_searches_are_driven_from_one_index(registry, rtype, params, driven):
    query = parse_query(registry, (rtype,), params)
    assert (index_driven_criterion(registry, query, CompileOptions()) is not None) is driven


@pytest.fixture(scope="module")
def seeded(client) -> tuple[str, list[str]]:
    """40 Patients with identifiers of this run's system: values 0..3 (10 each), half of
    them female, the first of every value deleted afterwards."""
    system = f"{SYSTEM}:{uuid.uuid4().hex}"
    ids = []
    for n in range(40):
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": system, "value": str(n % 4)}],
            "name": [{"family": f"Drive{n % 3}"}],
            "gender": "female" if n % 2 else "male",
        }
        resp = client.post("/fhir/Patient", json=body)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    for res_id in ids[:4]:
        assert client.delete(f"/fhir/Patient/{res_id}").status_code in (200, 204)
    return system, ids


def _pages(repo, registry, params, *, driven: bool, generic, count: int = 3, caller=None):
    """Every page forward, then every page back from the last one: lists of pids."""
    query = parse_query(registry, ("Patient",), params)
    access = repo.search_access_filter(caller) if caller is not None else None
    options = CompileOptions(index_driven=driven, access_filter=access)
    forward, backward = [], []
    with repo.unit(snapshot=False) as tx:
        position, max_pid = None, None
        while True:
            page = search_exec.run_page(
                lambda: tx.conn, registry, query, options, count=count, position=position,
                max_pid=max_pid, generic_plans=generic,
            )  # fmt: skip
            forward.append(page.pids)
            max_pid = page.max_pid
            if not page.has_next:
                break
            position = page.last
        while page.has_previous:
            assert page.first is not None
            position = Position(page.first.keys, page.first.pid, backward=True)
            page = search_exec.run_page(
                lambda: tx.conn, registry, query, options, count=count, position=position,
                max_pid=max_pid, generic_plans=generic,
            )  # fmt: skip
            backward.append(page.pids)
    return forward, backward


@pytest.mark.parametrize(
    "params",
    [
        [("identifier", "{system}|1")],  # 10 matches, 9 live
        [("identifier", "{system}|")],  # every one of the run
        [("identifier", "{system}|nothing")],
        [("gender", "female")],  # common across the whole shared database
        [("name:exact", "Drive2")],
        [("name", "driv")],  # a prefix: not in pid order in its index
        [("name", "d")],
        [("identifier", "{system}|1,{system}|2")],
    ],
)
def test_index_driven_pages_equal_the_classic_form(app, seeded, registry, params):
    repo = app.state.repo
    params = [(k, v.format(system=seeded[0])) for k, v in params]
    generic = repo.generic_plan_fetch if repo.postgres else None
    classic = _pages(repo, registry, params, driven=False, generic=None)
    driven = _pages(repo, registry, params, driven=True, generic=generic)
    assert driven == classic
    forward, backward = classic
    assert [p for page in reversed(backward) for p in page] == [
        p for page in forward[:-1] for p in page
    ]


def test_the_access_filter_applies_to_index_driven_pages(app, seeded, registry):
    """A patient user finds only their own record among the matches."""
    repo = app.state.repo
    system, ids = seeded
    me = Principal(
        subject="index-driven-patient",
        role=Role.PATIENT,
        scopes=ScopeSet.parse("patient/*.rs"),
        fhir_user=f"Patient/{ids[5]}",
        patient=ids[5],
    )
    params = [("identifier", f"{system}|1")]
    generic = repo.generic_plan_fetch if repo.postgres else None
    classic = _pages(repo, registry, params, driven=False, generic=None, caller=me)
    driven = _pages(repo, registry, params, driven=True, generic=generic, caller=me)
    assert driven == classic
    assert sum(len(page) for page in classic[0]) == 1


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_identifier_search_reuses_one_generic_plan_on_postgresql(app, client, seeded):
    repo = app.state.repo
    for value in ("1", "2", "3"):
        resp = client.get("/fhir/Patient", params={"identifier": f"{seeded[0]}|{value}"})
        assert resp.status_code == 200
        assert resp.json()["total"] == 9
    rows = repo.generic_plan_fetch(
        text(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%FROM idx_token AS t%'"
        ),
        {},
    )
    assert rows, "the identifier page was not prepared on the generic-plan connection"
    assert all(custom == 0 for _generic, custom in rows)
    assert sum(generic for generic, _custom in rows) >= 1
