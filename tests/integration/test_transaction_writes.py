"""How writes store their rows: a transaction Bundle's entries together (Tx.batched_writes).

The rows must be exactly those the entries would have got one write at a time, in the same
order: a resource referencing a case Task takes the Task's cases only if the Task was written
before it. Reads inside the unit (searches, access checks, hooks) see every row written so far.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from fhir_server.cli_reindex import reindex_rows
from fhir_server.codes import TASK_CODE_CASE, TASK_CODE_CASE_ISSUE, TASK_CODE_SYSTEM
from fhir_server.storage import indexer
from fhir_server.storage.access_schema import access_scope, case_access
from fhir_server.storage.index_schema import INDEX_TABLES, idx_token
from fhir_server.storage.repository import Tx
from fhir_server.storage.schema import resource

Snapshot = dict[str, list[tuple[Any, ...]]]


def _ref(rtype: str, rid: str) -> dict[str, str]:
    return {"reference": f"{rtype}/{rid}"}


def _world(u: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Resources whose access rows come from every kind of membership; ids end in ``u``.

    The first Communication is about the case issue Task written after it: one at a time it
    gets none of the Task's cases, and so it must in a batch. The notification before the
    issue Task puts a Communication ahead of it among the rows held back together.
    """
    task_code = {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_CASE}]}
    issue_code = {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_CASE_ISSUE}]}
    notification = {
        "system": "https://mso.example.org/fhir/CodeSystem/communication-category",
        "code": "notification",
    }
    return [
        (
            "Communication",
            f"early-{u}",
            {
                "resourceType": "Communication",
                "status": "completed",
                "about": [_ref("Task", f"issue-{u}")],
            },
        ),
        ("Organization", f"org-{u}", {"resourceType": "Organization", "name": "Org"}),
        (
            "PractitionerRole",
            f"role-{u}",
            {"resourceType": "PractitionerRole", "organization": _ref("Organization", f"org-{u}")},
        ),
        ("Patient", f"pat-{u}", {"resourceType": "Patient", "gender": "female"}),
        (
            "ServiceRequest",
            f"case-{u}",
            {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "subject": _ref("Patient", f"pat-{u}"),
                "requester": _ref("PractitionerRole", f"role-{u}"),
            },
        ),
        (
            "Task",
            f"task-{u}",
            {
                "resourceType": "Task",
                "status": "accepted",
                "intent": "order",
                "code": task_code,
                "focus": _ref("ServiceRequest", f"case-{u}"),
                "for": _ref("Patient", f"pat-{u}"),
                "owner": _ref("PractitionerRole", f"role-{u}"),
            },
        ),
        (
            "Communication",
            f"note-{u}",
            {
                "resourceType": "Communication",
                "status": "completed",
                "category": [{"coding": [notification]}],
                "recipient": [_ref("Patient", f"pat-{u}")],
            },
        ),
        (
            "Task",
            f"issue-{u}",
            {
                "resourceType": "Task",
                "status": "requested",
                "intent": "order",
                "code": issue_code,
                "partOf": [_ref("Task", f"task-{u}")],
            },
        ),
        (
            "Communication",
            f"late-{u}",
            {
                "resourceType": "Communication",
                "status": "completed",
                "about": [_ref("Task", f"issue-{u}")],
                "basedOn": [_ref("ServiceRequest", f"case-{u}")],
                "subject": _ref("Patient", f"pat-{u}"),
            },
        ),
        (
            "Observation",
            f"obs-{u}",
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": _ref("Patient", f"pat-{u}"),
                "basedOn": [_ref("ServiceRequest", f"case-{u}")],
            },
        ),
        (
            "Binary",
            f"bin-{u}",
            {
                "resourceType": "Binary",
                "contentType": "text/plain",
                "securityContext": _ref("Observation", f"obs-{u}"),
                "data": "aGk=",
            },
        ),
        (
            "Provenance",
            f"prov-{u}",
            {
                "resourceType": "Provenance",
                "recorded": "2026-01-01T00:00:00Z",
                "target": [_ref("Observation", f"obs-{u}"), _ref("Task", f"issue-{u}")],
                "agent": [{"who": _ref("PractitionerRole", f"role-{u}")}],
            },
        ),
    ]


def _store(app: Any, world: list[tuple[str, str, dict[str, Any]]], *, batched: bool) -> None:
    """Write ``world`` as server work in one unit, one resource after the other."""

    def work(tx: Tx) -> None:
        if batched:
            with tx.batched_writes():
                for rtype, rid, body in world:
                    tx.update(rtype, rid, {**body, "id": rid})
        else:
            for rtype, rid, body in world:
                tx.update(rtype, rid, {**body, "id": rid})

    app.state.repo.write(work)


def _snapshot(app: Any, ids: list[str], normal: Callable[[Any], Any]) -> Snapshot:
    """Every index, access and case row of the resources ``ids``, by resource id."""
    out: Snapshot = {}
    with app.state.repo.engine.connect() as conn:
        keys = {
            row.pid: row.res_id
            for row in conn.execute(
                select(resource.c.pid, resource.c.res_id).where(resource.c.res_id.in_(ids))
            )
        }
        for table in (*INDEX_TABLES, access_scope):
            rows = conn.execute(select(table).where(table.c.pid.in_(list(keys)))).all()
            out[table.name] = sorted(
                tuple(
                    normal(keys[v] if c == "pid" else v)
                    for c, v in zip(row._fields, row, strict=True)
                )
                for row in rows
            )
        cases = conn.execute(select(case_access).where(case_access.c.case_id.in_(ids))).all()
        out["case_access"] = sorted(tuple(normal(v) for v in row) for row in cases)
    return out


def _normalizer(u: str) -> Callable[[Any], Any]:
    return lambda v: v.replace(u, "U") if isinstance(v, str) else v


def test_batched_rows_equal_one_write_at_a_time(app) -> None:
    one, many = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    _store(app, _world(one), batched=False)
    _store(app, _world(many), batched=True)
    expected = _snapshot(app, [rid for _, rid, _ in _world(one)], _normalizer(one))
    got = _snapshot(app, [rid for _, rid, _ in _world(many)], _normalizer(many))
    assert got == expected
    scopes = {(r[0], r[1], r[3]) for r in got["access_scope"]}
    assert ("late-U", 2, "case-U") in scopes  # the issue Task's case, written before it
    assert not any(r[0] == "early-U" for r in got["access_scope"])  # … not before it
    assert ("bin-U", 5, "obs-U") in scopes
    assert got["case_access"]


def test_transaction_writes_rows_once_and_as_single_writes_would(client, app, monkeypatch):
    u = uuid.uuid4().hex[:12]
    existing = [f"old-{u}-{n}" for n in range(3)]
    for rid in existing:
        body = {"resourceType": "Patient", "identifier": [{"system": "urn:before", "value": rid}]}
        assert client.put(f"/fhir/Patient/{rid}", json={**body, "id": rid}).status_code == 201
    entries: list[dict[str, Any]] = []
    for n in range(20):
        patient_url = f"urn:uuid:{uuid.uuid4()}"
        identifier = [{"system": "urn:batched", "value": f"{u}-{n}"}]
        entries.append(
            {
                "fullUrl": patient_url,
                "resource": {"resourceType": "Patient", "identifier": identifier},
                "request": {"method": "POST", "url": "Patient"},
            }
        )
        entries.append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                    "subject": {"reference": patient_url},
                    "valueQuantity": {"value": 60 + n, "system": "http://unitsofmeasure.org",
                                      "code": "kg"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )  # fmt: skip
    for rid in existing:  # updates: their previous rows must go
        body = {"resourceType": "Patient", "id": rid}
        body["identifier"] = [{"system": "urn:after", "value": rid}]
        entries.append({"resource": body, "request": {"method": "PUT", "url": f"Patient/{rid}"}})
    calls: list[int] = []
    real = indexer.write_rows

    def counting(conn: Any, writes: Any) -> None:
        calls.append(len(writes))
        real(conn, writes)

    monkeypatch.setattr(indexer, "write_rows", counting)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = client.post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    # every entry's rows in one call; then those of the Provenance the server records (on
    # PostgreSQL stored with its resource row, in the same statement)
    assert calls[0] == len(entries) and set(calls[1:]) <= {0, 1}
    monkeypatch.undo()

    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["201 Created"] * 40 + ["200 OK"] * 3
    found = client.get(
        "/fhir/Observation", params={"subject:Patient.identifier": f"urn:batched|{u}-7"}
    )
    assert [e["resource"]["valueQuantity"]["value"] for e in found.json()["entry"]] == [67]
    before = client.get("/fhir/Patient", params={"identifier": f"urn:before|{existing[0]}"})
    assert before.json().get("entry", []) == []
    after = client.get("/fhir/Patient", params={"identifier": f"urn:after|{existing[0]}"})
    assert len(after.json()["entry"]) == 1

    ids = [e["resource"]["id"] for e in response.json()["entry"]]
    written = _snapshot(app, ids, lambda v: v)
    with app.state.repo.unit(write=True) as tx:
        rows = tx.conn.execute(
            select(
                resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.version,
                resource.c.last_updated, resource.c.content,
            )
            .where(resource.c.res_id.in_(ids))
            .order_by(resource.c.pid)
        ).all()  # fmt: skip
        reindex_rows(tx, rows)
    assert _snapshot(app, ids, lambda v: v) == written


def test_reads_in_the_unit_see_rows_held_back(app) -> None:
    value = uuid.uuid4().hex

    def work(tx: Tx) -> list[str]:
        with tx.batched_writes():
            body = {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:held", "value": value}],
            }
            created = tx.create(body)
            found = tx.find("Patient", [("identifier", f"urn:held|{value}")])
            assert [f.res_id for f in found] == [created.res_id]
            return [created.res_id]

    assert app.state.repo.write(work)


def test_prefetched_rows_are_not_reused_once_written(app) -> None:
    rid, absent = f"pre-{uuid.uuid4().hex[:12]}", f"new-{uuid.uuid4().hex[:12]}"
    app.state.repo.write(
        lambda tx: tx.update("Patient", rid, {"resourceType": "Patient", "id": rid})
    )

    def work(tx: Tx) -> tuple[int, int, bool]:
        tx.prefetch_current([("Patient", rid), ("Patient", absent)])
        first, _ = tx.update("Patient", rid, {"resourceType": "Patient", "gender": "male"})
        # a second write of the same resource in the unit (a hook, say) reads it afresh
        second, _ = tx.update("Patient", rid, {"resourceType": "Patient", "gender": "female"})
        _, created = tx.update("Patient", absent, {"resourceType": "Patient"})
        return first.version, second.version, created

    assert app.state.repo.write(work) == (2, 3, True)


# PostgreSQL only: there a transaction holds its first versions back until it stores them
# together (SQLite's single writer cannot interleave with another).
@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_an_id_taken_while_held_back_makes_the_unit_run_again(app) -> None:
    repo = app.state.repo
    assert repo.postgres
    rid = f"race-{uuid.uuid4().hex[:12]}"
    attempts: list[int] = []

    def work(tx: Tx) -> tuple[int, bool]:
        attempts.append(1)
        with tx.batched_writes(expected=1):
            stored, created = tx.update(
                "Patient", rid, {"resourceType": "Patient", "gender": "male"}
            )
            if len(attempts) == 1:  # another writer takes the id before this unit stores it
                repo.write(lambda other: other.update("Patient", rid, {"resourceType": "Patient"}))
        return stored.version, created

    assert repo.write(work) == (2, False)  # the second run updates what the other created
    assert len(attempts) == 2
    with repo.unit() as tx:
        current = tx.current("Patient", rid)
    assert current is not None and current.version == 2
    assert current.resource["gender"] == "male"


def test_new_versions_held_back_keep_history_and_order(client, app) -> None:
    u = uuid.uuid4().hex[:12]
    ids = [f"v-{u}-{n}" for n in range(3)]
    for rid in ids:
        assert (
            client.put(
                f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid}
            ).status_code
            == 201
        )
    patch = [{"op": "add", "path": "/gender", "value": "other"}]
    entries = [
        {"resource": {"resourceType": "Patient", "id": ids[0], "gender": "male"},
         "request": {"method": "PUT", "url": f"Patient/{ids[0]}"}},
        {"request": {"method": "DELETE", "url": f"Patient/{ids[1]}"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                      "data": base64.b64encode(json.dumps(patch).encode()).decode()},
         "request": {"method": "PATCH", "url": f"Patient/{ids[2]}"}},
        {"request": {"method": "GET", "url": f"Patient/{ids[2]}"}},
    ]  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = client.post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    got = response.json()["entry"]
    assert got[3]["resource"]["gender"] == "other"  # the GET sees the PATCH of the same unit
    assert got[3]["resource"]["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Patient/{ids[1]}").status_code == 410
    for rid, gender in ((ids[0], "male"), (ids[2], "other")):
        history = client.get(f"/fhir/Patient/{rid}/_history").json()["entry"]
        assert [e["resource"]["meta"]["versionId"] for e in history] == ["2", "1"]
        assert history[0]["resource"]["gender"] == gender
        found = client.get("/fhir/Patient", params={"_id": rid, "gender": gender}).json()
        assert len(found["entry"]) == 1
    deleted = client.get(f"/fhir/Patient/{ids[1]}/_history").json()["entry"]
    assert [e["request"]["method"] for e in deleted] == ["DELETE", "PUT"]

    def twice(tx: Tx) -> list[int]:
        with tx.batched_writes():
            first, _ = tx.update("Patient", ids[0], {"resourceType": "Patient", "gender": "female"})
            second, _ = tx.update(
                "Patient", ids[0], {"resourceType": "Patient", "gender": "unknown"}
            )
        return [first.version, second.version]

    assert app.state.repo.write(twice) == [3, 4]
    assert client.get(f"/fhir/Patient/{ids[0]}").json()["gender"] == "unknown"


def test_racing_creates_on_update_store_one_resource_and_one_set_of_rows(app) -> None:
    """PUTs of one new id at once: one creates, the others update it; a loser's create wrote
    nothing, neither its resource row nor (stored in the same statement) its index rows."""
    repo = app.state.repo
    rid, value = f"put-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": value}]}
    start = threading.Barrier(4)

    def put(_: int) -> bool:
        start.wait()
        return repo.write(lambda tx: tx.update("Patient", rid, dict(body)))[1]

    with ThreadPoolExecutor(4) as pool:
        created = list(pool.map(put, range(4)))
    assert sorted(created) == [False, False, False, True]
    with repo.unit() as tx:
        current = tx.current("Patient", rid)
        assert current is not None and current.version == 4
        codes = tx.conn.execute(select(idx_token.c.pid).where(idx_token.c.code == value)).all()
    assert [row.pid for row in codes] == [current.pid]
