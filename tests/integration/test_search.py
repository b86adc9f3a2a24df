"""FHIR search over HTTP, on SQLite and PostgreSQL (http://hl7.org/fhir/R4/search.html).

Every test searches within a data set tagged with a value unique to the module run, so the
shared session database needs no cleanup; the same expected ids are asserted on both
databases.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

TAG_SYSTEM = "urn:mso:test"


@dataclass
class Data:
    tag: str
    ids: dict[str, str]

    @property
    def t(self) -> str:
        return f"{TAG_SYSTEM}|{self.tag}"


def _post(client, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(f"/fhir/{body['resourceType']}", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def data(client) -> Data:
    tag = uuid.uuid4().hex
    meta = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    ids: dict[str, str] = {}

    def add(key: str, body: dict[str, Any]) -> str:
        body["meta"] = meta
        ids[key] = _post(client, body)["id"]
        return ids[key]

    org = add("org", {"resourceType": "Organization", "name": "Acme Clinic"})
    add(
        "anna",
        {
            "resourceType": "Patient",
            "identifier": [
                {
                    "system": "urn:mrn",
                    "value": f"A-{tag}",
                    "type": {"coding": [{"system": "http://t", "code": "MR"}]},
                }
            ],
            "name": [{"family": "Müller", "given": ["Anna"]}],
            "gender": "female",
            "birthDate": "1980-02-03",
            "active": True,
            "telecom": [{"system": "email", "value": "anna@example.org"}],
            "managingOrganization": {"reference": f"Organization/{org}"},
            "text": {
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">Anna likes cycling</div>',
            },
        },
    )
    add(
        "bob",
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:mrn", "value": f"B-{tag}"}],
            "name": [{"family": "Smith, Jr", "given": ["Bob"]}],
            "gender": "male",
            "birthDate": "1990",
        },
    )
    add(
        "carl",
        {
            "resourceType": "Patient",
            "name": [{"family": "Mullins", "given": ["Carl"]}],
            "birthDate": "2001-07-01",
        },
    )
    for key, patient, code, value, when in [
        ("o1", "anna", "8867-4", 72, "2021-05-01T10:00:00Z"),
        ("o2", "anna", "8310-5", 37.2, "2022-01-01"),
        ("o3", "bob", "8867-4", 95, "2020-03-04"),
    ]:
        add(
            key,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": code}],
                    "text": f"code {code}",
                },
                "subject": {"reference": f"Patient/{ids[patient]}"},
                "effectiveDateTime": when,
                "valueQuantity": {
                    "value": value,
                    "system": "http://unitsofmeasure.org",
                    "code": "/min",
                },
            },
        )
    add(
        "enc",
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{ids['anna']}"},
            "period": {"start": "2021-05-01T09:00:00Z", "end": "2021-05-01T11:00:00Z"},
        },
    )
    add(
        "list",
        {
            "resourceType": "List",
            "status": "current",
            "mode": "working",
            "entry": [{"item": {"reference": f"Patient/{ids['bob']}"}}],
        },
    )
    return Data(tag, ids)


def search(
    client, data: Data, query: str, *, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    sep = "&" if "?" in query else "?"
    resp = client.get(f"/fhir/{query}{sep}_tag={data.t}", headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp.json()


def ids_of(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def keys(data: Data, *names: str) -> set[str]:
    return {data.ids[n] for n in names}


CASES = [
    # string: default starts-with, case/accent-insensitive; :exact; :contains
    ("Patient?name=mul", ("anna", "carl")),
    ("Patient?name=MÜL", ("anna", "carl")),
    ("Patient?name:exact=Müller", ("anna",)),
    ("Patient?name:exact=müller", ()),
    ("Patient?name:contains=ll", ("anna", "carl")),
    ("Patient?family=smith\\, jr", ("bob",)),
    ("Patient?name=anna,bob", ("anna", "bob")),
    ("Patient?name=mul&gender=female", ("anna",)),
    # token forms and modifiers
    ("Patient?gender=female", ("anna",)),
    ("Patient?gender:not=female", ("bob", "carl")),
    ("Patient?identifier=urn:mrn|", ("anna", "bob")),
    ("Patient?active=true", ("anna",)),
    ("Patient?telecom=email|anna@example.org", ("anna",)),
    ("Observation?code=http://loinc.org|8867-4", ("o1", "o3")),
    ("Observation?code=|8867-4", ()),
    ("Observation?code:text=code 8310", ("o2",)),
    ("Patient?gender:missing=true", ("carl",)),
    ("Patient?gender:missing=false", ("anna", "bob")),
    # date prefixes
    ("Patient?birthdate=1980", ("anna",)),
    ("Patient?birthdate=gt1985", ("bob", "carl")),
    ("Patient?birthdate=lt1990-06-01", ("anna", "bob")),
    ("Patient?birthdate=ge1990", ("bob", "carl")),
    ("Patient?birthdate=le1990", ("anna", "bob")),
    ("Patient?birthdate=ne1990", ("anna", "carl")),
    ("Patient?birthdate=sa1990", ("carl",)),
    ("Patient?birthdate=eb1990", ("anna",)),
    ("Patient?birthdate=ge1980&birthdate=lt1991", ("anna", "bob")),
    ("Encounter?date=2021-05-01", ("enc",)),
    ("Encounter?date=ap2021-05-01", ("enc",)),
    ("Observation?date=2021-05-01T10:00:00Z", ("o1",)),
    # quantity
    ("Observation?value-quantity=72", ("o1",)),
    ("Observation?value-quantity=gt70|http://unitsofmeasure.org|/min", ("o1", "o3")),
    ("Observation?value-quantity=lt40||/min", ("o2",)),
    ("Observation?value-quantity=ap37", ("o2",)),
    # reference forms
    ("Encounter?subject:Patient={anna}", ("enc",)),
    ("Observation?subject=Patient/{anna}", ("o1", "o2")),
    ("Observation?patient={bob}", ("o3",)),
    ("Observation?subject=http://testserver/fhir/Patient/{bob}", ("o3",)),
    # chaining, reverse chaining, composite
    ("Observation?subject:Patient.name=müller", ("o1", "o2")),
    ("Observation?subject.organization.name=acme", ("o1", "o2")),
    ("Patient?_has:Observation:subject:code=8867-4", ("anna", "bob")),
    ("Patient?_has:Observation:subject:value-quantity=gt90", ("bob",)),
    ("Organization?_has:Patient:organization:_has:Observation:subject:code=8310-5", ("org",)),
    ("Observation?code-value-quantity=8867-4$gt80", ("o3",)),
    ("Observation?code-value-quantity=8310-5$gt80", ()),
    # resource-level parameters
    ("Patient?_id={anna},{carl}", ("anna", "carl")),
    ("Patient?_lastUpdated=gt2000-01-01", ("anna", "bob", "carl")),
    ("Patient?_lastUpdated=lt2000-01-01", ()),
    ("Patient?_text=cycling", ("anna",)),
    ("Patient?_content=anna", ("anna",)),
    ("Patient?_list={list}", ("bob",)),
    ("Patient?identifier:of-type=http://t|MR|A-{tag}", ("anna",)),
    # _filter
    ('Patient?_filter=name co "ll" and gender eq female', ("anna",)),
    ("Patient?_filter=birthdate ge 1990 or gender eq female", ("anna", "bob", "carl")),
    ("Patient?_filter=not (gender eq female)", ("bob", "carl")),
    ("Patient?_filter=gender pr false", ("carl",)),
    ("Patient?_filter=(family sw mul or family eq Smith) and birthdate lt 2000", ("anna",)),
    ("Observation?_filter=value-quantity gt 80 and subject eq Patient/{bob}", ("o3",)),
]


@pytest.mark.parametrize(("query", "expected"), CASES, ids=[c[0] for c in CASES])
def test_search(client, data: Data, query: str, expected: tuple[str, ...]) -> None:
    q = query.format(tag=data.tag, **data.ids)
    assert ids_of(search(client, data, q)) == keys(data, *expected)


def test_post_search_equals_get(client, data: Data) -> None:
    resp = client.post("/fhir/Patient/_search", data={"name": "mul", "_tag": data.t})
    assert resp.status_code == 200, resp.text
    assert ids_of(resp.json()) == keys(data, "anna", "carl")


def test_includes(client, data: Data) -> None:
    b = search(client, data, "Observation?code=8867-4&_include=Observation:subject")
    assert ids_of(b) == keys(data, "o1", "o3") and ids_of(b, "include") == keys(data, "anna", "bob")
    b = search(client, data, f"Patient?_id={data.ids['anna']}&_revinclude=Observation:subject")
    assert ids_of(b, "include") == keys(data, "o1", "o2")
    b = search(
        client,
        data,
        f"Observation?_id={data.ids['o1']}&_include=Observation:subject"
        "&_include:iterate=Patient:organization",
    )
    assert ids_of(b, "include") == keys(data, "anna", "org")
    b = search(client, data, f"Encounter?_id={data.ids['enc']}&_include=*")
    assert keys(data, "anna") <= ids_of(b, "include")


def test_sort_and_paging(client, data: Data) -> None:
    b = search(client, data, "Patient?_sort=-birthdate&_count=2&_total=accurate")
    assert [e["resource"]["id"] for e in b["entry"]] == [data.ids["carl"], data.ids["bob"]]
    assert b["total"] == 3
    nxt = next(link["url"] for link in b["link"] if link["relation"] == "next")
    b2 = client.get(nxt.replace("http://testserver", "")).json()
    assert [e["resource"]["id"] for e in b2["entry"]] == [data.ids["anna"]]
    assert not any(link["relation"] == "next" for link in b2["link"])
    prev = next(link["url"] for link in b2["link"] if link["relation"] == "previous")
    b3 = client.get(prev.replace("http://testserver", "")).json()
    assert [e["resource"]["id"] for e in b3["entry"]] == [data.ids["carl"], data.ids["bob"]]
    b = search(client, data, "Patient?_sort=family,given")
    assert [e["resource"]["id"] for e in b["entry"]] == [
        data.ids[k] for k in ("anna", "carl", "bob")
    ]


def test_paging_is_stable_while_data_changes(client, data: Data) -> None:
    b = search(client, data, "Patient?_count=1&_sort=_id")
    seen = [b["entry"][0]["resource"]["id"]]
    nxt = next(link["url"] for link in b["link"] if link["relation"] == "next")
    extra = _post(
        client,
        {
            "resourceType": "Patient",
            "name": [{"family": "Zed"}],
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": data.tag}]},
        },
    )
    while nxt:
        page = client.get(nxt.replace("http://testserver", "")).json()
        seen.extend(e["resource"]["id"] for e in page.get("entry", []))
        nxt = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    client.delete(f"/fhir/Patient/{extra['id']}")
    assert sorted(seen) == sorted(keys(data, "anna", "bob", "carl"))  # no duplicates, no newcomer


def test_summary_and_elements(client, data: Data) -> None:
    b = search(client, data, "Patient?_summary=count")
    assert b["total"] == 3 and "entry" not in b
    b = search(client, data, f"Patient?_id={data.ids['anna']}&_elements=gender")
    res = b["entry"][0]["resource"]
    assert res["gender"] == "female" and "name" not in res
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])
    b = search(client, data, f"Patient?_id={data.ids['anna']}&_summary=true")
    res = b["entry"][0]["resource"]
    assert "name" in res and "text" not in res


def test_unknown_parameter_lenient_and_strict(client, data: Data) -> None:
    b = search(client, data, "Patient?name=mul&foo=bar")
    assert ids_of(b) == keys(data, "anna", "carl")
    outcome = next(e for e in b["entry"] if e["search"]["mode"] == "outcome")["resource"]
    assert outcome["issue"][0]["expression"] == ["foo"]
    resp = client.get(f"/fhir/Patient?foo=bar&_tag={data.t}", headers={"Prefer": "handling=strict"})
    assert resp.status_code == 400
    assert resp.json()["issue"][0]["expression"] == ["foo"]
    resp = client.get("/fhir/Patient?birthdate=notadate", headers={"Prefer": "handling=strict"})
    assert resp.status_code == 400
    assert resp.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-SEARCH-002"


@pytest.mark.parametrize(
    "query",
    [
        "Patient?birthdate=abc",
        "Patient?_count=-1",
        "Observation?value-quantity=x",
        "Patient?_has:Nope:x:y=1",
        "Observation?subject:Patient.nope=1",
        "Patient?_sort=nope",
        "Patient?name:in=x",
    ],
)
def test_malformed_never_500(client, data: Data, query: str) -> None:
    resp = client.get(f"/fhir/{query}&_tag={data.t}")
    assert resp.status_code == 200
    resp = client.get(f"/fhir/{query}", headers={"Prefer": "handling=strict"})
    assert resp.status_code == 400


def test_system_and_compartment_search(client, data: Data) -> None:
    b = search(client, data, "?_type=Patient,Observation&_lastUpdated=gt2000")
    assert ids_of(b) == keys(data, "anna", "bob", "carl", "o1", "o2", "o3")
    b = client.get(f"/fhir/Patient/{data.ids['anna']}/Observation").json()
    assert ids_of(b) == keys(data, "o1", "o2")
    b = client.get(f"/fhir/Patient/{data.ids['anna']}/Observation?code=8867-4").json()
    assert ids_of(b) == keys(data, "o1")
    b = client.get(f"/fhir/Patient/{data.ids['anna']}/*?_tag={data.t}").json()
    assert ids_of(b) == keys(data, "anna", "o1", "o2", "enc")
    b = client.get(f"/fhir/Patient/{data.ids['anna']}/$everything").json()
    assert ids_of(b) >= keys(data, "anna", "o1", "o2", "enc")
    assert data.ids["o3"] not in ids_of(b)


def test_deleted_and_updated_resources(client, data: Data) -> None:
    tagmeta = {"tag": [{"system": TAG_SYSTEM, "code": data.tag}]}
    p = _post(
        client, {"resourceType": "Patient", "name": [{"family": "Transient"}], "meta": tagmeta}
    )
    assert ids_of(search(client, data, "Patient?name=transient")) == {p["id"]}
    p["name"] = [{"family": "Renamed"}]
    assert client.put(f"/fhir/Patient/{p['id']}", json=p).status_code == 200
    assert ids_of(search(client, data, "Patient?name=transient")) == set()
    assert ids_of(search(client, data, "Patient?name=renamed")) == {p["id"]}
    client.delete(f"/fhir/Patient/{p['id']}")
    assert ids_of(search(client, data, "Patient?name=renamed")) == set()


def test_conditional_create_uses_search(client, data: Data) -> None:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": f"A-{data.tag}"}],
    }
    resp = client.post(
        "/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier=urn:mrn|A-{data.tag}"}
    )
    assert resp.status_code == 200  # the existing match is returned, nothing created


def test_in_with_stored_valueset(client, data: Data) -> None:
    url = f"http://example.org/ValueSet/{data.tag}"
    vs = {
        "resourceType": "ValueSet",
        "url": url,
        "status": "active",
        "compose": {"include": [{"system": "http://loinc.org", "concept": [{"code": "8310-5"}]}]},
    }
    assert client.post("/fhir/ValueSet", json=vs).status_code == 201
    assert ids_of(search(client, data, f"Observation?code:in={url}")) == keys(data, "o2")
    assert ids_of(search(client, data, f"Observation?code:not-in={url}")) == keys(data, "o1", "o3")


def test_default_total_and_explicit_total(client, data: Data) -> None:
    assert search(client, data, "Patient?name=mul")["total"] == 2  # one page: free
    paged = search(client, data, "Patient?_count=1")
    assert "total" not in paged
    assert search(client, data, "Patient?_count=1&_total=accurate")["total"] == 3
    assert "total" not in search(client, data, "Patient?_total=none")


def test_access_filter_seam(db_url: str, data: Data) -> None:
    from fhir_server.search.registry import SearchRegistry
    from fhir_server.storage import search_exec
    from fhir_server.storage.engine import build_engine

    engine = build_engine(db_url)
    registry = SearchRegistry.load()
    params = [("_tag", data.t)]
    with engine.connect() as conn:
        everyone = search_exec.find_pids(conn, registry, "Patient", params, limit=None)
        hidden = search_exec.find_pids(
            conn, registry, "Patient", params, limit=None,
            access_filter=lambda r: r.c.res_id != data.ids["anna"],
        )  # fmt: skip
    engine.dispose()
    assert len(everyone) == len(hidden) + 1


@pytest.mark.parametrize(
    "query",
    [
        "Observation?subject:Patient.birthdate=abc",
        "Patient?_has:Observation:subject:date=x",
        "Observation?code-value-quantity=8867-4",
        "Patient?_lastUpdated=yesterday",
    ],
)
def test_malformed_nested_values_are_named(client, data: Data, query: str) -> None:
    name = query.split("?")[1].split("=")[0]
    resp = client.get(f"/fhir/{query}&_tag={data.t}")
    assert resp.status_code == 200
    outcome = next(e for e in resp.json()["entry"] if e["search"]["mode"] == "outcome")
    assert outcome["resource"]["issue"][0]["expression"] == [name]
    resp = client.get(f"/fhir/{query}", headers={"Prefer": "handling=strict"})
    assert resp.status_code == 400 and resp.json()["issue"][0]["expression"] == [name]


def test_token_above_below_with_code_system_hierarchy(client, data: Data) -> None:
    cs = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    made = {}
    for status in ("active", "relapse", "resolved"):
        body = {
            "resourceType": "Condition",
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": data.tag}]},
            "clinicalStatus": {"coding": [{"system": cs, "code": status}]},
            "subject": {"reference": f"Patient/{data.ids['anna']}"},
        }
        made[status] = _post(client, body)["id"]
    below = ids_of(search(client, data, f"Condition?clinical-status:below={cs}|active"))
    assert below == {made["active"], made["relapse"]}
    above = ids_of(search(client, data, f"Condition?clinical-status:above={cs}|relapse"))
    assert above == {made["active"], made["relapse"]}
    resp = client.get(
        "/fhir/Condition?clinical-status:below=http://unknown|x",
        headers={"Prefer": "handling=strict"},
    )
    assert resp.status_code == 400


@pytest.mark.parametrize(
    "sort", ["_lastUpdated", "-_lastUpdated", "-_id", "gender,-birthdate", "-name"]
)
def test_paging_through_every_sort_order(client, data: Data, sort: str) -> None:
    first = search(client, data, f"Patient?_sort={sort}&_count=100")
    expected = [e["resource"]["id"] for e in first["entry"]]
    page = search(client, data, f"Patient?_sort={sort}&_count=1")
    seen = [e["resource"]["id"] for e in page["entry"]]
    while nxt := next((x["url"] for x in page["link"] if x["relation"] == "next"), None):
        page = client.get(nxt.replace("http://testserver", "")).json()
        seen.extend(e["resource"]["id"] for e in page.get("entry", []))
    assert seen == expected and len(seen) == 3


def test_bad_cursor_is_a_400(client, data: Data) -> None:
    resp = client.get(f"/fhir/Patient?_tag={data.t}&_cursor=not-a-cursor")
    assert resp.status_code == 400
    assert resp.json()["issue"][0]["details"]["coding"][0]["code"] == "MSO-SEARCH-005"


def test_count_is_capped_by_max_page_size(client, data: Data) -> None:
    b = search(client, data, "Patient?_count=100000")
    assert len(ids_of(b)) == 3


def test_revinclude_star(client, data: Data) -> None:
    b = search(client, data, f"Patient?_id={data.ids['anna']}&_revinclude=*")
    assert keys(data, "o1", "o2", "enc") <= ids_of(b, "include")


def test_query_count_on_hot_paths(app, client, data: Data) -> None:
    """A one-page search is one SQL statement; a paged one adds none (snapshot read with it)."""
    from sqlalchemy import event

    engine = app.state.repo.engine
    statements: list[str] = []

    # the app's own background threads (the audit writer's batches, the bulk export worker's
    # look at its queue, the mail outbox, presence, wake-ups) may run meanwhile: not the search's
    background = ("audit-writer", "bulk-export", "mail-worker", "presence", "wakeups")

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        # nor is the bearer token's revocation check
        if threading.current_thread().name.startswith(background):
            return
        if "auth_access_token" in statement:
            return
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        search(client, data, f"Patient?identifier=urn:mrn|A-{data.tag}")
        assert len(statements) == 1, statements
        statements.clear()
        search(client, data, "Patient?_count=1")
        assert len(statements) == 1, statements
    finally:
        event.remove(engine, "before_cursor_execute", count)
